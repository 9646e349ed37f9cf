//! An SVG a person can open: machines that finished each stage over time, and
//! goodput over time, for one `bench pxe` run. Drawn with plotters' SVG
//! backend; this file only turns the report into series.

use plotters::prelude::*;

use crate::pxe::Report;

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 260;
const TITLE_HEIGHT: u32 = 40;
const COLOURS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xd6, 0x27, 0x28),
];
/// Data curves are this wide; axes and ticks are 1 (what tells them apart
/// in the SVG).
pub const CURVE_WIDTH: u32 = 2;
/// Goodput is drawn in about this many slices of the run.
const GOODPUT_SLICES: f64 = 40.0;

pub fn svg(report: &Report) -> anyhow::Result<String> {
    let end_s = run_end_s(report);
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, (WIDTH, 2 * PANEL_HEIGHT + TITLE_HEIGHT))
            .into_drawing_area();
        area.fill(&WHITE)?;
        let title = format!(
            "bench pxe: {} {:?} machines, {} booted, {} failed, {:.1} s",
            report.clients, report.firmware, report.booted, report.failed, report.seconds
        );
        let area = area.titled(&title, ("sans-serif", 14))?;
        let (completions, goodput_panel) = area.split_vertically(PANEL_HEIGHT);
        draw_completions(&completions, report, end_s)?;
        draw_goodput(&goodput_panel, report, end_s)?;
        area.present()?;
    }
    Ok(out)
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Panel 1: machines done with each stage, over time.
fn draw_completions(panel: &Panel<'_>, report: &Report, end_s: f64) -> anyhow::Result<()> {
    let mut chart = ChartBuilder::on(panel)
        .margin(10)
        .x_label_area_size(25)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end_s, 0.0..(report.clients.max(1) as f64))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("s")
        .y_desc("machines done")
        .draw()?;
    for (i, (stage, _)) in report.stage_ms.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                stage_completions(report, stage),
                colour.stroke_width(CURVE_WIDTH),
            ))?
            .label(*stage)
            // A swatch, not a line: only the data are drawn as curves.
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// Panel 2: goodput over time.
fn draw_goodput(panel: &Panel<'_>, report: &Report, end_s: f64) -> anyhow::Result<()> {
    let rates = goodput(report, end_s);
    let peak = rates.iter().map(|(_, r)| *r).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(panel)
        .margin(10)
        .x_label_area_size(25)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end_s, 0.0..peak)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("s")
        .y_desc("MB/s")
        .draw()?;
    chart.draw_series(LineSeries::new(rates, COLOURS[0].stroke_width(CURVE_WIDTH)))?;
    Ok(())
}

/// When the last stage of any machine ended, in seconds since the start (at
/// least 0.1, so an empty run still has an axis).
fn run_end_s(report: &Report) -> f64 {
    report
        .machines
        .iter()
        .flat_map(|m| {
            m.stages
                .iter()
                .map(move |(_, t)| (m.powered_on_ms + t) / 1000.0)
        })
        .fold(0.1f64, f64::max)
}

/// (seconds, machines that had finished `stage` by then), from (0, 0).
fn stage_completions(report: &Report, stage: &str) -> Vec<(f64, f64)> {
    let mut ends: Vec<f64> = report
        .machines
        .iter()
        .filter_map(|m| {
            m.stages
                .iter()
                .find(|(s, _)| *s == stage)
                .map(|(_, t)| (m.powered_on_ms + t) / 1000.0)
        })
        .collect();
    ends.sort_by(f64::total_cmp);
    std::iter::once((0.0, 0.0))
        .chain(ends.iter().enumerate().map(|(n, t)| (*t, (n + 1) as f64)))
        .collect()
}

/// (seconds, MB/s) at the middle of each slice of the run, each machine's
/// bytes spread evenly over its boot, from its first stage's end to its last's.
fn goodput(report: &Report, end_s: f64) -> Vec<(f64, f64)> {
    let slice = (end_s / GOODPUT_SLICES).max(0.01);
    let slices = ((end_s / slice).ceil() as usize).max(1);
    let mut mb = vec![0.0f64; slices];
    for m in &report.machines {
        let (Some((_, first)), Some((_, last))) = (m.stages.first(), m.stages.last()) else {
            continue;
        };
        let from = ((m.powered_on_ms + first) / 1000.0 / slice) as usize;
        let to = (((m.powered_on_ms + last) / 1000.0 / slice) as usize).min(slices - 1);
        let from = from.min(to);
        let per_slice = m.bytes as f64 / 1e6 / (to - from + 1) as f64;
        for slot in &mut mb[from..=to] {
            *slot += per_slice;
        }
    }
    mb.iter()
        .enumerate()
        .map(|(i, v)| ((i as f64 + 0.5) * slice, v / slice))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pxe::{Firmware, MachineResult};

    fn report() -> Report {
        let machine = |n: u8, powered_on_ms: f64| MachineResult {
            mac: format!("52:54:00:10:00:{n:02x}"),
            powered_on_ms,
            stages: vec![("dhcp", 500.0), ("nbp", 1500.0)],
            bytes: 2_000_000,
            ..MachineResult::default()
        };
        Report {
            clients: 2,
            firmware: Firmware::Uefi,
            second_stage: false,
            booted: 2,
            failed: 0,
            retried: 0,
            seconds: 2.0,
            goodput_mb_per_s: 2.0,
            stage_ms: vec![
                ("dhcp", (500.0, 500.0, 500.0)),
                ("nbp", (1500.0, 1500.0, 1500.0)),
            ],
            dhcp_retransmits: 0,
            dhcp_naks: 0,
            tftp_retransmits: 0,
            failures: Default::default(),
            cpu: pxe_lab::cpu::CpuUsage {
                seconds: 2.0,
                cores: 2,
                machine_busy_s: 1.0,
                harness_s: 0.5,
                harness_user_s: 0.4,
                server_s: 0.5,
            },
            machines: vec![machine(0, 0.0), machine(1, 500.0)],
        }
    }

    #[test]
    fn each_stage_counts_machines_done_in_the_order_they_finished() {
        assert_eq!(
            stage_completions(&report(), "nbp"),
            [(0.0, 0.0), (1.5, 1.0), (2.0, 2.0)]
        );
    }

    #[test]
    fn goodput_spreads_each_machines_bytes_over_its_boot() {
        let report = report();
        let rates = goodput(&report, run_end_s(&report));
        let slice = rates[1].0 - rates[0].0;
        let total_mb: f64 = rates.iter().map(|(_, r)| r * slice).sum();
        assert!((total_mb - 4.0).abs() < 1e-9, "{total_mb} MB drawn");
    }

    #[test]
    fn the_svg_has_the_title_both_panels_and_a_legend() {
        let svg = svg(&report()).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("bench pxe: 2 Uefi machines, 2 booted, 0 failed, 2.0 s"));
        for text in ["machines done", "MB/s", "dhcp", "nbp"] {
            assert!(svg.contains(text), "{text} in {svg}");
        }
        let curves = format!(r#"stroke-width="{CURVE_WIDTH}""#);
        assert_eq!(
            svg.matches(&curves).count(),
            3,
            "two stages and goodput: {svg}"
        );
    }
}
