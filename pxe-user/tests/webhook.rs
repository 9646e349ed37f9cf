//! The decision webhook (`--decision-url`, pixiecore's API) against the real
//! `pxed`: a machine the webhook boots gets its kernel in its iPXE script; one
//! it refuses gets nothing; one it is too slow for falls back to the
//! configured policy; a machine the config names is answered at once and the
//! webhook is never asked about it. The webhook is a small HTTP server of the
//! test's own in pxed's namespace. Needs root and curl.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{dhcp_client as dc, have_tool, PXED, SERVER_IP};
use dhcproto::v4::MessageType;
use pxe_lab::Lab;

const BOOTED: [u8; 6] = [0x52, 0x54, 0, 0, 0x70, 0x01];
const REFUSED: [u8; 6] = [0x52, 0x54, 0, 0, 0x70, 0x02];
const SLOW: [u8; 6] = [0x52, 0x54, 0, 0, 0x70, 0x03];
const KNOWN: [u8; 6] = [0x52, 0x54, 0, 0, 0x70, 0x09];

const CONFIG: &str = r#"
default_profile = "default"

[[profile]]
name = "default"

[[machine]]
mac = "52:54:00:00:70:09"
"#;

/// Answers `GET /v1/boot/MAC` as a pixiecore API server would; records the
/// paths it was asked for.
fn webhook(listener: TcpListener, asked: Arc<Mutex<Vec<String>>>) {
    for stream in listener.incoming().flatten() {
        let asked = Arc::clone(&asked);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap_or(0);
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            asked.lock().unwrap().push(path.clone());
            let (status, body) = if path.starts_with("/v1/boot/52:54:00:00:70:01") {
                (
                    "200 OK",
                    r#"{"kernel": "installer/vmlinuz", "initrd": ["installer/initrd.img"], "cmdline": "quiet", "message": "from the webhook"}"#,
                )
            } else if path.starts_with("/v1/boot/52:54:00:00:70:03") {
                std::thread::sleep(Duration::from_secs(5));
                ("200 OK", r#"{"kernel": "late/vmlinuz"}"#)
            } else {
                ("404 Not Found", "")
            };
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

/// A PXE DISCOVER from `mac`; the boot file of the OFFER, if one came.
fn discover(client: &pxe_lab::Netns, mac: [u8; 6], xid: u32) -> Option<String> {
    client
        .run(move || {
            let socket = dc::client_socket("eth0");
            let packet = dc::message(MessageType::Discover, mac, xid, true, vec![]);
            dc::ask(&socket, &packet, xid, Duration::from_millis(700))
                .map(|m| dc::boot_file(&m).unwrap_or_default())
        })
        .unwrap()
}

/// DISCOVERs every 300 ms until one is answered or `within` passes.
fn answered_within(client: &pxe_lab::Netns, mac: [u8; 6], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut xid = u32::from_be_bytes([mac[4], mac[5], 0, 0]);
    while Instant::now() < deadline {
        xid += 1;
        if let Some(file) = discover(client, mac, xid) {
            return Some(file);
        }
    }
    None
}

#[test]
fn the_webhook_decides_for_strangers_and_never_holds_up_the_machines_pxed_knows() {
    if !pxe_lab::privileged("webhook") || !have_tool("curl", "curl") {
        return;
    }
    let lab = Lab::new().expect("creating the lab");
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let listener = server
        .run(|| TcpListener::bind("127.0.0.1:9090"))
        .unwrap()
        .unwrap();
    let recorded = Arc::clone(&asked);
    std::thread::spawn(move || webhook(listener, recorded));

    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("ipxe.efi"), b"ipxe").unwrap();
    std::fs::write(work.path().join("pxed.toml"), CONFIG).unwrap();
    let log = work.path().join("pxed.log");
    let config = work.path().join("pxed.toml");
    lab.spawn_logged(
        &server,
        PXED,
        &[
            "--interface",
            "eth0",
            "--boot-root",
            root.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--dhcp",
            "proxy",
            "--decision-url",
            "http://127.0.0.1:9090",
            "--decision-timeout-ms",
            "500",
        ],
        &log,
    )
    .unwrap();
    assert!(server.wait_for_udp_port(67, Duration::from_secs(20)));
    assert!(server.wait_for_tcp_port(80, Duration::from_secs(20)));

    // A machine the config names: answered on its first DISCOVER, no webhook.
    assert_eq!(
        discover(&client, KNOWN, 0x7090).as_deref(),
        Some("ipxe.efi")
    );

    // A stranger the webhook boots: silent until the webhook has answered,
    // then its retransmission is answered from the cache.
    assert_eq!(
        discover(&client, BOOTED, 0x7010),
        None,
        "DHCP never waits on the webhook"
    );
    let file = answered_within(&client, BOOTED, Duration::from_secs(5));
    assert_eq!(file.as_deref(), Some("ipxe.efi"));
    // The webhook's answer expires on its own: userspace answers the next
    // DISCOVER too (a kernel template would repeat it past its expiry).
    assert_eq!(
        discover(&client, BOOTED, 0x7020).as_deref(),
        Some("ipxe.efi")
    );
    let offers = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("DISCOVER from 52:54:00:00:70:01") && l.contains("proxy OFFER"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while offers() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(offers(), 2, "both OFFERs from userspace");
    let out = client
        .output(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                &format!("http://{SERVER_IP}/boot.ipxe?mac=52:54:00:00:70:01&arch=uefi-x64"),
            ],
        )
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(script.contains("echo from the webhook"), "{script}");
    assert!(
        script.contains(&format!(
            "kernel http://{SERVER_IP}/installer/vmlinuz initrd=initrd0 quiet"
        )),
        "{script}"
    );
    assert!(
        script.contains(&format!(
            "initrd --name initrd0 http://{SERVER_IP}/installer/initrd.img"
        )),
        "{script}"
    );

    // One the webhook refuses (404): never answered.
    assert_eq!(
        answered_within(&client, REFUSED, Duration::from_secs(2)),
        None
    );

    // One it is too slow for: after the timeout, the configured policy
    // (the default profile) answers, while the webhook is still sleeping.
    let started = Instant::now();
    let file = answered_within(&client, SLOW, Duration::from_secs(4));
    assert_eq!(
        file.as_deref(),
        Some("ipxe.efi"),
        "the default profile's answer"
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    let asked = asked.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|p| p == "/v1/boot/52:54:00:00:70:01?arch=uefi-x64"),
        "{asked:?}"
    );
    assert!(
        !asked.iter().any(|p| p.contains("70:09")),
        "the known machine was never asked about: {asked:?}"
    );
    let once = asked.iter().filter(|p| p.contains("70:01")).count();
    assert_eq!(
        once, 1,
        "one lookup per machine while it is cached: {asked:?}"
    );
}
