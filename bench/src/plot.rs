//! An SVG a person can open: machines that finished each stage over time, and
//! goodput over time, for one `bench pxe` run. Hand-written SVG (a few
//! polylines) rather than a plotting dependency.

use std::fmt::Write as _;

use crate::pxe::Report;

const W: f64 = 900.0;
const H: f64 = 260.0;
const MARGIN: f64 = 50.0;
const COLOURS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"];

pub fn svg(report: &Report) -> String {
    let end_s = report
        .machines
        .iter()
        .flat_map(|m| {
            m.stages
                .iter()
                .map(move |(_, t)| (m.powered_on_ms + t) / 1000.0)
        })
        .fold(0.1f64, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif" font-size="12">"#,
        2.0 * H + 40.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{MARGIN}" y="18" font-size="14">bench pxe: {} {:?} machines, {} booted, {} failed, {:.1} s</text>"#,
        report.clients, report.firmware, report.booted, report.failed, report.seconds
    );

    // Panel 1: machines done with each stage, over time.
    let top = 30.0;
    axes(&mut out, top, end_s, report.clients as f64, "machines done");
    let stages: Vec<&str> = report.stage_ms.iter().map(|(s, _)| *s).collect();
    for (i, stage) in stages.iter().enumerate() {
        let mut ends: Vec<f64> = report
            .machines
            .iter()
            .filter_map(|m| {
                m.stages
                    .iter()
                    .find(|(s, _)| s == stage)
                    .map(|(_, t)| (m.powered_on_ms + t) / 1000.0)
            })
            .collect();
        ends.sort_by(f64::total_cmp);
        let points: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
            .chain(ends.iter().enumerate().map(|(n, t)| (*t, (n + 1) as f64)))
            .collect();
        polyline(
            &mut out,
            top,
            end_s,
            report.clients as f64,
            &points,
            COLOURS[i % COLOURS.len()],
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{}">{stage}</text>"#,
            MARGIN + 10.0,
            top + 24.0 + 16.0 * i as f64,
            COLOURS[i % COLOURS.len()]
        );
    }

    // Panel 2: goodput over time, each machine's bytes spread over its boot,
    // in about 40 slices of the run.
    let top = H + 40.0;
    let slice = (end_s / 40.0).max(0.01);
    let buckets = ((end_s / slice).ceil() as usize).max(1);
    let mut mb = vec![0.0f64; buckets];
    for m in &report.machines {
        let (Some((_, first)), Some((_, last))) = (m.stages.first(), m.stages.last()) else {
            continue;
        };
        let (from, to) = (
            (m.powered_on_ms + first) / 1000.0,
            (m.powered_on_ms + last) / 1000.0,
        );
        let (a, b) = (
            (from / slice) as usize,
            ((to / slice) as usize).min(buckets - 1),
        );
        let per = m.bytes as f64 / 1e6 / (b - a.min(b) + 1) as f64;
        for slot in mb.iter_mut().take(b + 1).skip(a.min(b)) {
            *slot += per;
        }
    }
    let rates: Vec<f64> = mb.iter().map(|v| v / slice).collect();
    let peak = rates.iter().copied().fold(1.0, f64::max);
    axes(&mut out, top, end_s, peak, "MB/s");
    let points: Vec<(f64, f64)> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| ((i as f64 + 0.5) * slice, *r))
        .collect();
    polyline(&mut out, top, end_s, peak, &points, COLOURS[0]);
    out.push_str("</svg>\n");
    out
}

fn axes(out: &mut String, top: f64, x_max: f64, y_max: f64, y_label: &str) {
    let (x0, y0, x1, y1) = (MARGIN, top + H - 30.0, W - 20.0, top + 10.0);
    let _ = writeln!(
        out,
        r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{x0}" y="{}">0</text><text x="{}" y="{}">{x_max:.1} s</text>"#,
        y0 + 15.0,
        x1 - 40.0,
        y0 + 15.0
    );
    let _ = writeln!(
        out,
        r#"<text x="4" y="{}">{y_max:.0}</text><text x="4" y="{}">{y_label}</text>"#,
        y1 + 4.0,
        (y0 + y1) / 2.0
    );
}

fn polyline(
    out: &mut String,
    top: f64,
    x_max: f64,
    y_max: f64,
    points: &[(f64, f64)],
    colour: &str,
) {
    let (x0, y0, x1, y1) = (MARGIN, top + H - 30.0, W - 20.0, top + 10.0);
    let coords: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!(
                "{:.1},{:.1}",
                x0 + (x / x_max) * (x1 - x0),
                y0 - (y / y_max.max(1e-9)) * (y0 - y1)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
        coords.join(" ")
    );
}
