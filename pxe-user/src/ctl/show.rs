//! How `pxed ctl` shows what the API answered: tables and key/value pairs.

use std::time::SystemTime;

use serde_json::Value;

use super::table::{pairs, Table};

/// A JSON value as a cell: strings bare, null as `-`. Control characters
/// (a client's error message, a requested path) are shown escaped, never
/// sent to the terminal.
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        Value::String(s) if s.chars().any(char::is_control) => {
            s.chars().flat_map(char::escape_default).collect()
        }
        Value::String(s) => s.clone(),
        Value::Object(map) if map.is_empty() => "-".to_owned(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

pub(super) fn machines_table(list: &Value) -> String {
    let mut t = Table::new(&["MAC", "PROFILE", "NETBOOT", "ADDRESS", "LABELS", "SOURCE"]);
    for m in list.as_array().into_iter().flatten() {
        t.row(vec![
            cell(&m["mac"]),
            cell(&m["profile"]),
            cell(&m["netboot"]),
            cell(&m["address"]),
            cell(&m["labels"]),
            // A write answers the record itself, which is the API's.
            m.get("source").map_or_else(|| "api".to_owned(), cell),
        ]);
    }
    t.render()
}

pub(super) fn machine_pairs(m: &Value) -> String {
    let mut rows: Vec<(&str, String)> = [
        "mac", "profile", "netboot", "hostname", "address", "arch", "client", "labels", "vars",
    ]
    .iter()
    .map(|k| (*k, cell(&m[*k])))
    .collect();
    rows.push((
        "source",
        m.get("source").map_or_else(|| "api".to_owned(), cell),
    ));
    rows.push(("revision", cell(&m["revision"])));
    pairs(&rows)
}

pub(super) fn leases_table(list: &Value) -> String {
    let now = unix_now();
    let mut t = Table::new(&["IP", "MAC", "STATE", "EXPIRES", "HOSTNAME"]);
    for l in list.as_array().into_iter().flatten() {
        t.row(vec![
            cell(&l["ip"]),
            cell(&l["mac"]),
            cell(&l["state"]),
            l["expires"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |e| relative(e, now)),
            cell(&l["hostname"]),
        ]);
    }
    t.render()
}

/// A file's profile shows revision 0: the API has never written it.
pub(super) fn source_of_profile(p: &Value) -> &'static str {
    if p["revision"].as_u64().unwrap_or(0) > 0 {
        "api"
    } else {
        "file"
    }
}

pub(super) fn profiles_table(list: &Value) -> String {
    let mut t = Table::new(&["NAME", "SOURCE", "KERNEL", "INITRD", "UEFI_X64", "BIOS"]);
    for p in list.as_array().into_iter().flatten() {
        t.row(vec![
            cell(&p["name"]),
            source_of_profile(p).to_owned(),
            cell(&p["kernel"]),
            cell(&p["initrd"]),
            cell(&p["boot_files"]["uefi_x64"]),
            cell(&p["boot_files"]["bios"]),
        ]);
    }
    t.render()
}

pub(super) fn profile_pairs(p: &Value) -> String {
    let mut rows: Vec<(&str, String)> = vec![("name", cell(&p["name"]))];
    for slot in ["bios", "uefi_x64", "uefi_arm64", "uefi_ia32", "rpi"] {
        rows.push((slot, cell(&p["boot_files"][slot])));
    }
    for k in ["kernel", "initrd", "cmdline"] {
        rows.push((k, cell(&p[k])));
    }
    rows.push(("source", source_of_profile(p).to_owned()));
    rows.push(("revision", cell(&p["revision"])));
    let mut text = pairs(&rows);
    if let Some(script) = p["ipxe_script"].as_str().filter(|s| !s.is_empty()) {
        text.push_str("ipxe_script:\n");
        for line in script.lines() {
            text.push_str("  ");
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

pub(super) fn health_pairs(h: &Value) -> String {
    let mut rows: Vec<(&str, String)> = vec![("status", cell(&h["status"]))];
    let mut details = String::new();
    if let Some(checks) = h["checks"].as_object() {
        for (name, check) in checks {
            let state = if check["ok"] == true {
                "ok".to_owned()
            } else {
                format!("failing: {}", cell(&check["why"]))
            };
            rows.push((name.as_str(), state));
            for d in check["detail"].as_array().into_iter().flatten() {
                // The programs' detail: an attachment per interface.
                let line = match (d["interface"].as_str(), d["attached"].as_str()) {
                    (Some(interface), Some(how)) => format!("{interface}: {how}"),
                    _ => cell(d),
                };
                details.push_str(&format!("  {name}  {line}\n"));
            }
        }
    }
    pairs(&rows) + &details
}

/// `in 59m`, `expired 3m ago`: when a lease ends, from now.
pub(super) fn relative(expires: u64, now: u64) -> String {
    let span = |s: u64| match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    };
    if expires >= now {
        format!("in {}", span(expires - now))
    } else {
        format!("expired {} ago", span(now - expires))
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
