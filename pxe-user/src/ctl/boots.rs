//! How `pxed ctl boots` and `pxed ctl watch` show the observer's answers:
//! one machine's boots as a timeline, a rack as counts per stage.

use serde_json::Value;

use super::{
    show::cell,
    table::{pairs, Table},
};

/// The stages in boot order, as the API names them.
const STAGES: [&str; 7] = [
    "power_on",
    "dhcp",
    "nbp",
    "ipxe_dhcp",
    "script",
    "os",
    "provisioned",
];

/// Every boot kept: its stages with seconds since power-on, then its events.
pub(super) fn boots_text(answer: &Value) -> String {
    let boots = answer["boots"].as_array().cloned().unwrap_or_default();
    if boots.is_empty() {
        return format!(
            "{}: no boot seen (since pxed started, or it was forgotten)\n",
            cell(&answer["mac"])
        );
    }
    let mut out = String::new();
    for (n, boot) in boots.iter().enumerate() {
        let started = boot["started_ms"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "boot {} of {}: began {}, reached {}{}\n",
            n + 1,
            boots.len(),
            clock(started),
            cell(&boot["stage"]),
            if boot["failure"].is_string() {
                format!(", FAILED: {}", cell(&boot["failure"]))
            } else {
                String::new()
            }
        ));
        let stages: Vec<(&str, String)> = STAGES
            .iter()
            .filter_map(|s| Some((*s, format!("{:.3} s", boot["stages"][*s].as_f64()?))))
            .collect();
        out.push_str(&indent(&pairs(&stages)));
        let mut events = Table::new(&["AT", "WHAT", "DETAIL"]);
        for e in boot["events"].as_array().into_iter().flatten() {
            let at = e["at_ms"].as_u64().unwrap_or(0).saturating_sub(started);
            let (what, detail) = describe(e);
            events.row(vec![format!("+{:.3}", at as f64 / 1000.0), what, detail]);
        }
        if boot["events"].as_array().is_some_and(|e| !e.is_empty()) {
            out.push_str(&indent(&events.render()));
        }
        if let Some(dropped) = boot["events_dropped"].as_u64().filter(|d| *d > 0) {
            out.push_str(&format!("  ({dropped} more events not kept)\n"));
        }
    }
    out
}

/// One event as a short name and its details.
fn describe(e: &Value) -> (String, String) {
    match e["kind"].as_str().unwrap_or("") {
        "dhcp" => {
            let who = match e["client"].as_str() {
                Some("ipxe") => "iPXE ",
                Some("os") => "OS ",
                _ => "",
            };
            let answer = e["answered"].as_str().unwrap_or("not answered");
            let mut detail = format!("port {}", cell(&e["port"]));
            if let Some(a) = e["address"].as_str() {
                detail.push_str(&format!(", address {a}"));
            }
            if e["answered"].is_string() && e["boot_file"] == false {
                detail.push_str(", no boot file");
            }
            (format!("{who}{} → {answer}", cell(&e["asked"])), detail)
        }
        "kernel_answered" => (
            format!("kernel answered {} repeat(s)", cell(&e["count"])),
            format!("port {}", cell(&e["port"])),
        ),
        "tftp" => {
            let kernel =
                e["xdp_blocks"].as_u64().unwrap_or(0) + e["tc_blocks"].as_u64().unwrap_or(0);
            let all = kernel + e["user_blocks"].as_u64().unwrap_or(0);
            let share = (100 * kernel).checked_div(all).unwrap_or(0);
            let end = match e["end"]["how"].as_str().unwrap_or("") {
                "completed" => "completed".to_owned(),
                "client_error" => format!(
                    "client error {}: {}",
                    cell(&e["end"]["code"]),
                    cell(&e["end"]["message"])
                ),
                "timed_out" => {
                    format!("timed out after {} blocks", cell(&e["end"]["acked_blocks"]))
                }
                "refused" => format!("refused: {}", cell(&e["end"]["why"])),
                other => other.to_owned(),
            };
            (
                format!("TFTP {}", cell(&e["path"])),
                format!(
                    "{end}; {} bytes, blksize {}, window {}, {} ms, {} retransmits, kernel {share}%",
                    cell(&e["size"]),
                    cell(&e["blksize"]),
                    cell(&e["windowsize"]),
                    cell(&e["ms"]),
                    cell(&e["retransmits"]),
                ),
            )
        }
        "http" => (
            format!("HTTP {}", cell(&e["path"])),
            format!(
                "{} {}, {} bytes, {} ms",
                cell(&e["status"]),
                if e["complete"] == true {
                    "complete"
                } else {
                    "INCOMPLETE"
                },
                cell(&e["bytes"]),
                cell(&e["ms"])
            ),
        ),
        "provisioned" => ("provisioned".to_owned(), String::new()),
        other => (other.to_owned(), String::new()),
    }
}

/// The rack: machines per stage, failures by kind, the failed and the slowest.
pub(super) fn rack_text(view: &Value) -> String {
    let mut out = format!(
        "{} machine(s) booting since {}, {} failed (at {})\n",
        cell(&view["machines"]),
        clock(view["since_ms"].as_u64().unwrap_or(0)),
        cell(&view["failed"]),
        clock(view["now_ms"].as_u64().unwrap_or(0)),
    );
    let mut stages = Table::new(&["STAGE", "MACHINES"]);
    for s in STAGES {
        stages.row(vec![s.to_owned(), cell(&view["stages"][s])]);
    }
    out.push_str(&stages.render());
    if let Some(failures) = view["failures"].as_object().filter(|f| !f.is_empty()) {
        let mut t = Table::new(&["FAILURE", "MACHINES"]);
        for (why, n) in failures {
            t.row(vec![why.clone(), cell(n)]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(failed) = view["failed_machines"].as_array().filter(|f| !f.is_empty()) {
        let mut t = Table::new(&["FAILED MAC", "STAGE", "WHY"]);
        for m in failed {
            t.row(vec![cell(&m["mac"]), cell(&m["stage"]), cell(&m["why"])]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(slowest) = view["slowest"].as_array().filter(|s| !s.is_empty()) {
        let mut t = Table::new(&["SLOWEST MAC", "STAGE", "SECONDS"]);
        for m in slowest {
            let seconds = m["seconds"].as_f64().unwrap_or(0.0);
            t.row(vec![
                cell(&m["mac"]),
                cell(&m["stage"]),
                format!("{seconds:.1}"),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Unix milliseconds as UTC wall-clock time, `2026-12-01 23:59:01.250Z`.
fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(clock(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(clock(1_796_169_541_250), "2026-12-01 23:59:01.250Z");
        assert_eq!(clock(951_782_400_000), "2000-02-29 00:00:00.000Z");
    }

    #[test]
    fn a_boot_reads_as_its_stages_then_its_events() {
        let answer = json!({"mac": "52:54:00:00:00:01", "boots": [{
            "started_ms": 1_000_000, "stage": "nbp", "failure": null,
            "stages": {"power_on": 0.0, "dhcp": 0.2, "nbp": 1.5},
            "events": [
                {"at_ms": 1_000_000, "kind": "dhcp", "port": 67, "asked": "DISCOVER", "answered": "OFFER", "client": "firmware", "address": "10.0.0.5"},
                {"at_ms": 1_001_500, "kind": "tftp", "path": "ipxe.efi", "size": 1000, "blksize": 1468, "windowsize": 4, "ms": 30,
                 "retransmits": 0, "user_blocks": 1, "xdp_blocks": 3, "tc_blocks": 0, "end": {"how": "completed"}}
            ],
            "events_dropped": 0
        }]});
        let text = boots_text(&answer);
        assert!(
            text.contains("boot 1 of 1: began 1970-01-01 00:16:40.000Z, reached nbp\n"),
            "{text}"
        );
        assert!(text.contains("dhcp      0.200 s"), "{text}");
        assert!(text.contains("+0.000  DISCOVER → OFFER"), "{text}");
        assert!(
            text.contains(
                "completed; 1000 bytes, blksize 1468, window 4, 30 ms, 0 retransmits, kernel 75%"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_clients_control_characters_never_reach_the_terminal() {
        let answer = json!({"mac": "52:54:00:00:00:01", "boots": [{
            "started_ms": 0, "stage": "dhcp", "failure": "TFTP \u{1b}[2Jx: file not found",
            "stages": {"power_on": 0.0}, "events_dropped": 0,
            "events": [{"at_ms": 0, "kind": "tftp", "path": "\u{1b}[2Jx", "size": 0, "blksize": 0,
                        "windowsize": 0, "ms": 0, "retransmits": 0, "user_blocks": 0, "xdp_blocks": 0,
                        "tc_blocks": 0, "end": {"how": "refused", "why": "file not found"}}]
        }]});
        let text = boots_text(&answer);
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("TFTP \\u{1b}[2Jx"), "{text}");
    }

    #[test]
    fn a_failed_rack_names_why() {
        let view = json!({"since_ms": 0, "now_ms": 0, "machines": 2, "failed": 1,
            "stages": {"power_on": 0, "dhcp": 1, "nbp": 1},
            "failures": {"TFTP missing.efi": 1},
            "failed_machines": [{"mac": "52:54:00:00:00:02", "stage": "dhcp", "why": "TFTP missing.efi: file not found"}],
            "slowest": [{"mac": "52:54:00:00:00:01", "stage": "nbp", "seconds": 1.5}]});
        let text = rack_text(&view);
        assert!(text.starts_with("2 machine(s) booting since"), "{text}");
        assert!(
            text.contains("52:54:00:00:00:02  dhcp   TFTP missing.efi: file not found"),
            "{text}"
        );
        assert!(text.contains("52:54:00:00:00:01  nbp    1.5"), "{text}");
    }
}
