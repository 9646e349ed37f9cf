//! `pxed ctl` against the real daemon: each subcommand shows what the API
//! holds and changes what it says; errors print the API's message and exit
//! non-zero; `reimage` by label changes every machine with it and no other.
//! The daemon runs in the server namespace of a lab, and so does `pxed ctl`
//! (the API listens on that namespace's loopback). Needs root.

mod common;

use std::{path::PathBuf, process::Output, time::Duration};

use common::{dhcp_client as dc, PXED};
use pxe_lab::{Lab, Netns};
use serde_json::Value;

const TOKEN: &str = "ctl-test-token-0123456789abcdef";
/// `pxed ctl`'s default URL, so most calls need no --url.
const API_PORT: u16 = 8067;
const POOL: &str = "198.18.0.100-198.18.0.150";
const MACHINE: &str = "52:54:00:00:70:01";
const FILE_MACHINE: &str = "52:54:00:00:70:09";

const CONFIG: &str = r#"
default_profile = "default"

[[profile]]
name = "default"

[[profile]]
name = "installer"
kernel = "installer/vmlinuz"
cmdline = "pxed.done={{provision_url}} pxed.token={{provision_token}}"

[[machine]]
mac = "52:54:00:00:70:09"
hostname = "from-the-file"
"#;

struct Pxed {
    _lab: Lab,
    server: Netns,
    client: Netns,
    work: tempfile::TempDir,
}

impl Pxed {
    fn start() -> Option<Self> {
        if !pxe_lab::privileged("api_ctl") {
            return None;
        }
        let lab = Lab::new().expect("creating the lab");
        let pxe_lab::Pair { server, client } = lab
            .pair()
            .client_addr(pxe_lab::CLIENT_CIDR)
            .build()
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        std::fs::create_dir_all(root.join("installer")).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"ipxe").unwrap();
        std::fs::write(work.path().join("pxed.toml"), CONFIG).unwrap();
        std::fs::write(work.path().join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(work.path().join("wrong-token"), "not-the-token-at-all\n").unwrap();
        let path = |name: &str| work.path().join(name).to_str().unwrap().to_owned();
        let api = format!("127.0.0.1:{API_PORT}");
        let args = [
            "--interface",
            "eth0",
            "--boot-root",
            &path("root"),
            "--config",
            &path("pxed.toml"),
            "--dhcp",
            "full",
            "--range",
            POOL,
            "--lease-file",
            &path("leases.redb"),
            "--inventory-file",
            &path("inventory.redb"),
            "--api",
            &api,
            "--api-token-file",
            &path("token"),
            "--stats-interval",
            "0",
        ];
        lab.spawn_logged(&server, PXED, &args, &work.path().join("pxed.log"))
            .expect("starting pxed");
        let pxed = Self {
            _lab: lab,
            server,
            client,
            work,
        };
        assert!(
            pxed.server
                .wait_for_tcp_port(API_PORT, Duration::from_secs(20)),
            "the API did not come up:\n{}",
            pxed.log()
        );
        Some(pxed)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("pxed.log")).unwrap_or_default()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// `pxed ctl ARGS` in the server namespace, with none of the caller's
    /// PXED_API_* settings: `env` gives the ones the call is to see.
    fn ctl_env(&self, env: &[(&str, &str)], args: &[&str]) -> Run {
        let mut full = vec!["ctl"];
        full.extend_from_slice(args);
        let mut command = self.server.command(PXED, &full);
        for name in ["PXED_API_URL", "PXED_API_TOKEN", "PXED_API_TOKEN_FILE"] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let out = command
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running pxed ctl");
        Run::of(args, out)
    }

    /// `pxed ctl --token-file TOKEN ARGS`.
    fn ctl(&self, args: &[&str]) -> Run {
        let token = self.file("token");
        let mut full = vec!["--token-file", token.to_str().unwrap()];
        full.extend_from_slice(args);
        self.ctl_env(&[], &full)
    }

    /// `pxed ctl ARGS` that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let run = self.ctl(args);
        assert_eq!(run.code, Some(0), "{run:?}\npxed's log:\n{}", self.log());
        run.stdout
    }

    /// `pxed ctl --json ARGS` that must succeed; its JSON.
    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ok(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// `pxed ctl ARGS` that must fail with status 1 and `says` on stderr.
    fn fails(&self, args: &[&str], says: &str) -> Run {
        let run = self.ctl(args);
        run.fails(says);
        run
    }
}

#[derive(Debug)]
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(args: &[&str], out: Output) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn fails(&self, says: &str) {
        assert_eq!(self.code, Some(1), "{self:?}");
        assert!(
            self.stderr.starts_with("pxed ctl: ") && self.stderr.contains(says),
            "{:?}: want {says:?} in {:?}",
            self.args,
            self.stderr
        );
    }
}

/// The row of `mac` in a table, split into its cells.
fn row<'a>(table: &'a str, mac: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.contains(mac))
        .unwrap_or_else(|| panic!("no row for {mac} in:\n{table}"))
        .split_whitespace()
        .collect()
}

/// The value of `key` in a `key  value` listing.
fn field<'a>(listing: &'a str, key: &str) -> &'a str {
    listing
        .lines()
        .find_map(|l| l.strip_prefix(key).filter(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {key} in:\n{listing}"))
        .trim()
}

#[test]
fn each_subcommand_shows_and_changes_what_the_api_holds() {
    let Some(p) = Pxed::start() else {
        return;
    };
    let health = p.ok(&["health"]);
    assert_eq!(field(&health, "status"), "ok", "{health}");
    assert_eq!(field(&health, "lease_store"), "ok", "{health}");

    // The file's machine is listed, as the file's.
    let table = p.ok(&["machines"]);
    assert_eq!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["MAC", "PROFILE", "NETBOOT", "ADDRESS", "LABELS", "SOURCE"]
    );
    assert_eq!(
        row(&table, FILE_MACHINE),
        [FILE_MACHINE, "-", "true", "-", "-", "file"]
    );

    // set is a PATCH: what it names changes, the rest stays.
    let shown = p.ok(&[
        "machine",
        MACHINE,
        "set",
        "--profile",
        "installer",
        "--hostname",
        "node1",
        "--label",
        "rack=r12",
        "--label",
        "row=3",
        "--var",
        "role=db",
    ]);
    assert_eq!(field(&shown, "profile"), "installer", "{shown}");
    assert_eq!(field(&shown, "labels"), "rack=r12,row=3");
    assert_eq!(field(&shown, "source"), "api");
    assert_eq!(field(&shown, "revision"), "1");
    let shown = p.ok(&[
        "machine",
        MACHINE,
        "set",
        "--netboot",
        "false",
        "--address",
        "198.18.0.120",
    ]);
    assert_eq!(field(&shown, "netboot"), "false", "{shown}");
    assert_eq!(field(&shown, "address"), "198.18.0.120");
    assert_eq!(field(&shown, "hostname"), "node1", "a PATCH keeps the rest");
    let shown = p.ok(&["machine", MACHINE]);
    assert_eq!(field(&shown, "revision"), "2", "{shown}");
    let json = p.json(&[
        "machine",
        MACHINE,
        "set",
        "--unset",
        "address",
        "--unset",
        "label.row",
        "--if-match",
        "2",
    ]);
    assert_eq!(json["address"], Value::Null, "{json}");
    assert_eq!(json["labels"], serde_json::json!({"rack": "r12"}));
    assert_eq!(json["revision"], 3);

    // The list, filtered by label, as a table and as JSON.
    let table = p.ok(&["machines", "--selector", "rack=r12"]);
    assert_eq!(
        row(&table, MACHINE),
        [MACHINE, "installer", "false", "-", "rack=r12", "api"]
    );
    assert_eq!(table.lines().count(), 2, "{table}");
    let json = p.json(&["machines", "--netboot", "true"]);
    let macs: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mac"].as_str().unwrap())
        .collect();
    assert_eq!(macs, [FILE_MACHINE]);

    // Profiles: the list, and one whole.
    let table = p.ok(&["profiles"]);
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["default", "installer"], "{table}");
    let installer = p.ok(&["profile", "installer"]);
    assert_eq!(field(&installer, "kernel"), "installer/vmlinuz");
    assert!(field(&installer, "cmdline").contains("{{provision_token}}"));

    // Leases: a machine leases; the filters find it or not.
    let leased = [0x52, 0x54, 0, 0, 0x70, 0x08];
    let ip = p
        .client
        .run(move || dc::dora(&dc::client_socket("eth0"), leased, 0x7101).unwrap())
        .unwrap();
    let table = p.ok(&["leases", "--mac", "52:54:00:00:70:08"]);
    let cells = row(&table, "52:54:00:00:70:08");
    assert_eq!(
        cells[..3],
        [ip.to_string().as_str(), "52:54:00:00:70:08", "active"],
        "{table}"
    );
    assert!(cells[3] == "in", "expires in the future: {table}");
    let json = p.json(&["leases", "--subnet", "198.18.0.0/24", "--state", "active"]);
    assert_eq!(json[0]["ip"], ip.to_string(), "{json}");
    assert_eq!(
        p.ok(&["leases", "--subnet", "10.0.0.0/8"]).lines().count(),
        1
    );

    // Delete: the API's record goes; a file machine's file entry comes back.
    let said = p.ok(&["machine", MACHINE, "delete"]);
    assert!(said.contains("deleted"), "{said}");
    p.fails(&["machine", MACHINE], "no machine");
    p.ok(&["machine", FILE_MACHINE, "set", "--hostname", "from-the-api"]);
    let said = p.ok(&["machine", FILE_MACHINE, "delete"]);
    assert!(
        said.contains("the config file's entry applies again"),
        "{said}"
    );
    assert_eq!(field(&said, "hostname"), "from-the-file", "{said}");

    // URL and token from the environment.
    let token_file = p.file("token");
    for env in [
        vec![("PXED_API_TOKEN", TOKEN)],
        vec![("PXED_API_TOKEN_FILE", token_file.to_str().unwrap())],
        vec![
            ("PXED_API_TOKEN", TOKEN),
            ("PXED_API_URL", "http://127.0.0.1:8067/api/v1/"),
        ],
    ] {
        let run = p.ctl_env(&env, &["health"]);
        assert_eq!(run.code, Some(0), "{env:?}: {run:?}");
    }
    let run = p.ctl_env(&[("PXED_API_URL", "http://127.0.0.1:9")], &["health"]);
    run.fails("no API token");
    let run = p.ctl_env(
        &[
            ("PXED_API_URL", "http://127.0.0.1:9"),
            ("PXED_API_TOKEN", TOKEN),
        ],
        &["health"],
    );
    run.fails("cannot reach the pxed API at http://127.0.0.1:9");
}

#[test]
fn errors_print_the_apis_message_and_exit_non_zero() {
    let Some(p) = Pxed::start() else {
        return;
    };
    let wrong = p.file("wrong-token");
    let run = p.ctl_env(&[], &["--token-file", wrong.to_str().unwrap(), "machines"]);
    run.fails("the bearer token is wrong (HTTP 401)");
    assert!(run.stdout.is_empty(), "{run:?}");

    p.fails(
        &["machine", "nope"],
        "mac: \"nope\" is not a MAC address (want aa:bb:cc:dd:ee:ff) (HTTP 400)",
    );
    p.fails(
        &["machine", "52:54:00:00:70:zz", "set", "--netboot", "true"],
        "not a MAC address",
    );
    p.fails(
        &["machine", MACHINE, "set", "--profile", "ghost"],
        "profile: no profile named \"ghost\" (HTTP 422)",
    );
    p.fails(
        &["machine", MACHINE, "set", "--address", "10.1.2.3"],
        "address: 10.1.2.3 is in none of the DHCP subnets (HTTP 422)",
    );
    p.fails(
        &["machine", MACHINE, "set", "--arch", "vax"],
        "arch \"vax\" is unknown",
    );
    p.ok(&["machine", MACHINE, "set", "--address", "198.18.0.121"]);
    p.fails(
        &[
            "machine",
            "52:54:00:00:70:02",
            "set",
            "--address",
            "198.18.0.121",
        ],
        "198.18.0.121 is already reserved for another machine (HTTP 409)",
    );
    p.fails(
        &[
            "machine",
            MACHINE,
            "set",
            "--netboot",
            "false",
            "--if-match",
            "7",
        ],
        "the record is at revision 1, not 7: read it again and retry (HTTP 412)",
    );
    p.fails(&["machine", "52:54:00:00:70:03", "delete"], "(HTTP 404)");
    p.fails(&["profile", "ghost"], "no profile \"ghost\" (HTTP 404)");
    p.fails(&["leases", "--state", "lost"], "state: \"lost\"");
    p.fails(&["machine", MACHINE, "set"], "nothing to set");
    assert_eq!(
        field(&p.ok(&["machine", MACHINE]), "revision"),
        "1",
        "refused changes changed nothing"
    );

    // A wrong command line is clap's: status 2, and the usage.
    let run = p.ctl(&["machine", MACHINE, "set", "--netboot", "maybe"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let run = p.ctl(&["reimage", "--profile", "installer"]);
    assert_eq!(run.code, Some(2), "a reimage names its machines: {run:?}");
}

#[test]
fn reimage_by_label_changes_every_machine_with_it_and_no_other() {
    let Some(p) = Pxed::start() else {
        return;
    };
    let rack = |n: u8| format!("52:54:00:00:71:{n:02x}");
    for n in 1..=6u8 {
        let label = if n <= 4 { "rack=r12" } else { "rack=r13" };
        p.ok(&[
            "machine",
            &rack(n),
            "set",
            "--label",
            label,
            "--netboot",
            "false",
        ]);
    }
    let said = p.ok(&["reimage", "--label", "rack=r12", "--profile", "installer"]);
    assert!(
        said.starts_with("4 machine(s) now netboot profile installer"),
        "{said}"
    );
    for n in 1..=4u8 {
        assert_eq!(
            row(&said, &rack(n)),
            [
                rack(n).as_str(),
                "installer",
                "true",
                "-",
                "rack=r12",
                "api"
            ]
        );
    }
    let after = p.json(&["machines", "--selector", "rack=r12"]);
    let after = after.as_array().unwrap();
    assert_eq!(after.len(), 4);
    assert!(
        after
            .iter()
            .all(|m| m["profile"] == "installer" && m["netboot"] == true),
        "{after:?}"
    );
    let other = p.json(&["machines", "--selector", "rack=r13"]);
    assert!(
        other
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["profile"].is_null() && m["netboot"] == false),
        "the other rack is untouched: {other}"
    );

    // By MAC, beside a label; labels must all match.
    let json = p.json(&[
        "reimage",
        "--mac",
        &rack(5),
        "--label",
        "rack=r12",
        "--label",
        "row=9",
        "--profile",
        "default",
    ]);
    assert_eq!(json["changed"], 1, "{json}");
    assert_eq!(json["machines"][0]["mac"], rack(5));
    p.fails(
        &["reimage", "--label", "rack=r99", "--profile", "installer"],
        "macs: no machine is named or selected (HTTP 422)",
    );
    p.fails(
        &["reimage", "--label", "rack=r13", "--profile", "ghost"],
        "profile: no profile named \"ghost\"",
    );
}
