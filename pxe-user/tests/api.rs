//! The operator API against the real `pxed` with curl: every endpoint, its
//! errors and its 401s; a change answered the new way on every path (DHCP
//! from userspace and from the kernel's templates, the iPXE script, TFTP,
//! HTTP) as soon as the call returns; the installer's `provisioned` with its
//! machine's token; the inventory surviving SIGKILL. Needs root and curl.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::{dhcp_client as dc, have_tool, PXED, SERVER_IP};
use dhcproto::v4::{DhcpOption, MessageType};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use pxe_lab::{Lab, Netns};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789abcdef";
const API: &str = "127.0.0.1:8067";
const POOL: &str = "198.18.0.100-198.18.0.150";
/// The client namespace's own address: a machine reserved there can fetch
/// files from it, so TFTP and HTTP know which machine asks.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MACHINE: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x60, 0x01];
const MACHINE_TEXT: &str = "52:54:00:00:60:01";

const CONFIG: &str = r#"
default_profile = "default"

[[profile]]
name = "default"

[[profile]]
name = "installer"
kernel = "installer/vmlinuz"
cmdline = "pxed.done={{provision_url}} pxed.token={{provision_token}} role={{var.role}}"

[[machine]]
mac = "52:54:00:00:60:09"
hostname = "from-the-file"
"#;

struct Pxed {
    lab: Lab,
    server: Netns,
    client: Netns,
    pid: u32,
    work: tempfile::TempDir,
    args: Vec<String>,
}

impl Pxed {
    fn start() -> Option<Self> {
        if !pxe_lab::privileged("api") || !have_tool("curl", "curl") {
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
        std::fs::write(root.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(root.join("installer/vmlinuz"), b"installer kernel").unwrap();
        std::fs::write(work.path().join("pxed.toml"), CONFIG).unwrap();
        std::fs::write(work.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let path = |name: &str| work.path().join(name).to_str().unwrap().to_owned();
        let args: Vec<String> = [
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
            API,
            "--api-token-file",
            &path("token"),
            "--stats-interval",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut pxed = Self {
            lab,
            server,
            client,
            pid: 0,
            work,
            args,
        };
        pxed.spawn();
        Some(pxed)
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.pid = self
            .lab
            .spawn_logged(
                &self.server,
                PXED,
                &args,
                &self.work.path().join("pxed.log"),
            )
            .expect("starting pxed");
        assert!(
            self.server.wait_for_tcp_port(8067, Duration::from_secs(20)),
            "the API did not come up:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("pxed.log")).unwrap_or_default()
    }

    fn sigkill_and_restart(&mut self) {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL).unwrap();
        if let Some(mut child) = self.lab.take_child(self.pid) {
            let _ = child.wait();
        }
        self.spawn();
    }

    /// curl in the server namespace against the API; returns (status, body, headers).
    fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        extra: &[&str],
    ) -> (u16, Value, String) {
        let auth = format!("Authorization: Bearer {TOKEN}");
        let mut headers = vec!["-H", &auth];
        headers.extend_from_slice(extra);
        let url = format!("http://{API}/api/v1{path}");
        curl(
            &self.server,
            method,
            &url,
            body.map(|b| b.to_string()).as_deref(),
            &headers,
        )
    }

    /// A UEFI PXE client's DISCOVER then REQUEST for MACHINE; the ACK's
    /// address and boot file (empty for none).
    fn pxe_dora(&self, xid: u32) -> (Ipv4Addr, String) {
        self.client
            .run(move || {
                let socket = dc::client_socket("eth0");
                let discover = dc::message(MessageType::Discover, MACHINE, xid, true, vec![]);
                let offer =
                    dc::ask(&socket, &discover, xid, Duration::from_secs(3)).expect("an OFFER");
                let ip = offer.yiaddr();
                (ip, pxe_request(&socket, xid + 1, ip))
            })
            .unwrap()
    }

    /// The same REQUEST again (the shape the kernel repeats), as a PXE client.
    fn pxe_request_again(&self, xid: u32, ip: Ipv4Addr) -> String {
        self.client
            .run(move || pxe_request(&dc::client_socket("eth0"), xid, ip))
            .unwrap()
    }
}

fn pxe_request(socket: &std::net::UdpSocket, xid: u32, ip: Ipv4Addr) -> String {
    let server: Ipv4Addr = SERVER_IP.parse().unwrap();
    let request = dc::message(
        MessageType::Request,
        MACHINE,
        xid,
        true,
        vec![
            DhcpOption::ServerIdentifier(server),
            DhcpOption::RequestedIpAddress(ip),
        ],
    );
    let ack =
        dc::ask(socket, &request, xid, Duration::from_secs(3)).expect("an answer to the REQUEST");
    assert_eq!(dc::kind(&ack), Some(MessageType::Ack));
    dc::boot_file(&ack).unwrap_or_default()
}

/// Runs curl in `ns`; returns (status, JSON body or Null, lowercased headers).
fn curl(
    ns: &Netns,
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[&str],
) -> (u16, Value, String) {
    let out = tempfile::tempdir().unwrap();
    let body_file = out.path().join("body");
    let header_file = out.path().join("headers");
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-o",
        body_file.to_str().unwrap(),
        "-D",
        header_file.to_str().unwrap(),
        "-w",
        "%{http_code}",
    ];
    for h in headers {
        args.extend_from_slice(&["-H", h]);
    }
    if let Some(b) = body {
        args.extend_from_slice(&["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    args.push(url);
    let run = ns.output("curl", &args).unwrap();
    assert!(
        run.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let status = String::from_utf8_lossy(&run.stdout).trim().parse().unwrap();
    let text = std::fs::read_to_string(&body_file).unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        std::fs::read_to_string(header_file)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}

fn etag(headers: &str) -> String {
    headers
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .trim()
        .to_owned()
}

#[test]
fn every_endpoint_answers_and_bad_input_changes_nothing() {
    let Some(p) = Pxed::start() else {
        return;
    };
    let url = format!("http://{API}/api/v1/machines");
    assert_eq!(curl(&p.server, "GET", &url, None, &[]).0, 401, "no token");
    let wrong = curl(
        &p.server,
        "GET",
        &url,
        None,
        &["-H", "Authorization: Bearer nope"],
    );
    assert_eq!(wrong.0, 401);
    assert!(
        wrong.1["error"].as_str().unwrap().contains("wrong"),
        "{}",
        wrong.1
    );

    let (status, health, _) = p.api("GET", "/health", None, &[]);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["checks"]["lease_store"]["ok"], true);

    // The file's machine is listed as the file's.
    let (_, all, _) = p.api("GET", "/machines", None, &[]);
    let filed = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mac"] == "52:54:00:00:60:09")
        .unwrap();
    assert_eq!(filed["source"], "file");
    assert_eq!(filed["hostname"], "from-the-file");

    // PUT, GET with its ETag, PATCH with a stale and a fresh If-Match.
    let put = json!({"profile": "installer", "labels": {"rack": "r12"}, "vars": {"role": "db"}});
    let (status, written, headers) = p.api("PUT", "/machines/52:54:00:00:60:02", Some(put), &[]);
    assert_eq!(status, 200, "{written}");
    assert_eq!(written["revision"], 1);
    assert_eq!(etag(&headers), "\"1\"");
    let (status, shown, _) = p.api("GET", "/machines/52-54-00-00-60-02", None, &[]);
    assert_eq!(
        (status, shown["profile"].clone(), shown["source"].clone()),
        (200, json!("installer"), json!("api"))
    );
    let stale = p.api(
        "PATCH",
        "/machines/52:54:00:00:60:02",
        Some(json!({"netboot": false})),
        &["-H", "If-Match: \"7\""],
    );
    assert_eq!(stale.0, 412, "{}", stale.1);
    let fresh = p.api(
        "PATCH",
        "/machines/52:54:00:00:60:02",
        Some(json!({"netboot": false, "labels": {"row": "3"}})),
        &["-H", "If-Match: \"1\""],
    );
    assert_eq!(fresh.0, 200, "{}", fresh.1);
    assert_eq!(fresh.1["netboot"], false);
    assert_eq!(
        fresh.1["labels"],
        json!({"rack": "r12", "row": "3"}),
        "a merge patch merges objects"
    );
    assert_eq!(fresh.1["revision"], 2);

    // Bad input: a clear 4xx naming what is wrong, and nothing changed.
    for (method, path, body, want, says) in [
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            "{not json",
            400,
            "not valid",
        ),
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            r#"{"netbot": false}"#,
            422,
            "unknown field `netbot`",
        ),
        ("PUT", "/machines/nope", "{}", 400, "not a MAC address"),
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            r#"{"profile": "ghost"}"#,
            422,
            "profile: no profile named",
        ),
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            r#"{"address": "10.1.2.3"}"#,
            422,
            "address: 10.1.2.3 is in none",
        ),
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            r#"{"mac": "52:54:00:00:60:03"}"#,
            422,
            "mac: the body says",
        ),
        (
            "PUT",
            "/machines/52:54:00:00:60:02",
            r#"{"arch": "vax"}"#,
            422,
            "arch \"vax\" is unknown",
        ),
        (
            "POST",
            "/machines:bulk",
            r#"{"set": {}}"#,
            422,
            "set: name profile",
        ),
        (
            "POST",
            "/machines:bulk",
            r#"{"selector": "rack", "set": {"netboot": true}}"#,
            400,
            "not KEY=VALUE",
        ),
        ("GET", "/leases?state=lost", "", 400, "state: \"lost\""),
        (
            "PUT",
            "/profiles/bad",
            r##"{"ipxe_script": "#!ipxe\n{{nope}}"}"##,
            422,
            "unknown placeholder",
        ),
    ] {
        let body = (!body.is_empty()).then(|| body.to_owned());
        let (status, answer, _) = curl(
            &p.server,
            method,
            &format!("http://{API}/api/v1{path}"),
            body.as_deref(),
            &["-H", &format!("Authorization: Bearer {TOKEN}")],
        );
        assert_eq!(status, want, "{method} {path} {body:?}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method} {path}: {error}");
    }
    // A bulk call of 150,000 MACs (3 MB) is read, not refused at the door.
    let macs: Vec<String> = (0..150_000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            format!("02:00:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
        })
        .collect();
    let huge = json!({"macs": macs, "set": {}});
    let file = p.work.path().join("bulk.json");
    std::fs::write(&file, huge.to_string()).unwrap();
    let (status, answer, _) = curl(
        &p.server,
        "POST",
        &format!("http://{API}/api/v1/machines:bulk"),
        Some(&format!("@{}", file.display())),
        &["-H", &format!("Authorization: Bearer {TOKEN}")],
    );
    assert_eq!(
        status, 422,
        "parsed, then refused for its empty set: {answer}"
    );
    let (_, unchanged, _) = p.api("GET", "/machines/52:54:00:00:60:02", None, &[]);
    assert_eq!(
        unchanged["revision"], 2,
        "refused changes changed nothing: {unchanged}"
    );

    // A reservation another machine holds is a conflict.
    let reserve = |mac: &str| {
        p.api(
            "PUT",
            &format!("/machines/{mac}"),
            Some(json!({"address": "198.18.0.120"})),
            &[],
        )
    };
    assert_eq!(reserve("52:54:00:00:60:04").0, 200);
    let taken = reserve("52:54:00:00:60:05");
    assert_eq!(taken.0, 409, "{}", taken.1);

    // Bulk by selector and by MACs.
    let (status, bulk, _) = p.api(
        "POST",
        "/machines:bulk",
        Some(json!({"selector": "rack=r12", "set": {"netboot": true}})),
        &[],
    );
    assert_eq!((status, bulk["changed"].clone()), (200, json!(1)), "{bulk}");
    let (status, bulk, _) = p.api(
        "POST",
        "/machines:bulk",
        Some(json!({"macs": ["52:54:00:00:60:06", "52:54:00:00:60:07"], "set": {"profile": "installer"}})),
        &[],
    );
    assert_eq!((status, bulk["changed"].clone()), (200, json!(2)), "{bulk}");
    let (_, selected, _) = p.api("GET", "/machines?profile=installer", None, &[]);
    assert_eq!(selected.as_array().unwrap().len(), 3, "{selected}");

    // Profiles.
    let (status, profile, headers) = p.api(
        "PUT",
        "/profiles/rescue",
        Some(json!({"kernel": "rescue/vmlinuz"})),
        &[],
    );
    assert_eq!(status, 200, "{profile}");
    assert_eq!(etag(&headers), "\"1\"");
    let (_, profiles, _) = p.api("GET", "/profiles", None, &[]);
    let names: Vec<&str> = profiles
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "installer", "rescue"]);
    assert_eq!(p.api("GET", "/profiles/ghost", None, &[]).0, 404);

    // Leases: one machine leases, the API shows it and filters it.
    let ip = p
        .client
        .run(|| {
            dc::dora(
                &dc::client_socket("eth0"),
                [0x52, 0x54, 0, 0, 0x60, 0x08],
                0x6001,
            )
            .unwrap()
        })
        .unwrap();
    let (_, leases, _) = p.api("GET", "/leases?mac=52:54:00:00:60:08", None, &[]);
    assert_eq!(leases[0]["ip"], ip.to_string(), "{leases}");
    assert_eq!(leases[0]["state"], "active");
    let (status, one, _) = p.api("GET", &format!("/leases/{ip}"), None, &[]);
    assert_eq!(
        (status, one["mac"].clone()),
        (200, json!("52:54:00:00:60:08"))
    );
    let (_, none, _) = p.api("GET", "/leases?subnet=10.0.0.0/8", None, &[]);
    assert_eq!(none, json!([]));
    assert_eq!(p.api("GET", "/leases/198.18.0.149", None, &[]).0, 404);

    // DELETE: gone from the API; a file machine shows the file's entry again.
    assert_eq!(
        p.api("DELETE", "/machines/52:54:00:00:60:02", None, &[]).0,
        204
    );
    assert_eq!(
        p.api("GET", "/machines/52:54:00:00:60:02", None, &[]).0,
        404
    );
    assert_eq!(
        p.api(
            "PATCH",
            "/machines/52:54:00:00:60:09",
            Some(json!({"hostname": "from-the-api"})),
            &[]
        )
        .0,
        200
    );
    assert_eq!(
        p.api("GET", "/machines/52:54:00:00:60:09", None, &[]).1["source"],
        "api"
    );
    assert_eq!(
        p.api("DELETE", "/machines/52:54:00:00:60:09", None, &[]).0,
        204
    );
    let (_, back, _) = p.api("GET", "/machines/52:54:00:00:60:09", None, &[]);
    assert_eq!(
        (back["source"].clone(), back["hostname"].clone()),
        (json!("file"), json!("from-the-file"))
    );
}

#[test]
fn a_change_is_answered_the_new_way_on_every_path_when_the_call_returns() {
    let Some(mut p) = Pxed::start() else {
        return;
    };
    let reserve =
        json!({"address": CLIENT.to_string(), "profile": "installer", "vars": {"role": "db"}});
    assert_eq!(
        p.api(
            "PUT",
            &format!("/machines/{MACHINE_TEXT}"),
            Some(reserve),
            &[]
        )
        .0,
        200
    );
    let (ip, file) = p.pxe_dora(0x7001);
    assert_eq!((ip, file.as_str()), (CLIENT, "ipxe.efi"));
    // Asked again in the same shape, the kernel answers from its template.
    assert_eq!(p.pxe_request_again(0x7003, ip), "ipxe.efi");
    let script_url = format!("http://{SERVER_IP}/boot.ipxe?mac={MACHINE_TEXT}&arch=uefi-x64");
    let script = || {
        let out = p
            .client
            .output("curl", &["-sS", "--max-time", "10", &script_url])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let installer = script();
    assert!(
        installer.contains("installer/vmlinuz") && installer.contains("role=db"),
        "{installer}"
    );
    let tftp_get = || {
        p.client
            .output(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("tftp://{SERVER_IP}/ipxe.efi"),
                ],
            )
            .unwrap()
    };
    assert!(
        tftp_get().status.success(),
        "TFTP serves a netbooting machine"
    );
    let http_get = || {
        curl(
            &p.client,
            "GET",
            &format!("http://{SERVER_IP}/installer/vmlinuz"),
            None,
            &[],
        )
        .0
    };
    assert_eq!(http_get(), 200);

    // The machine is marked done: the moment the call returns, every path
    // answers it as a machine that boots from its disk.
    let (status, _, _) = p.api(
        "PATCH",
        &format!("/machines/{MACHINE_TEXT}"),
        Some(json!({"netboot": false})),
        &[],
    );
    assert_eq!(status, 200);
    assert_eq!(
        p.pxe_request_again(0x7005, ip),
        "",
        "the kernel's template was taken back"
    );
    let (_, file) = p.pxe_dora(0x7007);
    assert_eq!(file, "", "userspace gives no boot file either");
    assert!(
        script().contains("boots from its local disk"),
        "{}",
        script()
    );
    assert!(!tftp_get().status.success(), "TFTP refuses it a boot file");
    assert_eq!(http_get(), 403, "HTTP refuses it a boot file");
    let log = p.log();
    assert!(
        log.contains("the kernel answered 1 more request(s) from the template"),
        "the kernel answered before the change:\n{log}"
    );

    // Back to netboot, and the inventory survives SIGKILL.
    assert_eq!(
        p.api(
            "PATCH",
            &format!("/machines/{MACHINE_TEXT}"),
            Some(json!({"netboot": true})),
            &[]
        )
        .0,
        200
    );
    p.sigkill_and_restart();
    let (_, after, _) = p.api("GET", &format!("/machines/{MACHINE_TEXT}"), None, &[]);
    assert_eq!(
        (after["netboot"].clone(), after["revision"].clone()),
        (json!(true), json!(3)),
        "{after}"
    );
    let (_, file) = p.pxe_dora(0x7009);
    assert_eq!(file, "ipxe.efi");
}

#[test]
fn the_installer_marks_its_own_machine_done_with_its_token_and_no_other() {
    let Some(p) = Pxed::start() else {
        return;
    };
    assert_eq!(
        p.api(
            "PUT",
            &format!("/machines/{MACHINE_TEXT}"),
            Some(json!({"profile": "installer"})),
            &[]
        )
        .0,
        200
    );
    // The token and the URL reach the machine in its kernel command line.
    let out = p
        .client
        .output(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                &format!("http://{SERVER_IP}/boot.ipxe?mac={MACHINE_TEXT}&arch=uefi-x64"),
            ],
        )
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        script
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{script}"))
            .to_owned()
    };
    let done_url = field("pxed.done=");
    let token = field("pxed.token=");
    assert_eq!(
        done_url,
        format!("http://{SERVER_IP}/api/v1/machines/{MACHINE_TEXT}/provisioned")
    );
    assert_eq!(token.len(), 32);

    // Another machine's URL with this token, and no token at all, are refused.
    let other = format!("http://{SERVER_IP}/api/v1/machines/52:54:00:00:60:0a/provisioned");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(
        curl(&p.client, "POST", &other, None, &["-H", &bearer]).0,
        403
    );
    assert_eq!(curl(&p.client, "POST", &done_url, None, &[]).0, 401);
    // The API itself is not on the boot network's listener.
    assert_eq!(
        curl(
            &p.client,
            "GET",
            &format!("http://{SERVER_IP}/api/v1/machines"),
            None,
            &["-H", &bearer]
        )
        .0,
        404
    );

    let (status, record, _) = curl(&p.client, "POST", &done_url, None, &["-H", &bearer]);
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["netboot"], false);
    assert_eq!(
        record["profile"], "installer",
        "the rest of the record stays"
    );
    let (_, shown, _) = p.api("GET", &format!("/machines/{MACHINE_TEXT}"), None, &[]);
    assert_eq!(shown["netboot"], false);
    assert!(p
        .log()
        .contains("provisioned: the machine boots from its disk from now on"));
}

/// `/metrics` asks for the token like the rest of the API; with
/// `--metrics-public` it alone answers without it; with `--no-observe` the
/// metrics and boots endpoints say they are off.
#[test]
fn metrics_need_the_token_unless_public_and_answer_404_when_observing_is_off() {
    let Some(mut pxed) = Pxed::start() else {
        return;
    };
    let auth = format!("Authorization: Bearer {TOKEN}");
    let get = |pxed: &Pxed, path: &str, headers: &[&str]| {
        curl(
            &pxed.server,
            "GET",
            &format!("http://{API}{path}"),
            None,
            headers,
        )
    };
    assert_eq!(get(&pxed, "/metrics", &[]).0, 401);
    let (status, _, headers) = get(&pxed, "/metrics", &[&auth]);
    assert_eq!(status, 200);
    assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
    let (_, _, headers) = get(
        &pxed,
        "/metrics",
        &[&auth, "Accept: application/openmetrics-text; version=1.0.0"],
    );
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );

    pxed.args.push("--metrics-public".into());
    pxed.sigkill_and_restart();
    assert_eq!(get(&pxed, "/metrics", &[]).0, 200, "{}", pxed.log());
    assert_eq!(
        get(&pxed, "/api/v1/boots", &[]).0,
        401,
        "the rest still needs it"
    );

    pxed.args.push("--no-observe".into());
    pxed.sigkill_and_restart();
    for path in [
        "/metrics",
        "/api/v1/boots",
        "/api/v1/machines/52:54:00:00:60:01/boots",
    ] {
        let (status, body, _) = get(&pxed, path, &[&auth]);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("--no-observe"),
            "{path}: {body}"
        );
    }
}
