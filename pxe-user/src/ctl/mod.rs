//! `pxed ctl`: the operator API (docs/API.md) from a shell. Each subcommand
//! is one or two HTTP calls; what the API answers is shown as a table, or
//! as its JSON with `--json`. An error answer prints the API's `error`
//! message and exits 1, so scripts can stop on it.
//!
//! Blocking and single-threaded: no tokio runtime is started for a command
//! line that makes one call and exits.

mod boots;
mod client;
mod show;
mod table;

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::{ArgAction, ArgGroup, Args, Subcommand};
use serde_json::{json, Map, Value};

use self::{
    boots::{boots_text, rack_text},
    client::{api_error, segment, Answer, Client},
    show::{
        health_pairs, leases_table, machine_pairs, machines_table, profile_pairs, profiles_table,
    },
};

/// Where `pxed --api 127.0.0.1:8067`, the documented example, listens.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8067";

const EXAMPLES: &str = "\
Examples:
  export PXED_API_TOKEN_FILE=/etc/pxed/api-token    # the file pxed --api-token-file reads
  pxed ctl health
  pxed ctl machines --selector rack=r12
  pxed ctl machine 52:54:00:12:34:56
  pxed ctl machine 52:54:00:12:34:56 set --profile installer --netboot true --label rack=r12
  pxed ctl machine 52:54:00:12:34:56 set --netboot false
  pxed ctl machine 52:54:00:12:34:56 delete
  pxed ctl reimage --label rack=r12 --profile installer
  pxed ctl leases --subnet 10.9.0.0/24 --state active
  pxed ctl boots 52:54:00:12:34:56
  pxed ctl watch --since 15m
  pxed ctl --url http://10.0.0.5:8067 profiles --json

The URL is --url, else $PXED_API_URL, else http://127.0.0.1:8067. The token
is the first line of --token-file FILE, else $PXED_API_TOKEN (the token
itself), else the first line of $PXED_API_TOKEN_FILE.

Exit status: 0 done; 1 the API refused (its message is printed), could not
be reached, or (health) reports a failing check; 2 the command line is wrong.";

/// Read and change a running pxed through its operator API.
#[derive(Debug, Args)]
#[command(after_long_help = EXAMPLES)]
pub struct CtlArgs {
    /// The API's address: what pxed's --api listens on.
    #[arg(long, global = true, help_heading = "Connection", env = "PXED_API_URL", default_value = DEFAULT_URL, value_name = "URL")]
    pub url: String,

    /// File holding the API token (its first line), e.g. the daemon's
    /// --api-token-file [default: $PXED_API_TOKEN, else $PXED_API_TOKEN_FILE].
    #[arg(long, global = true, help_heading = "Connection", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true, help_heading = "Connection")]
    pub json: bool,

    /// Give up on a call after this long.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "SECONDS",
        default_value_t = 30
    )]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List machines: the API's records and the config file's others.
    ///
    /// Columns: mac, profile (`-`: the default profile), netboot, address
    /// (reservation), labels, source (`api`: the API's record, `file`: only
    /// the config file's).
    #[command(after_help = "Example:\n  pxed ctl machines --selector rack=r12,role=db")]
    Machines {
        /// Only machines with every one of these labels: KEY=VALUE[,KEY=VALUE].
        #[arg(long, value_name = "LABELS")]
        selector: Option<String>,
        /// Only machines on this profile.
        #[arg(long)]
        profile: Option<String>,
        /// Only machines that netboot (true) or boot from disk (false).
        #[arg(long, action = ArgAction::Set, value_name = "BOOL")]
        netboot: Option<bool>,
    },

    /// Show one machine, or change or delete it.
    #[command(after_help = "\
Examples:
  pxed ctl machine 52:54:00:12:34:56
  pxed ctl machine 52:54:00:12:34:56 set --profile installer --label rack=r12 --var role=db
  pxed ctl machine 52:54:00:12:34:56 set --netboot false
  pxed ctl machine 52:54:00:12:34:56 set --unset address --unset label.row
  pxed ctl machine 52:54:00:12:34:56 delete")]
    Machine {
        /// The machine's MAC, e.g. 52:54:00:12:34:56 (or with dashes).
        mac: String,
        #[command(subcommand)]
        action: Option<MachineAction>,
    },

    /// List leases (full DHCP mode), filtered.
    #[command(after_help = "Example:\n  pxed ctl leases --subnet 10.9.0.0/24 --state active")]
    Leases {
        #[arg(long)]
        mac: Option<String>,
        /// One address.
        #[arg(long)]
        ip: Option<String>,
        /// A network, e.g. 10.9.0.0/24.
        #[arg(long, value_name = "NET")]
        subnet: Option<String>,
        /// active, released or declined.
        #[arg(long)]
        state: Option<String>,
    },

    /// List profiles: the config file's, and the API's over them.
    Profiles,

    /// Show one profile whole (boot files, kernel, initrd, cmdline, script).
    Profile { name: String },

    /// Put machines on a profile and netboot them: one bulk call.
    ///
    /// Every machine with all of the --label labels, and every --mac, gets
    /// the profile and netboot=true; their next boot runs it. The installer
    /// then calls `provisioned` and the machine boots from its disk again.
    #[command(
        group(ArgGroup::new("machines").args(["label", "mac"]).required(true).multiple(true)),
        after_help = "\
Examples:
  pxed ctl reimage --label rack=r12 --profile installer
  pxed ctl reimage --mac 52:54:00:12:34:56 --mac 52:54:00:12:34:57 --profile installer"
    )]
    Reimage {
        /// Machines with this label, KEY=VALUE (repeatable: all must match).
        #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
        label: Vec<(String, String)>,
        /// A machine by MAC (repeatable).
        #[arg(long)]
        mac: Vec<String>,
        /// The profile they boot, e.g. installer.
        #[arg(long)]
        profile: String,
    },

    /// Is pxed well: the lease store, the programs, each ok or why not.
    Health,

    /// One machine's recent boots as pxed saw them: each stage with its
    /// time since power-on, every DHCP exchange, file and provisioning
    /// call, and what went wrong.
    #[command(after_help = "Example:\n  pxed ctl boots 52:54:00:12:34:56")]
    Boots {
        /// The machine's MAC.
        mac: String,
    },

    /// A rack booting, live: machines per stage, failures and why, the
    /// slowest. Refreshes until interrupted (Ctrl-C); --once prints once.
    #[command(after_help = "\
Examples:
  pxed ctl watch                      # every machine active in the last hour
  pxed ctl watch --since 10m --every 5
  pxed ctl watch --once --json | jq .stages")]
    Watch {
        /// Machines active since: a duration ago (90s, 10m, 2h, 1d) or Unix milliseconds.
        #[arg(long, default_value = "1h")]
        since: String,
        /// How many failed and slowest machines to list.
        #[arg(long, default_value_t = 10, value_name = "N")]
        slowest: usize,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2, value_name = "SECONDS")]
        every: u64,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachineAction {
    /// Show the machine (the default).
    Show,
    /// Change some fields (a merge PATCH); the others stay as they are.
    Set(SetArgs),
    /// Delete the API's record; the config file's entry, if any, applies again.
    Delete {
        /// Only if the record is still at this revision (its ETag).
        #[arg(long, value_name = "REVISION")]
        if_match: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The profile it boots.
    #[arg(long)]
    profile: Option<String>,
    /// true: boot from the network; false: answered with no boot file, so
    /// the firmware goes on to its disk.
    #[arg(long, action = ArgAction::Set, value_name = "BOOL")]
    netboot: Option<bool>,
    /// Its host name (DHCP option 12, {{hostname}} in scripts).
    #[arg(long)]
    hostname: Option<String>,
    /// A fixed address (DHCP reservation, full mode).
    #[arg(long, value_name = "IP")]
    address: Option<String>,
    /// Answer it as this architecture, whatever it says (bios, uefi-x64, ...).
    #[arg(long)]
    arch: Option<String>,
    /// Answer it as this client (pxe, ipxe, http).
    #[arg(long)]
    client: Option<String>,
    /// A label, KEY=VALUE (repeatable); other labels stay.
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    label: Vec<(String, String)>,
    /// A template variable for its scripts ({{var.KEY}}), KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    var: Vec<(String, String)>,
    /// Remove a field: profile, hostname, address, arch, client, label.KEY
    /// or var.KEY (repeatable).
    #[arg(long, value_name = "FIELD")]
    unset: Vec<String>,
    /// Only if the record is still at this revision (its ETag).
    #[arg(long, value_name = "REVISION")]
    if_match: Option<u64>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs one `pxed ctl` command; prints what went wrong and fails if it did.
pub fn run(args: CtlArgs) -> ExitCode {
    match execute(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pxed ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &CtlArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(args)?;
    let out = &mut std::io::stdout().lock();
    match &args.command {
        CtlCommand::Machines {
            selector,
            profile,
            netboot,
        } => {
            let query = given([
                ("selector", selector.clone()),
                ("profile", profile.clone()),
                ("netboot", netboot.map(|b| b.to_string())),
            ]);
            let list = client.get("/machines", &query)?;
            show(out, args, &list, machines_table)?;
        }
        CtlCommand::Machine { mac, action } => {
            let path = format!("/machines/{}", segment(mac));
            match action.as_ref().unwrap_or(&MachineAction::Show) {
                MachineAction::Show => {
                    let machine = client.get(&path, &[])?;
                    show(out, args, &machine, machine_pairs)?;
                }
                MachineAction::Set(set) => {
                    let written =
                        client.send("PATCH", &path, Some(&set_patch(set)?), set.if_match)?;
                    show(out, args, &written, machine_pairs)?;
                }
                MachineAction::Delete { if_match } => {
                    client.send("DELETE", &path, None, *if_match)?;
                    if !args.json {
                        delete_note(out, &client, &path, mac)?;
                    }
                }
            }
        }
        CtlCommand::Leases {
            mac,
            ip,
            subnet,
            state,
        } => {
            let query = given([
                ("mac", mac.clone()),
                ("ip", ip.clone()),
                ("subnet", subnet.clone()),
                ("state", state.clone()),
            ]);
            let list = client.get("/leases", &query)?;
            show(out, args, &list, leases_table)?;
        }
        CtlCommand::Profiles => {
            let list = client.get("/profiles", &[])?;
            show(out, args, &list, profiles_table)?;
        }
        CtlCommand::Profile { name } => {
            let profile = client.get(&format!("/profiles/{}", segment(name)), &[])?;
            show(out, args, &profile, profile_pairs)?;
        }
        CtlCommand::Reimage {
            label,
            mac,
            profile,
        } => {
            let mut body = json!({ "set": { "profile": profile, "netboot": true } });
            if !mac.is_empty() {
                body["macs"] = json!(mac);
            }
            if !label.is_empty() {
                body["selector"] = json!(selector(label));
            }
            let answer = client.send("POST", "/machines:bulk", Some(&body), None)?;
            show(out, args, &answer, |a| {
                format!(
                    "{} machine(s) now netboot profile {profile}:\n{}",
                    a["changed"],
                    machines_table(&a["machines"])
                )
            })?;
        }
        CtlCommand::Boots { mac } => {
            let boots = client.get(&format!("/machines/{}/boots", segment(mac)), &[])?;
            show(out, args, &boots, boots_text)?;
        }
        CtlCommand::Watch {
            since,
            slowest,
            every,
            once,
        } => {
            let query = [("since", since.clone()), ("slowest", slowest.to_string())];
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
            loop {
                let view = client.get("/boots", &query)?;
                if terminal && !*once && !args.json {
                    write!(out, "\x1b[2J\x1b[H")?; // clear the screen, cursor home
                }
                show(out, args, &view, rack_text)?;
                out.flush()?;
                if *once || args.json {
                    break;
                }
                if !terminal {
                    writeln!(out)?;
                }
                std::thread::sleep(std::time::Duration::from_secs((*every).max(1)));
            }
        }
        CtlCommand::Health => {
            let health = client.call("GET", "/health", &[], None, None)?;
            if health.status != 200 && health.status != 503 {
                return Err(api_error(&health));
            }
            show(out, args, &health, health_pairs)?;
            if health.json["status"] != "ok" {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The query parameters whose flags were given.
fn given<const N: usize>(
    params: [(&'static str, Option<String>); N],
) -> Vec<(&'static str, String)> {
    params
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
}

/// `--label k=v` pairs as the API's selector, `k=v,k2=v2`.
fn selector(labels: &[(String, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The merge patch `set` sends: fields given are set, `--unset` ones null.
fn set_patch(set: &SetArgs) -> anyhow::Result<Value> {
    let mut patch = Map::new();
    for (field, value) in [
        ("profile", &set.profile),
        ("hostname", &set.hostname),
        ("address", &set.address),
        ("arch", &set.arch),
        ("client", &set.client),
    ] {
        if let Some(v) = value {
            patch.insert(field.to_owned(), json!(v));
        }
    }
    if let Some(n) = set.netboot {
        patch.insert("netboot".to_owned(), json!(n));
    }
    for (field, pairs) in [("labels", &set.label), ("vars", &set.var)] {
        if !pairs.is_empty() {
            let map: Map<String, Value> =
                pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            patch.insert(field.to_owned(), Value::Object(map));
        }
    }
    for name in &set.unset {
        match name.split_once('.') {
            Some(("label", key)) => unset_in(&mut patch, "labels", key),
            Some(("var", key)) => unset_in(&mut patch, "vars", key),
            None if ["profile", "hostname", "address", "arch", "client"].contains(&name.as_str()) => {
                patch.insert(name.clone(), Value::Null);
            }
            _ => bail!(
                "--unset {name}: name profile, hostname, address, arch, client, label.KEY or var.KEY"
            ),
        }
    }
    if patch.is_empty() {
        bail!("nothing to set: give --profile, --netboot, --hostname, --address, --arch, --client, --label, --var or --unset");
    }
    Ok(Value::Object(patch))
}

fn unset_in(patch: &mut Map<String, Value>, field: &str, key: &str) {
    let entry = patch
        .entry(field.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(map) = entry.as_object_mut() {
        map.insert(key.to_owned(), Value::Null);
    }
}

/// After a delete: whether the config file's entry shows again.
fn delete_note(
    out: &mut impl std::io::Write,
    client: &Client,
    path: &str,
    mac: &str,
) -> anyhow::Result<()> {
    let after = client.call("GET", path, &[], None, None)?;
    if after.status == 200 && after.json["source"] == "file" {
        writeln!(
            out,
            "{mac}: the API's record is deleted; the config file's entry applies again:"
        )?;
        write!(out, "{}", machine_pairs(&after.json))?;
    } else {
        writeln!(out, "{mac}: deleted")?;
    }
    Ok(())
}

/// Prints the answer: its JSON as the API sent it with `--json` (pipe it
/// to `jq`), else as `human` renders it.
fn show(
    out: &mut impl std::io::Write,
    args: &CtlArgs,
    answer: &Answer,
    human: impl Fn(&Value) -> String,
) -> anyhow::Result<()> {
    if args.json {
        writeln!(out, "{}", answer.text.trim_end())?;
    } else {
        write!(out, "{}", human(&answer.json))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn ctl(args: &[&str]) -> CtlArgs {
        let cli = Cli::try_parse_from(["pxed", "ctl"].iter().chain(args)).unwrap();
        match cli.command {
            Some(Command::Ctl(c)) => c,
            None => panic!("no ctl"),
        }
    }

    #[test]
    fn set_builds_a_merge_patch_of_what_it_names() {
        let args = ctl(&[
            "machine",
            "52:54:00:00:00:01",
            "set",
            "--profile",
            "installer",
            "--netboot",
            "false",
            "--label",
            "rack=r12",
            "--var",
            "role=db",
            "--unset",
            "address",
            "--unset",
            "label.row",
        ]);
        let CtlCommand::Machine {
            action: Some(MachineAction::Set(set)),
            ..
        } = args.command
        else {
            panic!("{:?}", args.command)
        };
        assert_eq!(
            set_patch(&set).unwrap(),
            json!({"profile": "installer", "netboot": false, "address": null,
                   "labels": {"rack": "r12", "row": null}, "vars": {"role": "db"}})
        );
        let empty = ctl(&["machine", "52:54:00:00:00:01", "set"]);
        let CtlCommand::Machine {
            action: Some(MachineAction::Set(set)),
            ..
        } = empty.command
        else {
            panic!()
        };
        assert!(set_patch(&set)
            .unwrap_err()
            .to_string()
            .contains("nothing to set"));
    }

    #[test]
    fn the_command_line_refuses_what_the_api_cannot_take() {
        let parse = |args: &[&str]| Cli::try_parse_from(["pxed", "ctl"].iter().chain(args));
        let e = parse(&["reimage", "--profile", "installer"]).unwrap_err();
        assert!(e.to_string().contains("--label"), "{e}");
        let e = parse(&["reimage", "--label", "rack", "--profile", "p"]).unwrap_err();
        assert!(e.to_string().contains("not KEY=VALUE"), "{e}");
        let e = parse(&["machine", "m", "set", "--netboot", "maybe"]).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        let e = Cli::try_parse_from(["pxed", "-i", "eth1", "ctl", "health"]).unwrap_err();
        assert!(
            e.to_string().contains("cannot be used with"),
            "daemon flags and ctl do not mix: {e}"
        );
        let cli = Cli::try_parse_from(["pxed", "-i", "eth1"]).unwrap();
        assert!(cli.command.is_none(), "no subcommand: the daemon");
        let reimage = ctl(&[
            "reimage",
            "--label",
            "rack=r12",
            "--label",
            "row=3",
            "--profile",
            "p",
        ]);
        let CtlCommand::Reimage { label, .. } = reimage.command else {
            panic!()
        };
        assert_eq!(selector(&label), "rack=r12,row=3");
    }

    #[test]
    fn cells_and_times_read_plainly() {
        use super::show::{cell, relative};
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&json!({"rack": "r12", "row": "3"})), "rack=r12,row=3");
        assert_eq!(cell(&json!({})), "-");
        assert_eq!(cell(&json!(false)), "false");
        assert_eq!(relative(1_000 + 3_540, 1_000), "in 59m");
        assert_eq!(relative(1_000 + 7_260, 1_000), "in 2h01m");
        assert_eq!(relative(1_000, 1_030), "expired 30s ago");
        assert_eq!(segment("52:54:00:00:00:01"), "52:54:00:00:00:01");
        assert_eq!(segment("rack=r12,row=3"), "rack%3Dr12%2Crow%3D3");
    }
}
