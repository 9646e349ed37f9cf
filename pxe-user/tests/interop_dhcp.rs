//! DHCP against the real `pxed` in namespaces, with real clients and peers:
//! busybox udhcpc and ISC dhclient get, renew and release leases; a request
//! relayed by dnsmasq gets an address from the relay's subnet; in proxy mode
//! beside dnsmasq (sharing port 67) or Kea (holding it) a PXE client gets its
//! address from one and its boot file from the other; one pxed serves two
//! networks; leases survive SIGKILL; and the kernel's admission control
//! keeps serving known machines through floods, knows a machine from its
//! offer until its lease ends, and gives an answered relay its own budget.
//! Needs root and the clients.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    time::Duration,
};

use common::{
    dhcp_client as dc, have_tool, run_ok, serve_tftp, start_udhcpc, udhcpc_lease,
    wait_for_file_text, write_script, Served, PXED,
};
use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use pxe_lab::{peers::Dnsmasq, Lab};

const POOL: &str = "198.18.0.100-198.18.0.199";

/// A config that hands out [`POOL`]; tests add profiles and machines.
const FULL_MODE_ON_POOL: &str = r#"
[dhcp]
mode = "full"
[[dhcp.subnet]]
network = "198.18.0.0/24"
pools = ["198.18.0.100-198.18.0.199"]
"#;

fn in_pool(ip: Ipv4Addr) -> bool {
    (Ipv4Addr::new(198, 18, 0, 100)..=Ipv4Addr::new(198, 18, 0, 199)).contains(&ip)
}

fn boot_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ipxe.efi"), b"ipxe").unwrap();
    root
}

fn full_mode(root: &Path) -> Served {
    let leases = root.join("leases.redb");
    let served = serve_tftp(
        root,
        &[
            "--xdp-mode",
            "off",
            "--no-tc",
            "--dhcp",
            "full",
            "--range",
            POOL,
            "--lease-file",
            leases.to_str().unwrap(),
            "--lease-time",
            "120",
        ],
    );
    assert!(served.server.wait_for_udp_port(67, Duration::from_secs(10)));
    served
}

fn addresses(ns: &pxe_lab::Netns) -> String {
    String::from_utf8_lossy(
        &ns.output("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// pxed on `server`'s eth0 with `config` (written to `work`), its leases
/// in `work`, and `extra` flags, once it listens on 67; its log's path.
fn start_with_config(
    lab: &Lab,
    server: &pxe_lab::Netns,
    work: &Path,
    config: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let config_path = work.join("pxed.toml");
    std::fs::write(&config_path, config).unwrap();
    let leases = work.join("leases.redb");
    let log = work.join("pxed.log");
    let mut args = vec![
        "--interface",
        "eth0",
        "--config",
        config_path.to_str().unwrap(),
        "--lease-file",
        leases.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lab.spawn_logged(server, PXED, &args, &log).unwrap();
    assert!(
        server.wait_for_udp_port(67, Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    log
}

/// A lab of two namespaces and pxed on it with the config `config` writes
/// (it may look at the client's namespace first), a boot root and a work
/// directory of its own.
struct ServedWithConfig {
    lab: Lab,
    client: pxe_lab::Netns,
    work: tempfile::TempDir,
    _root: tempfile::TempDir,
    server: pxe_lab::Netns,
}

fn served_with_config(config: impl FnOnce(&pxe_lab::Netns) -> String) -> ServedWithConfig {
    served_with(config, &[])
}

/// [`served_with_config`], pxed also given `extra` flags.
fn served_with(config: impl FnOnce(&pxe_lab::Netns) -> String, extra: &[&str]) -> ServedWithConfig {
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let text = config(&client);
    let mut args = vec!["--boot-root", root.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    start_with_config(&lab, &server, work.path(), &text, &args);
    ServedWithConfig {
        lab,
        client,
        work,
        _root: root,
        server,
    }
}

/// Whether `address` is configured on eth0 within a few seconds: a client
/// logs its lease before its script has configured it.
fn configured(ns: &pxe_lab::Netns, address: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !addresses(ns).contains(address) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn udhcpc_gets_renews_and_releases_a_lease() {
    if !pxe_lab::privileged("udhcpc_gets_renews_and_releases_a_lease")
        || !have_tool("busybox", "busybox")
    {
        return;
    }
    let root = boot_root();
    let served = full_mode(root.path());
    let work = tempfile::tempdir().unwrap();
    let (pid, out) = start_udhcpc(&served, work.path());
    let ip = udhcpc_lease(&out);
    assert!(in_pool(ip), "{ip}");
    assert!(
        configured(&served.client, &format!("{ip}/24")),
        "the script configured it"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).unwrap(); // renew now
    served.wait_for_log("(RENEWING)", Duration::from_secs(10));
    wait_for_file_text(
        &out,
        &format!("lease of {ip} obtained"),
        Duration::from_secs(10),
    );
    assert_eq!(
        std::fs::read_to_string(&out)
            .unwrap()
            .matches(&format!("lease of {ip} obtained"))
            .count(),
        2,
        "renewed, same address"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGUSR2).unwrap(); // release
    served.wait_for_log(&format!("{ip} is free again"), Duration::from_secs(10));
}

#[test]
fn dhclient_gets_and_releases_a_lease() {
    if !pxe_lab::privileged("dhclient_gets_and_releases_a_lease")
        || !have_tool("dhclient", "isc-dhcp-client")
    {
        return;
    }
    let root = boot_root();
    let served = full_mode(root.path());
    let work = tempfile::tempdir().unwrap();
    // No dhclient-script: it would touch the host's /etc/resolv.conf.
    let script = write_script(
        work.path(),
        "dhclient.sh",
        r#"
case "$reason" in
  PREINIT) ip link set "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT) ip addr flush dev "$interface"; ip addr add "$new_ip_address/24" dev "$interface" ;;
  EXPIRE|FAIL|RELEASE|STOP) ip addr flush dev "$interface" ;;
esac
"#,
    );
    let lf = work.path().join("dhclient.leases");
    let pf = work.path().join("dhclient.pid");
    let args = |extra: &[&'static str]| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "-v",
                "-sf",
                &script,
                "-lf",
                lf.to_str().unwrap(),
                "-pf",
                pf.to_str().unwrap(),
                "eth0",
            ]
            .map(String::from),
        );
        a
    };
    let get = args(&["-1"]);
    run_ok(
        &served.client,
        "dhclient",
        &get.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let bound = addresses(&served.client);
    let ip: Ipv4Addr = bound
        .split("inet ")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(in_pool(ip), "{bound}");
    served.wait_for_log(&format!("→ ACK {ip}"), Duration::from_secs(5));

    let release = args(&["-r"]);
    let result = served.client.output(
        "dhclient",
        &release.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // dhclient -1 stays running in the background; -r stops it. Make sure, by its PID.
    common::stop_by_pid_file(&pf);
    assert!(result.unwrap().status.success());
    served.wait_for_log(&format!("{ip} is free again"), Duration::from_secs(10));
}

/// A server, a relay and a client: the server on 198.18.0.0/24, the relay
/// between it (eth0, .2) and the client's 198.18.5.0/24 (eth1, .1).
fn relayed_lab() -> (Lab, [pxe_lab::Netns; 3]) {
    let lab = Lab::new().unwrap();
    let server = lab.add_netns("srv").unwrap();
    let relay = lab.add_netns("relay").unwrap();
    let client = lab.add_netns("cli").unwrap();
    lab.veth(
        (&server, "eth0", Some("198.18.0.1/24")),
        (&relay, "eth0", Some("198.18.0.2/24")),
    )
    .unwrap();
    lab.veth(
        (&relay, "eth1", Some("198.18.5.1/24")),
        (&client, "eth0", None),
    )
    .unwrap();
    server
        .ip(["route", "add", "198.18.5.0/24", "via", "198.18.0.2"])
        .unwrap();
    (lab, [server, relay, client])
}

/// Full mode on the server's network and on the client's behind the relay.
const RELAYED_SUBNETS: &str = r#"
[dhcp]
mode = "full"
[[dhcp.subnet]]
network = "198.18.0.0/24"
pools = ["198.18.0.100-198.18.0.199"]
[[dhcp.subnet]]
network = "198.18.5.0/24"
pools = ["198.18.5.10-198.18.5.50"]
router = "198.18.5.1"
"#;

/// One udhcpc run on `ns`'s eth0 that quits once leased (no script): the
/// address it logged, if any, and all it printed.
fn udhcpc_once(ns: &pxe_lab::Netns) -> (Option<Ipv4Addr>, String) {
    let args = [
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        "5",
        "-T",
        "2",
        "-s",
        "/bin/true",
    ];
    let out = ns.output("busybox", &args).unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let ip = text
        .split("lease of ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok());
    (ip, text)
}

/// The MAC of `ns`'s eth0, as the config's `[[machine]]` writes it.
fn mac_of(ns: &pxe_lab::Netns) -> String {
    let link = ns
        .output("ip", &["-br", "link", "show", "dev", "eth0"])
        .unwrap();
    String::from_utf8_lossy(&link.stdout)
        .split_whitespace()
        .nth(2)
        .expect("ip -br link: name, state, MAC")
        .to_owned()
}

#[test]
fn a_request_relayed_by_dnsmasq_gets_an_address_from_the_relays_subnet() {
    if !pxe_lab::privileged("a_request_relayed_by_dnsmasq_gets_an_address_from_the_relays_subnet")
        || !have_tool("dnsmasq", "dnsmasq-base")
        || !have_tool("busybox", "busybox")
    {
        return;
    }
    let (lab, [server, relay, client]) = relayed_lab();

    let work = tempfile::tempdir().unwrap();
    let log = start_with_config(
        &lab,
        &server,
        work.path(),
        RELAYED_SUBNETS,
        &["--xdp-mode", "off", "--no-tc"],
    );
    let relay_log = work.path().join("dnsmasq.log");
    Dnsmasq::new()
        .arg("--log-dhcp")
        .arg("--dhcp-relay=198.18.5.1,198.18.0.1")
        .spawn(&lab, &relay, &relay_log)
        .unwrap();
    assert!(relay.wait_for_udp_port(67, Duration::from_secs(20)));

    let (ip, text) = udhcpc_once(&client);
    let ip = ip.unwrap_or_else(|| {
        panic!(
            "no lease:\n{text}\npxed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        (Ipv4Addr::new(198, 18, 5, 10)..=Ipv4Addr::new(198, 18, 5, 50)).contains(&ip),
        "{ip} is from the relay's subnet"
    );
    wait_for_file_text(&log, &format!("→ ACK {ip}"), Duration::from_secs(5));
}

/// ISC's dhcrelay adds option 82 with the client's port as circuit id
/// (`-a`: the interface name) and forwards only replies that carry it back.
/// Classes on that circuit id and on the machine's inventory labels choose
/// the options its lease gets; the classes written before the right one
/// differ from it in one criterion each and must not match.
#[test]
fn a_relay_agents_circuit_id_and_the_machines_labels_choose_its_class() {
    if !pxe_lab::privileged("a_relay_agents_circuit_id_and_the_machines_labels_choose_its_class")
        || !have_tool("dhcrelay", "isc-dhcp-relay")
        || !have_tool("busybox", "busybox")
    {
        return;
    }
    let (lab, [server, relay, client]) = relayed_lab();
    let mac = mac_of(&client);

    let work = tempfile::tempdir().unwrap();
    let log = start_with_config(
        &lab,
        &server,
        work.path(),
        &format!(
            r#"{RELAYED_SUBNETS}
[[class]]
name = "other-port"
circuit_id = "eth2"
labels = {{ rack = "r12" }}
options = {{ ntp-servers = {{ value = ["198.18.0.66"], always_send = true }} }}

[[class]]
name = "other-rack"
circuit_id = "eth1"
labels = {{ rack = "r13" }}
options = {{ ntp-servers = {{ value = ["198.18.0.67"], always_send = true }} }}

[[class]]
name = "r12-port-1"
circuit_id = "eth1"
labels = {{ rack = "r12" }}
options = {{ ntp-servers = {{ value = ["198.18.0.55"], always_send = true }} }}

[[machine]]
mac = "{mac}"
labels = {{ rack = "r12", row = "2" }}
"#
        ),
        &[],
    );
    let relay_log = work.path().join("dhcrelay.log");
    let pid_file = work.path().join("dhcrelay.pid");
    lab.spawn_logged(
        &relay,
        "dhcrelay",
        &[
            "-4",
            "-d",
            "-a",
            "-pf",
            pid_file.to_str().unwrap(),
            "-iu",
            "eth0",
            "-id",
            "eth1",
            "198.18.0.1",
        ],
        &relay_log,
    )
    .unwrap();
    assert!(relay.wait_for_udp_port(67, Duration::from_secs(20)));

    let dir = work.path().to_str().unwrap();
    let script = write_script(
        work.path(),
        "udhcpc.sh",
        &format!(
            r#"
case "$1" in
  bound) env > "{dir}/bound.env" ;;
esac
"#
        ),
    );
    // Twice: the second lease's DISCOVER and REQUEST come through the relay
    // with the same option 82, which the kernel answers from the first's
    // template (82 is in its signature).
    for run in ["first", "second"] {
        let _ = std::fs::remove_file(work.path().join("bound.env"));
        let out = client
            .output(
                "busybox",
                &[
                    "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-s", &script,
                ],
            )
            .unwrap();
        let env = std::fs::read_to_string(work.path().join("bound.env")).unwrap_or_else(|_| {
            panic!(
                "{run} run: no lease through dhcrelay:\n{}{}\ndhcrelay:\n{}\npxed:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&relay_log).unwrap_or_default(),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        let ip: Ipv4Addr = var("ip").expect("udhcpc's ip").parse().unwrap();
        assert!(
            (Ipv4Addr::new(198, 18, 5, 10)..=Ipv4Addr::new(198, 18, 5, 50)).contains(&ip),
            "{ip} is from the relay's subnet"
        );
        assert_eq!(
            var("ntpsrv").as_deref(),
            Some("198.18.0.55"),
            "{run} run: class r12-port-1's option: {env}"
        );
    }
    wait_for_file_text(&log, ", class r12-port-1", Duration::from_secs(5));
    wait_for_file_text(&log, "the kernel answered", Duration::from_secs(15));
}

#[test]
fn proxy_mode_beside_dnsmasq_gives_the_boot_file_while_dnsmasq_gives_the_address() {
    if !pxe_lab::privileged(
        "proxy_mode_beside_dnsmasq_gives_the_boot_file_while_dnsmasq_gives_the_address",
    ) || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    // One broadcast domain: a bridge in a "switch" namespace joining pxed,
    // the site's DHCP server (dnsmasq, addresses only) and a PXE client.
    let lab = Lab::new().unwrap();
    let [server, site, client]: [pxe_lab::Netns; 3] = lab
        .segment(&[
            ("srv", Some("198.18.0.1/24")),
            ("dhcp", Some("198.18.0.2/24")),
            ("cli", None),
        ])
        .unwrap()
        .try_into()
        .unwrap();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("pxed.log");
    lab.spawn_logged(
        &server,
        PXED,
        &[
            "--interface",
            "eth0",
            "--boot-root",
            root.path().to_str().unwrap(),
            "--dhcp",
            "proxy",
            "--xdp-mode",
            "off",
            "--no-tc",
        ],
        &log,
    )
    .unwrap();
    let dnsmasq_leases = work.path().join("dnsmasq.leases");
    Dnsmasq::new()
        .interface("eth0")
        .dhcp_range("198.18.0.100,198.18.0.150,1h")
        .lease_file(&dnsmasq_leases)
        .spawn(&lab, &site, &work.path().join("dnsmasq.log"))
        .unwrap();
    assert!(
        server.wait_for_udp_port(4011, Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(site.wait_for_udp_port(67, Duration::from_secs(20)));

    let mac = [0x52, 0x54, 0x00, 0x99, 0x00, 0x01];
    client
        .run(|| {
            let socket = dc::client_socket("eth0");
            let xid = 0x0bad_cafe;
            let offers = dc::exchange(
                &socket,
                &dc::message(MessageType::Discover, mac, xid, true, vec![]),
                xid,
                Duration::from_secs(3),
            );
            let from = |ip: [u8; 4]| {
                offers
                    .iter()
                    .find(|(m, _)| dc::server_id(m) == Some(Ipv4Addr::from(ip)))
                    .map(|(m, _)| m.clone())
            };
            let address_offer =
                from([198, 18, 0, 2]).expect("an OFFER from the site's DHCP server");
            let proxy_offer = from([198, 18, 0, 1]).expect("a proxy OFFER from pxed");
            let ip = address_offer.yiaddr();
            assert!(
                (Ipv4Addr::new(198, 18, 0, 100)..=Ipv4Addr::new(198, 18, 0, 150)).contains(&ip)
            );
            assert_eq!(
                proxy_offer.yiaddr(),
                Ipv4Addr::UNSPECIFIED,
                "pxed hands out no address in proxy mode"
            );
            assert_eq!(dc::boot_file(&proxy_offer).as_deref(), Some("ipxe.efi"));
            assert_eq!(
                proxy_offer.opts().get(OptionCode::ClassIdentifier),
                Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
            );

            // The client takes the address from dnsmasq; pxed stays out of it.
            let request = dc::message(
                MessageType::Request,
                mac,
                xid,
                true,
                vec![
                    DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 2)),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            );
            let acks = dc::exchange(&socket, &request, xid, Duration::from_secs(2));
            assert!(
                acks.iter()
                    .all(|(m, _)| dc::server_id(m) == Some(Ipv4Addr::new(198, 18, 0, 2))),
                "only dnsmasq answers the REQUEST"
            );
            assert!(acks
                .iter()
                .any(|(m, _)| dc::kind(m) == Some(MessageType::Ack) && m.yiaddr() == ip));
            ip
        })
        .and_then(|ip| {
            // With its address configured, the client asks pxed for its boot file on 4011.
            client.ip(["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            client.run(move || {
                let socket = UdpSocket::bind(SocketAddrV4::new(ip, 68)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                let xid = 0x0bad_f00d;
                let request = dc::message(MessageType::Request, mac, xid, true, vec![]);
                let mut m =
                    dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&request)).unwrap();
                m.set_ciaddr(ip);
                let mut bytes = Vec::new();
                dhcproto::Encodable::encode(&m, &mut dhcproto::Encoder::new(&mut bytes)).unwrap();
                socket.send_to(&bytes, "198.18.0.1:4011").unwrap();
                let replies = dc::collect(&socket, xid, Duration::from_secs(2));
                let (ack, from) = replies.first().expect("pxed answers on 4011");
                assert_eq!(from.to_string(), "198.18.0.1:4011");
                assert_eq!(dc::kind(ack), Some(MessageType::Ack));
                assert_eq!(dc::boot_file(ack).as_deref(), Some("ipxe.efi"));
            })
        })
        .unwrap();
    use dhcproto::Decodable as _;
}

#[test]
fn every_acked_lease_survives_sigkill_and_no_address_goes_to_two_clients() {
    if !pxe_lab::privileged("every_acked_lease_survives_sigkill_and_no_address_goes_to_two_clients")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab.pair().build().unwrap();
    let work = tempfile::tempdir().unwrap();
    let leases = work.path().join("leases.redb");
    let log = work.path().join("pxed.log");
    // A boot root of its own: a SIGKILLed pxed leaves nothing behind.
    let root = boot_root();
    let args = [
        "--interface",
        "eth0",
        "--boot-root",
        root.path().to_str().unwrap(),
        "--dhcp",
        "full",
        "--range",
        "198.18.0.10-198.18.0.250",
        "--lease-file",
        leases.to_str().unwrap(),
        "--xdp-mode",
        "off",
        "--no-tc",
        "--authoritative",
    ];
    let start = || {
        let pid = lab.spawn_logged(&server, PXED, &args, &log).unwrap();
        assert!(
            server.wait_for_udp_port(67, Duration::from_secs(20)),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        pid
    };
    let mut pid = start();
    // Clients keep coming on another thread while the server is SIGKILLed and
    // restarted under them, at moments unrelated to what they are doing.
    let clients = {
        let client = client.clone();
        std::thread::spawn(move || {
            client
                .run(|| {
                    let socket = dc::client_socket("eth0");
                    (0..200u8)
                        .filter_map(|i| {
                            let mac = [0x52, 0x54, 0x00, 0x77, 0, i];
                            dc::dora(&socket, mac, u32::from_be_bytes([0x77, 0, i, 1]))
                                .ok()
                                .map(|ip| (mac, ip))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap()
        })
    };
    let mut kills = 0;
    while !clients.is_finished() && kills < 6 {
        std::thread::sleep(Duration::from_millis(150 + 97 * kills));
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let _ = lab.take_child(pid).map(|mut c| c.wait());
        kills += 1;
        pid = start();
    }
    let acked = clients.join().unwrap();
    assert!(kills >= 3, "the server was killed only {kills} times");
    assert!(
        acked.len() >= 100,
        "only {} of 200 clients got through the kills",
        acked.len()
    );
    let mut ips: Vec<Ipv4Addr> = acked.iter().map(|(_, ip)| *ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(
        ips.len(),
        acked.len(),
        "an address was handed to two clients"
    );
    // After all the kills, each client still owns exactly what it was ACKed.
    let acked_for_check = acked.clone();
    client
        .run(move || {
            let socket = dc::client_socket("eth0");
            for (n, (mac, ip)) in acked_for_check.iter().enumerate() {
                let answer = dc::reboot_request(&socket, *mac, 0x5151_0000 + n as u32, *ip);
                assert_eq!(
                    answer,
                    Some(MessageType::Ack),
                    "{mac:02x?} lost its lease on {ip}"
                );
            }
            // And a newcomer gets none of those addresses.
            let fresh = dc::dora(&socket, [0x52, 0x54, 0, 0x78, 0, 1], 0x7777).unwrap();
            assert!(
                !acked_for_check.iter().any(|(_, ip)| *ip == fresh),
                "{fresh} was already leased"
            );
        })
        .unwrap();
}

#[test]
fn proxy_mode_shares_port_67_with_dnsmasq_on_the_same_host() {
    if !pxe_lab::privileged("proxy_mode_shares_port_67_with_dnsmasq_on_the_same_host")
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab.pair().build().unwrap();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    // The site's DHCP server is already running on this host and holds port 67.
    Dnsmasq::new()
        .interface("eth0")
        .dhcp_range("198.18.0.100,198.18.0.150,1h")
        .lease_file(&work.path().join("dnsmasq.leases"))
        .spawn(&lab, &server, &work.path().join("dnsmasq.log"))
        .unwrap();
    assert!(server.wait_for_udp_port(67, Duration::from_secs(20)));
    let log = work.path().join("pxed.log");
    lab.spawn_logged(
        &server,
        PXED,
        &[
            "--interface",
            "eth0",
            "--boot-root",
            root.path().to_str().unwrap(),
            "--dhcp",
            "proxy",
            "--xdp-mode",
            "off",
            "--no-tc",
        ],
        &log,
    )
    .unwrap();
    assert!(
        server.wait_for_udp_port(4011, Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    client
        .run(|| {
            let socket = dc::client_socket("eth0");
            let mac = [0x52, 0x54, 0x00, 0x98, 0x00, 0x01];
            let xid = 0x5a3e_0001;
            let offers = dc::exchange(
                &socket,
                &dc::message(MessageType::Discover, mac, xid, true, vec![]),
                xid,
                Duration::from_secs(3),
            );
            assert!(
                offers.iter().any(|(m, _)| !m.yiaddr().is_unspecified()),
                "an address offer from dnsmasq: {offers:?}"
            );
            let proxy = offers
                .iter()
                .find(|(m, _)| m.yiaddr().is_unspecified())
                .expect("a proxy offer from pxed beside it");
            assert_eq!(dc::boot_file(&proxy.0).as_deref(), Some("ipxe.efi"));
        })
        .unwrap();
}

#[test]
fn one_pxed_serves_two_networks_each_from_its_own_address() {
    if !pxe_lab::privileged("one_pxed_serves_two_networks_each_from_its_own_address")
        || !have_tool("busybox", "busybox")
        || !have_tool("tftp", "tftp-hpa")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let server = lab.add_netns("srv").unwrap();
    let rack_a = lab.add_netns("a").unwrap();
    let rack_b = lab.add_netns("b").unwrap();
    lab.veth(
        (&server, "eth0", Some("198.18.0.1/24")),
        (&rack_a, "eth0", None),
    )
    .unwrap();
    lab.veth(
        (&server, "eth1", Some("198.18.1.1/24")),
        (&rack_b, "eth0", None),
    )
    .unwrap();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("pxed.log");
    let leases = work.path().join("leases.redb");
    lab.spawn_logged(
        &server,
        PXED,
        &[
            "-i",
            "eth0",
            "-i",
            "eth1",
            "--boot-root",
            root.path().to_str().unwrap(),
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--range",
            "198.18.1.100-198.18.1.199",
            "--lease-file",
            leases.to_str().unwrap(),
        ],
        &log,
    )
    .unwrap();
    wait_for_file_text(
        &log,
        "DHCP listening interface=eth1",
        Duration::from_secs(20),
    );

    // A PXE client on each network: its own subnet, our address there.
    for (rack, net, mac) in [(&rack_a, 0u8, 0x01u8), (&rack_b, 1, 0x02)] {
        let ours = Ipv4Addr::new(198, 18, net, 1);
        let ack = rack
            .run(|| {
                let socket = dc::client_socket("eth0");
                let mac = [0x52, 0x54, 0x00, 0x97, 0x00, mac];
                let xid = 0x7e57_0000 + u32::from(mac[5]);
                let offers = dc::exchange(
                    &socket,
                    &dc::message(MessageType::Discover, mac, xid, true, vec![]),
                    xid,
                    Duration::from_secs(3),
                );
                let (offer, from) = offers.first().cloned().expect("an OFFER");
                assert_eq!(
                    from.ip(),
                    std::net::IpAddr::V4(ours),
                    "the reply leaves from our address on this network"
                );
                let request = dc::message(
                    MessageType::Request,
                    mac,
                    xid,
                    true,
                    vec![
                        DhcpOption::ServerIdentifier(ours),
                        DhcpOption::RequestedIpAddress(offer.yiaddr()),
                    ],
                );
                dc::ask(&socket, &request, xid, Duration::from_secs(3)).expect("an ACK")
            })
            .unwrap();
        assert_eq!(dc::kind(&ack), Some(MessageType::Ack));
        assert_eq!(
            ack.yiaddr().octets()[..3],
            [198, 18, net],
            "an address on network {net}: {}",
            ack.yiaddr()
        );
        assert_eq!(dc::server_id(&ack), Some(ours));
        assert_eq!(ack.siaddr(), ours, "next-server is our address there");
        assert_eq!(dc::boot_file(&ack).as_deref(), Some("ipxe.efi"));
    }

    // A real client on the second network: udhcpc's lease, then the boot file over TFTP from there.
    let script = write_script(
        work.path(),
        "udhcpc.sh",
        "[ \"$1\" = bound ] && ip addr add \"$ip/$mask\" dev \"$interface\"\nexit 0\n",
    );
    let out = work.path().join("udhcpc.log");
    lab.spawn_logged(
        &rack_b,
        "busybox",
        &[
            "udhcpc", "-i", "eth0", "-f", "-q", "-t", "5", "-T", "1", "-s", &script,
        ],
        &out,
    )
    .unwrap();
    wait_for_file_text(&out, "obtained from 198.18.1.1", Duration::from_secs(20));
    // udhcpc logs the lease before its script has put the address on.
    assert!(
        configured(&rack_b, "inet 198.18.1."),
        "{}",
        addresses(&rack_b)
    );
    let fetched = work.path().join("fetched.efi");
    run_ok(
        &rack_b,
        "tftp",
        &[
            "198.18.1.1",
            "-c",
            "get",
            "ipxe.efi",
            fetched.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&fetched).unwrap(), b"ipxe");
}

#[test]
fn proxy_mode_listens_beside_kea_which_holds_port_67_exclusively() {
    if !pxe_lab::privileged("proxy_mode_listens_beside_kea_which_holds_port_67_exclusively")
        || !have_tool("kea-dhcp4", "kea-dhcp4-server")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab.pair().build().unwrap();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    // The site's DHCP server, already on this host: Kea binds port 67 without
    // SO_REUSEADDR, so nobody else can bind it.
    let kea_config = work.path().join("kea-dhcp4.json");
    std::fs::write(&kea_config, kea_config_json(work.path())).unwrap();
    let dir = format!("{}", work.path().display());
    lab.spawn_logged(
        &server,
        "env",
        &[
            &format!("KEA_PIDFILE_DIR={dir}"),
            &format!("KEA_LOCKFILE_DIR={dir}"),
            "kea-dhcp4",
            "-c",
            kea_config.to_str().unwrap(),
        ],
        &work.path().join("kea.log"),
    )
    .unwrap();
    assert!(
        server.wait_for_udp_port(67, Duration::from_secs(20)),
        "kea did not start"
    );
    let taken = server
        .run(|| UdpSocket::bind("0.0.0.0:67").map(drop))
        .unwrap();
    assert!(
        taken.is_err(),
        "port 67 is held exclusively (else this test proves nothing)"
    );

    let log = work.path().join("pxed.log");
    lab.spawn_logged(
        &server,
        PXED,
        &[
            "--interface",
            "eth0",
            "--boot-root",
            root.path().to_str().unwrap(),
            "--dhcp",
            "proxy",
            "--xdp-mode",
            "off",
            "--no-tc",
        ],
        &log,
    )
    .unwrap();
    wait_for_file_text(&log, "through a raw socket", Duration::from_secs(20));
    assert!(server.wait_for_udp_port(4011, Duration::from_secs(20)));
    client
        .run(|| {
            let socket = dc::client_socket("eth0");
            let mac = [0x52, 0x54, 0x00, 0x96, 0x00, 0x01];
            let xid = 0x4ea0_0001;
            let offers = dc::exchange(
                &socket,
                &dc::message(MessageType::Discover, mac, xid, true, vec![]),
                xid,
                Duration::from_secs(3),
            );
            let (address_offer, _) = offers
                .iter()
                .find(|(m, _)| !m.yiaddr().is_unspecified())
                .expect("an address offer from Kea");
            let (proxy, from) = offers
                .iter()
                .find(|(m, _)| m.yiaddr().is_unspecified())
                .expect("a proxy offer from pxed beside Kea");
            assert_eq!(dc::boot_file(proxy).as_deref(), Some("ipxe.efi"));
            assert_eq!(
                *from,
                "198.18.0.1:67".parse().unwrap(),
                "sent from port 67 like any DHCP server"
            );
            // The client takes its address from Kea, untouched by pxed.
            let request = dc::message(
                MessageType::Request,
                mac,
                xid,
                true,
                vec![
                    DhcpOption::ServerIdentifier(dc::server_id(address_offer).unwrap()),
                    DhcpOption::RequestedIpAddress(address_offer.yiaddr()),
                ],
            );
            let acks = dc::exchange(&socket, &request, xid, Duration::from_secs(3));
            assert!(
                acks.iter()
                    .any(|(m, _)| dc::kind(m) == Some(MessageType::Ack)
                        && m.yiaddr() == address_offer.yiaddr()),
                "Kea ACKs: {acks:?}"
            );
            assert!(
                acks.iter()
                    .all(|(m, _)| dc::kind(m) == Some(MessageType::Ack)),
                "pxed stays out of the REQUEST: {acks:?}"
            );
        })
        .unwrap();
    wait_for_file_text(&log, "proxy OFFER", Duration::from_secs(5));
}

/// Kea on eth0 in its default (raw socket) mode, memfile leases in `dir`.
fn kea_config_json(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["eth0"]}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{dir}/kea-leases.csv"}},
  "valid-lifetime": 3600,
  "subnet4": [{{"subnet": "198.18.0.0/24", "pools": [{{"pool": "198.18.0.100 - 198.18.0.150"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "stdout"}}], "severity": "INFO"}}]
}}}}"#
    )
}

/// Options an operator sets reach a real client, each level's where the
/// level above sets nothing: the subnet's option 224 (by code, hex), the
/// default profile's domain search list (119), and the machine's NTP
/// server (42), which replaces the profile's and the subnet's. Options the
/// client did not ask for (option 55) are left out unless always sent.
/// The same again when udhcpc renews.
#[test]
fn udhcpc_gets_the_options_of_its_subnet_profile_and_machine() {
    if !pxe_lab::privileged("udhcpc_gets_the_options_of_its_subnet_profile_and_machine")
        || !have_tool("busybox", "busybox")
    {
        return;
    }
    let served = served_with_config(|client| {
        let mac = mac_of(client);
        format!(
            r#"
[dhcp]
mode = "full"

[[dhcp.subnet]]
network = "198.18.0.0/24"
pools = ["{POOL}"]
[dhcp.subnet.options]
ntp-servers = ["198.18.0.41"]
"224" = {{ type = "hex", value = "01:02:ab" }}
"225" = {{ type = "u8", value = 7 }}
"226" = {{ type = "string", value = "rack-7", always_send = true }}

[[profile]]
name = "default"
[profile.options]
ntp-servers = ["198.18.0.42"]
domain-search = ["rack7.example.net", "example.net"]

[[machine]]
mac = "{mac}"
[machine.options]
ntp-servers = ["198.18.0.43", "198.18.0.44"]
"#
        )
    });
    let (lab, client, work) = (&served.lab, &served.client, served.work.path());

    let dir = work.to_str().unwrap();
    let script = write_script(
        work,
        "udhcpc.sh",
        &format!(
            r#"
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"
    env > "{dir}/$1.env" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
"#
        ),
    );
    let out = work.join("udhcpc.log");
    let pid = lab
        .spawn_logged(
            client,
            "busybox",
            &[
                "udhcpc", "-i", "eth0", "-f", "-t", "5", "-T", "1", "-O", "ntpsrv", "-O", "224",
                "-O", "119", "-s", &script,
            ],
            &out,
        )
        .unwrap();
    let check = |event: &str| {
        let path = work.join(format!("{event}.env"));
        wait_for_file_text(&path, "ntpsrv=", Duration::from_secs(20));
        let env = std::fs::read_to_string(&path).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        assert_eq!(
            var("ntpsrv").as_deref(),
            Some("198.18.0.43 198.18.0.44"),
            "{env}"
        );
        assert_eq!(var("opt224").as_deref(), Some("0102ab"), "{env}");
        assert_eq!(var("opt225"), None, "not asked for: {env}");
        assert_eq!(
            var("opt226").as_deref(),
            Some("7261636b2d37"),
            "always sent: {env}"
        );
        assert_eq!(
            var("search").as_deref(),
            Some("rack7.example.net example.net"),
            "{env}"
        );
    };
    check("bound");
    kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).unwrap(); // renew now
    check("renew");
}

/// Options that overflow the 576-byte datagram udhcpc takes (its option 57)
/// continue in the file and sname fields (option 52), and udhcpc, which
/// reads them there, hands its script every one; the log says so.
#[test]
fn options_beyond_the_options_field_reach_udhcpc_through_file_and_sname() {
    if !pxe_lab::privileged("options_beyond_the_options_field_reach_udhcpc_through_file_and_sname")
        || !have_tool("busybox", "busybox")
    {
        return;
    }
    // Six options of 60 bytes: 372 bytes, more than the options field of a
    // 576-byte reply holds beside the lease's own.
    let sixty = "x".repeat(60);
    let served = served_with_config(|_| {
        let mut config = FULL_MODE_ON_POOL.to_owned() + "[dhcp.subnet.options]\n";
        for code in 224..230 {
            config.push_str(&format!(
                "\"{code}\" = {{ type = \"string\", value = \"{sixty}\", always_send = true }}\n"
            ));
        }
        config + "[[profile]]\nname = \"default\"\n"
    });
    let (client, work) = (&served.client, served.work.path());
    let dir = work.to_str().unwrap();
    let script = write_script(
        work,
        "udhcpc.sh",
        &format!("\ncase \"$1\" in\n  bound) env > \"{dir}/bound.env\" ;;\nesac\n"),
    );
    let out = client
        .output(
            "busybox",
            &[
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-s", &script,
            ],
        )
        .unwrap();
    let log = std::fs::read_to_string(work.join("pxed.log")).unwrap_or_default();
    let env = std::fs::read_to_string(work.join("bound.env")).unwrap_or_else(|_| {
        panic!(
            "no lease:\n{}{}\npxed:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let hex: String = sixty.bytes().map(|b| format!("{b:02x}")).collect();
    for code in 224..230 {
        assert!(
            env.lines().any(|l| l == format!("opt{code}={hex}")),
            "option {code} reached udhcpc's script:\n{env}"
        );
    }
    assert!(
        log.contains("carried in the file/sname fields (overload)"),
        "{log}"
    );
}

/// Full DHCP on the pool with `reserved_mac` reserved 198.18.0.250, the
/// API (metrics public) on the server's address, and `extra` flags; the
/// directory holding the API's token and inventory comes back with it.
fn served_with_a_reserved_machine(
    reserved_mac: &str,
    extra: &[&str],
) -> (ServedWithConfig, tempfile::TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    let token = scratch.path().join("token");
    std::fs::write(&token, "flood-test-token\n").unwrap();
    // The API keeps an inventory: the test's own, never the system's.
    let inventory = scratch.path().join("inventory.redb");
    let mut args = vec![
        "--api",
        "198.18.0.1:8067",
        "--api-token-file",
        token.to_str().unwrap(),
        "--inventory-file",
        inventory.to_str().unwrap(),
        "--metrics-public",
    ];
    args.extend_from_slice(extra);
    let served = served_with(
        |_| {
            FULL_MODE_ON_POOL.to_owned()
                + &format!(
                    "[[profile]]\nname = \"default\"\n[[machine]]\nmac = \"{reserved_mac}\"\naddress = \"198.18.0.250\"\n"
                )
        },
        &args,
    );
    (served, scratch)
}

/// `/metrics` of the server [`served_with_a_reserved_machine`] starts.
fn scrape_metrics(client: &pxe_lab::Netns) -> String {
    let out = client
        .output(
            "curl",
            &["-sS", "--max-time", "10", "http://198.18.0.1:8067/metrics"],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 5,000 DISCOVERs from made-up MACs against a pool of 100: they may hold
/// only half of it, so afterwards a new machine (udhcpc, its own MAC) gets
/// an address at once, and a reserved one (udhcpc again, the reserved MAC)
/// its own. Before the bound, such a flood held all 100 for a minute.
#[test]
fn a_discover_flood_from_made_up_macs_leaves_addresses_for_honest_machines() {
    if !pxe_lab::privileged(
        "a_discover_flood_from_made_up_macs_leaves_addresses_for_honest_machines",
    ) || !have_tool("busybox", "busybox")
        || !have_tool("curl", "curl")
    {
        return;
    }
    use pxe_lab::client::dhcp::{self as client, Identity};
    let reserved_mac = "52:54:00:99:00:01";
    let (served, _scratch) = served_with_a_reserved_machine(reserved_mac, &[]);
    let sent = served
        .client
        .run(|| {
            let socket = dc::client_socket("eth0");
            let mut sent = 0u32;
            for n in 0..5_000u32 {
                let [_, a, b, c] = n.to_be_bytes();
                let mac = [0x02, 0xf1, 0x00, a, b, c];
                let discover =
                    client::request(&Identity::plain(mac), MessageType::Discover, n, vec![]);
                if socket
                    .send_to(&client::encode(&discover), (Ipv4Addr::BROADCAST, 67))
                    .is_ok()
                {
                    sent += 1;
                }
                if n % 100 == 99 {
                    // Paced (about 20,000/s), so the server's socket keeps up.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            sent
        })
        .unwrap();
    assert_eq!(sent, 5_000);
    let log = served.work.path().join("pxed.log");
    wait_for_file_text(
        &log,
        "not held: offers to unknown machines hold 50 addresses",
        Duration::from_secs(20),
    );

    let lease = |what: &str| {
        let (ip, text) = udhcpc_once(&served.client);
        ip.unwrap_or_else(|| {
            panic!(
                "{what}: no lease after the flood:\n{text}\npxed (last lines):\n{}",
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    };
    // The metrics say how many offers went unheld.
    let metrics = scrape_metrics(&served.client);
    let unheld: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("pxed_dhcp_requests_total")
                && l.contains("message=\"discover\"")
                && l.contains("outcome=\"offered_unheld\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no unheld offers counted:\n{metrics}"));
    assert!(unheld > 1_000.0, "{unheld} offers unheld of 5,000");
    let honest = lease("a new machine");
    assert!(in_pool(honest), "{honest}");
    run_ok(
        &served.client,
        "ip",
        &["link", "set", "eth0", "address", reserved_mac],
    );
    assert_eq!(
        lease("the reserved machine"),
        Ipv4Addr::new(198, 18, 0, 250)
    );
}

/// A flood that takes real leases: 100 made-up machines run whole DORAs
/// until the pool of 100 is full; the reserved machine (udhcpc) is still
/// served its own address.
#[test]
fn a_pool_taken_by_a_flood_of_real_leases_still_serves_the_reserved_machine() {
    if !pxe_lab::privileged(
        "a_pool_taken_by_a_flood_of_real_leases_still_serves_the_reserved_machine",
    ) || !have_tool("busybox", "busybox")
        || !have_tool("curl", "curl")
    {
        return;
    }
    let reserved_mac = "52:54:00:99:00:04";
    let (served, _scratch) = served_with_a_reserved_machine(reserved_mac, &[]);
    let leased: std::collections::BTreeSet<Ipv4Addr> = served
        .client
        .run(|| {
            let socket = dc::client_socket("eth0");
            (0..100u32)
                .map(|n| {
                    let [_, a, b, c] = n.to_be_bytes();
                    dc::dora(&socket, [0x02, 0xf3, 0x00, a, b, c], 0x7000 + n).unwrap()
                })
                .collect()
        })
        .unwrap();
    assert_eq!(leased.len(), 100, "every address of the pool leased once");
    assert!(leased.iter().all(|ip| in_pool(*ip)));
    run_ok(
        &served.client,
        "ip",
        &["link", "set", "eth0", "address", reserved_mac],
    );
    let (ip, text) = udhcpc_once(&served.client);
    assert_eq!(
        ip,
        Some(Ipv4Addr::new(198, 18, 0, 250)),
        "the reserved machine with the pool taken:\n{text}"
    );
}

/// The kernel's admission control beside real clients: while over 20,000
/// DISCOVERs and REQUESTs from made-up MACs arrive over 3 s, far past the
/// budget for unknown machines (50/s, 100 at once), a reserved machine
/// (udhcpc) gets its address at once; the flood is dropped in XDP and
/// counted, and userspace sees only the budget. After it, a new machine is
/// admitted again. Meanwhile 2,000 TFTP read requests from one host are
/// refused past its per-source budget, and curl from another address gets
/// its file.
#[test]
fn a_flood_is_dropped_in_the_kernel_while_known_machines_are_served() {
    if !pxe_lab::privileged("a_flood_is_dropped_in_the_kernel_while_known_machines_are_served")
        || !have_tool("busybox", "busybox")
        || !have_tool("curl", "curl")
    {
        return;
    }
    use pxe_lab::client::dhcp::{self as client, Identity};
    let reserved_mac = "52:54:00:99:00:02";
    let (served, _scratch) = served_with_a_reserved_machine(
        reserved_mac,
        &[
            "--admit-dhcp-unknown",
            "50",
            "--admit-dhcp-unknown-burst",
            "100",
        ],
    );
    let log = served.work.path().join("pxed.log");
    wait_for_file_text(&log, "admission control on", Duration::from_secs(10));
    run_ok(
        &served.client,
        "ip",
        &["link", "set", "eth0", "address", reserved_mac],
    );
    served
        .client
        .ip(["addr", "add", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();
    let flood_dhcp = || {
        let socket = dc::client_socket("eth0");
        let started = std::time::Instant::now();
        let mut n = 0u32;
        while started.elapsed() < Duration::from_secs(3) {
            let [_, a, b, c] = n.to_be_bytes();
            let mac = [0x02, 0xf2, 0x00, a, b, c];
            let extra = vec![
                DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 1)),
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(198, 18, 0, 100 + (n % 100) as u8)),
            ];
            let (kind, extra) = if n % 4 == 3 {
                (MessageType::Request, extra)
            } else {
                (MessageType::Discover, vec![])
            };
            let message = client::request(&Identity::plain(mac), kind, n, extra);
            let _ = socket.send_to(&client::encode(&message), (Ipv4Addr::BROADCAST, 67));
            n += 1;
            if n.is_multiple_of(100) {
                // About 10,000 a second: the test VM's own budget.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        n
    };
    let flood_tftp = || {
        let socket = std::net::UdpSocket::bind("198.18.0.3:0").unwrap();
        let mut rrq = vec![0, 1];
        rrq.extend_from_slice(b"ipxe.efi\0octet\0");
        for _ in 0..2_000 {
            let _ = socket.send_to(&rrq, "198.18.0.1:69");
        }
    };
    let (flooded, reserved) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            served
                .client
                .run(|| {
                    flood_tftp();
                    flood_dhcp()
                })
                .unwrap()
        });
        // Served while the flood is on.
        std::thread::sleep(Duration::from_millis(300));
        let reserved = udhcpc_once(&served.client);
        (flood.join().unwrap(), reserved)
    });
    assert!(flooded > 20_000, "{flooded} sent");
    let tail = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        reserved.0,
        Some(Ipv4Addr::new(198, 18, 0, 250)),
        "the reserved machine during the flood:\n{}\npxed:\n{}",
        reserved.1,
        tail()
    );

    let metrics = scrape_metrics(&served.client);
    let sum = |filter: &dyn Fn(&str) -> bool| -> f64 {
        metrics
            .lines()
            .filter(|l| !l.starts_with('#') && filter(l))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let verdict = |name: &str| {
        let wanted = format!("counter=\"{name}\"");
        sum(&|l: &str| l.starts_with("pxed_kernel_verdicts_total") && l.contains(&wanted))
    };
    let dropped = verdict("DROP_DHCP_UNKNOWN_OVER_RATE");
    assert!(
        dropped > f64::from(flooded) * 0.9,
        "{dropped} of {flooded} dropped in the kernel:\n{metrics}"
    );
    let admitted = verdict("SEEN_DHCP_UNKNOWN_ADMITTED");
    // The burst, 50 a second for the flood's few seconds, and a little
    // more for CPUs racing on the bucket.
    assert!(
        (50.0..=600.0).contains(&admitted),
        "{admitted} unknown requests admitted:\n{metrics}"
    );
    // Userspace decided the admitted ones and the reserved machine's.
    let decided = sum(&|l: &str| l.starts_with("pxed_dhcp_requests_total"));
    assert!(
        decided <= admitted + 20.0,
        "userspace decided {decided} requests, the kernel admitted {admitted} unknown ones"
    );
    assert!(
        verdict("DROP_TFTP_SOURCE_OVER_RATE") > 1_500.0,
        "read requests from one host past its budget:\n{metrics}"
    );

    // Another host's TFTP is served, and after the flood a new machine gets
    // an address: the budget refilled.
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("ipxe.efi");
    run_ok(
        &served.client,
        "curl",
        &[
            "-sS",
            "--max-time",
            "20",
            "--interface",
            "198.18.0.2",
            "-o",
            dest.to_str().unwrap(),
            "tftp://198.18.0.1/ipxe.efi",
        ],
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"ipxe");
    std::thread::sleep(Duration::from_secs(1));
    run_ok(
        &served.client,
        "ip",
        &["link", "set", "eth0", "address", "52:54:00:99:00:03"],
    );
    let (honest, text) = udhcpc_once(&served.client);
    let honest =
        honest.unwrap_or_else(|| panic!("a new machine after the flood:\n{text}\n{}", tail()));
    assert!(in_pool(honest), "{honest}");
}

/// The budget for unknown machines of these tests: one request, then one a
/// second. A request that follows another within the second is admitted
/// only if the daemon has told the kernel about its machine.
const ONE_A_SECOND: &[&str] = &[
    "--admit-dhcp-unknown",
    "1",
    "--admit-dhcp-unknown-burst",
    "1",
];

/// The first reply to `message` (broadcast, or sent to `to`) within `wait`.
fn reply_to(
    socket: &UdpSocket,
    message: &dhcproto::v4::Message,
    to: SocketAddrV4,
    wait: Duration,
) -> Option<dhcproto::v4::Message> {
    use pxe_lab::client::dhcp as client;
    socket.send_to(&client::encode(message), to).unwrap();
    dc::first(socket, message.xid(), wait).map(|(m, _)| m)
}

/// The daemon keeps the kernel's table of known machines: a new machine it
/// offers an address is known at once, so its REQUEST passes with the
/// interface's budget spent (the 2 s reconcile is far too late for it, and
/// the budget refills only after a second); once its lease is released the
/// reconcile forgets it, and its next DISCOVER waits for the budget like any
/// stranger's.
#[test]
fn a_machine_is_admitted_from_its_offer_until_its_lease_is_released() {
    if !pxe_lab::privileged("a_machine_is_admitted_from_its_offer_until_its_lease_is_released")
        || !have_tool("curl", "curl")
    {
        return;
    }
    use pxe_lab::client::dhcp::{self as client, Identity};
    let (served, _scratch) = served_with_a_reserved_machine("52:54:00:99:00:05", ONE_A_SECOND);
    let log = served.work.path().join("pxed.log");
    wait_for_file_text(&log, "admission control on", Duration::from_secs(10));
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let server = Ipv4Addr::new(198, 18, 0, 1);
    let wait = Duration::from_millis(500);
    let discover = |mac: [u8; 6], xid: u32| {
        client::request(&Identity::plain(mac), MessageType::Discover, xid, vec![])
    };
    served
        .client
        .run(|| {
            let socket = dc::client_socket("eth0");
            let mut leased = Vec::new();
            for n in 0..3u8 {
                // A full bucket (one request), which the DISCOVER takes.
                std::thread::sleep(Duration::from_millis(1_100));
                let mac = [0x02, 0xa0, 0, 0, 0, n];
                let xid = 0x5100 + u32::from(n);
                let offer = reply_to(&socket, &discover(mac, xid), broadcast, wait)
                    .unwrap_or_else(|| panic!("machine {n}: no OFFER with the bucket full"));
                let request = client::request(
                    &Identity::plain(mac),
                    MessageType::Request,
                    xid,
                    vec![
                        DhcpOption::ServerIdentifier(server),
                        DhcpOption::RequestedIpAddress(offer.yiaddr()),
                    ],
                );
                let ack = reply_to(&socket, &request, broadcast, wait)
                    .unwrap_or_else(|| panic!("machine {n}: its REQUEST was refused"));
                assert_eq!(dc::kind(&ack), Some(MessageType::Ack), "machine {n}");
                // The budget is spent indeed: a stranger now is refused.
                let stranger = discover([0x02, 0xa1, 0, 0, 0, n], 0x5200 + u32::from(n));
                assert!(
                    reply_to(&socket, &stranger, broadcast, wait).is_none(),
                    "round {n}: a stranger was admitted with the budget spent"
                );
                leased.push((mac, ack.yiaddr()));
            }
            // The first machine releases its lease; within the reconcile's
            // 2 s it is a stranger again (and the bucket has refilled).
            let (mac, ip) = leased[0];
            let mut release = client::request(
                &Identity::plain(mac),
                MessageType::Release,
                0x5300,
                vec![DhcpOption::ServerIdentifier(server)],
            );
            release.set_ciaddr(ip);
            socket
                .send_to(&client::encode(&release), broadcast)
                .unwrap();
            std::thread::sleep(Duration::from_millis(3_000));
            assert!(
                reply_to(
                    &socket,
                    &discover([0x02, 0xa2, 0, 0, 0, 0], 0x5400),
                    broadcast,
                    wait
                )
                .is_some(),
                "a stranger with the bucket refilled"
            );
            assert!(
                reply_to(&socket, &discover(mac, 0x5401), broadcast, wait).is_none(),
                "the released machine is still admitted with the budget spent"
            );
            let (still, _) = leased[1];
            assert!(
                reply_to(&socket, &discover(still, 0x5402), broadcast, wait).is_some(),
                "a machine with a live lease is admitted with the budget spent"
            );
        })
        .unwrap();
}

/// A relay pxed has answered through gets a budget of its own: requests
/// through relays not answered yet (here a second one) share one bucket, and
/// when it is spent the answered relay's machines are still admitted.
#[test]
fn a_relay_answered_gets_a_budget_of_its_own() {
    if !pxe_lab::privileged("a_relay_answered_gets_a_budget_of_its_own") {
        return;
    }
    use pxe_lab::client::dhcp::{self as client, Identity};
    let relays = [Ipv4Addr::new(198, 18, 7, 1), Ipv4Addr::new(198, 18, 8, 1)];
    let served = served_with(
        |_| {
            FULL_MODE_ON_POOL.to_owned()
                + r#"
[[dhcp.subnet]]
network = "198.18.7.0/24"
pools = ["198.18.7.10-198.18.7.50"]
[[dhcp.subnet]]
network = "198.18.8.0/24"
pools = ["198.18.8.10-198.18.8.50"]
"#
        },
        ONE_A_SECOND,
    );
    let log = served.work.path().join("pxed.log");
    wait_for_file_text(&log, "admission control on", Duration::from_secs(10));
    for relay in relays {
        served
            .client
            .ip(["addr", "add", &format!("{relay}/32"), "dev", "eth0"])
            .unwrap();
        served
            .server
            .ip(["route", "add", &format!("{relay}/32"), "via", "198.18.0.2"])
            .unwrap();
    }
    let relayed = |relay: Ipv4Addr, mac: [u8; 6], xid: u32| {
        let mut m = client::request(&Identity::plain(mac), MessageType::Discover, xid, vec![]);
        m.set_giaddr(relay).set_hops(1);
        m
    };
    let server = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 67);
    let wait = Duration::from_millis(300);
    served
        .client
        .run(|| {
            // The relays' side: replies come to port 67 of the giaddr.
            let socket = UdpSocket::bind("0.0.0.0:67").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let started = std::time::Instant::now();
            let first = reply_to(
                &socket,
                &relayed(relays[0], [2, 0xb0, 0, 0, 0, 1], 0x6001),
                server,
                wait,
            )
            .expect("the first relayed DISCOVER, with the new relays' bucket full");
            assert_eq!(first.yiaddr().octets()[..3], [198, 18, 7]);
            assert!(
                reply_to(
                    &socket,
                    &relayed(relays[1], [2, 0xb0, 0, 0, 0, 2], 0x6002),
                    server,
                    wait
                )
                .is_none(),
                "a second new relay shares the spent bucket of relays not answered"
            );
            let again = reply_to(
                &socket,
                &relayed(relays[0], [2, 0xb0, 0, 0, 0, 3], 0x6003),
                server,
                wait,
            )
            .expect("the answered relay's own budget admits its next machine");
            assert_eq!(again.yiaddr().octets()[..3], [198, 18, 7]);
            // All within the second the shared bucket takes to refill.
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "{:?}",
                started.elapsed()
            );
        })
        .unwrap();
    wait_for_file_text(
        &log,
        "this relay's unknown machines get a budget of their own",
        Duration::from_secs(1),
    );
}

/// A profile whose boot files are on another TFTP server: its machines'
/// offers name that host as next-server and in option 66, and still carry
/// the profile's boot file; a machine of another profile gets pxed's own.
#[test]
fn a_profile_can_send_its_machines_to_another_tftp_server() {
    if !pxe_lab::privileged("a_profile_can_send_its_machines_to_another_tftp_server") {
        return;
    }
    let served = served_with_config(|_| {
        FULL_MODE_ON_POOL.to_owned()
            + r#"
[[profile]]
name = "default"

[[profile]]
name = "elsewhere"
tftp_server = "198.18.0.9"

[[machine]]
mac = "52:54:00:99:00:09"
profile = "elsewhere"
"#
    });
    let offer_to = |mac: [u8; 6], xid: u32| {
        served
            .client
            .run(move || {
                let socket = dc::client_socket("eth0");
                dc::ask(
                    &socket,
                    &dc::message(MessageType::Discover, mac, xid, true, vec![]),
                    xid,
                    Duration::from_secs(3),
                )
            })
            .unwrap()
            .expect("an offer")
    };
    let tftp_server_name =
        |m: &dhcproto::v4::Message| match m.opts().get(OptionCode::TFTPServerName) {
            Some(DhcpOption::TFTPServerName(name)) => String::from_utf8_lossy(name).into_owned(),
            other => panic!("option 66: {other:?}"),
        };
    let elsewhere = offer_to([0x52, 0x54, 0x00, 0x99, 0x00, 0x09], 0x5eed_0009);
    assert_eq!(elsewhere.siaddr(), Ipv4Addr::new(198, 18, 0, 9));
    assert_eq!(tftp_server_name(&elsewhere), "198.18.0.9");
    assert_eq!(dc::boot_file(&elsewhere).as_deref(), Some("ipxe.efi"));
    let here = offer_to([0x52, 0x54, 0x00, 0x99, 0x00, 0x0a], 0x5eed_000a);
    assert_eq!(here.siaddr(), Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(tftp_server_name(&here), "198.18.0.1");
}

/// A Raspberry Pi 4's DISCOVER, byte for byte as its boot ROM sends it
/// (the tcpdump of one in the Raspberry Pi documentation's network-boot
/// guide): options 53, 55 (1 3 43 60 66 67 128-135), 93 = 0, 94 = 1.2.1,
/// 97 (type 0 and sixteen bytes 0x44) and 60 "PXEClient:Arch:00000:UNDI:002001".
/// One bit differs: the broadcast flag is set, as the test's socket has no
/// address to receive dnsmasq's unicast offer on.
fn raspberry_pi_4_discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut d = vec![1, 1, 6, 0];
    d.extend_from_slice(&xid.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0x80, 0]); // secs; flags: broadcast
    d.extend_from_slice(&[0; 16]); // ciaddr, yiaddr, siaddr, giaddr
    d.extend_from_slice(&mac);
    d.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr padding, sname, file
    d.extend_from_slice(&[99, 130, 83, 99]);
    d.extend_from_slice(&[53, 1, 1]);
    d.extend_from_slice(&[
        55, 14, 1, 3, 43, 60, 66, 67, 128, 129, 130, 131, 132, 133, 134, 135,
    ]);
    d.extend_from_slice(&[93, 2, 0, 0]);
    d.extend_from_slice(&[94, 3, 1, 2, 1]);
    d.extend_from_slice(&[97, 17, 0]);
    d.extend_from_slice(&[0x44; 16]);
    d.push(60);
    d.push(32);
    d.extend_from_slice(b"PXEClient:Arch:00000:UNDI:002001");
    d.push(255);
    d
}

/// A Raspberry Pi (its OUI, its boot ROM's DISCOVER) is offered the boot
/// menu its ROM looks for, byte for byte what dnsmasq's
/// `pxe-service=0,"Raspberry Pi Boot"` sends it, with pxed as its TFTP
/// server in option 66.
#[test]
fn a_raspberry_pi_is_offered_the_boot_menu_dnsmasq_would_send_it() {
    if !pxe_lab::privileged("a_raspberry_pi_is_offered_the_boot_menu_dnsmasq_would_send_it")
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let mac = [0xdc, 0xa6, 0x32, 0x01, 0x02, 0x03];
    let vendor_option = |m: &dhcproto::v4::Message| match m.opts().get(OptionCode::VendorExtensions)
    {
        Some(DhcpOption::VendorExtensions(bytes)) => bytes.clone(),
        other => panic!("option 43: {other:?}"),
    };
    let offer_from = |client: &pxe_lab::Netns, xid: u32| {
        client
            .run(move || {
                let socket = dc::client_socket("eth0");
                dc::ask(
                    &socket,
                    &raspberry_pi_4_discover(mac, xid),
                    xid,
                    Duration::from_secs(3),
                )
            })
            .unwrap()
    };

    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab.pair().build().unwrap();
    let work = tempfile::tempdir().unwrap();
    Dnsmasq::new()
        .interface("eth0")
        .dhcp_range("198.18.0.100,198.18.0.150,1h")
        .lease_file(&work.path().join("dnsmasq.leases"))
        .no_ping()
        .arg("--log-dhcp")
        .arg("--pxe-service=0,Raspberry Pi Boot")
        .spawn(&lab, &server, &work.path().join("dnsmasq.log"))
        .unwrap();
    assert!(server.wait_for_udp_port(67, Duration::from_secs(20)));
    let dnsmasq_offer = offer_from(&client, 0x9100_0001).unwrap_or_else(|| {
        panic!(
            "no offer from dnsmasq:\n{}",
            std::fs::read_to_string(work.path().join("dnsmasq.log")).unwrap_or_default()
        )
    });
    let from_dnsmasq = vendor_option(&dnsmasq_offer);
    drop(lab);

    let served = served_with_config(|_| FULL_MODE_ON_POOL.to_owned());
    let offer = offer_from(&served.client, 0x9100_0002).expect("an offer from pxed");
    assert_eq!(vendor_option(&offer), from_dnsmasq);
    assert!(
        String::from_utf8_lossy(&from_dnsmasq).contains("Raspberry Pi Boot"),
        "{from_dnsmasq:?}"
    );
    match offer.opts().get(OptionCode::TFTPServerName) {
        Some(DhcpOption::TFTPServerName(name)) => assert_eq!(name.as_slice(), b"198.18.0.1"),
        other => panic!("option 66: {other:?}"),
    }
}

/// Classes choose a machine's profile and options from what its requests
/// say. A UEFI machine (vendor class prefix) boots the class's profile:
/// firmware gets its boot file, iPXE a script URL that names the class,
/// and the script served at that URL, which carries no vendor class, is
/// that profile's. A plain client with another vendor class gets its
/// class's option, and one that matches no class neither.
#[test]
fn classes_choose_the_profile_and_options_from_the_request() {
    if !pxe_lab::privileged("classes_choose_the_profile_and_options_from_the_request")
        || !have_tool("curl", "curl")
    {
        return;
    }
    use pxe_lab::client::dhcp::{self as client, Identity};
    let served = served_with_config(|_| {
        FULL_MODE_ON_POOL.to_owned()
            + r##"
[[profile]]
name = "default"
[[profile]]
name = "rescue"
ipxe_script = "#!ipxe\necho rescue for {{mac}}\n"
[profile.boot_files]
uefi_x64 = "rescue.efi"

[[class]]
name = "uefi-rescue"
vendor_class = "PXEClient:Arch:00007"
profile = "rescue"
[class.options]
ntp-servers = { value = ["198.18.0.77"], always_send = true }

[[class]]
name = "vendor-a"
vendor_class = "vendor-a"
[class.options]
"224" = { type = "string", value = "from-a", always_send = true }
"##
    });
    let offer = |identity: Identity, xid: u32| {
        served
            .client
            .run(move || {
                let socket = dc::client_socket("eth0");
                let bytes = client::encode(&client::request(
                    &identity,
                    MessageType::Discover,
                    xid,
                    vec![],
                ));
                dc::ask(&socket, &bytes, xid, Duration::from_secs(3))
            })
            .unwrap()
            .expect("an offer")
    };
    // An option's value as it went on the wire (after its code and length).
    let raw = |m: &dhcproto::v4::Message, code: u8| {
        m.opts().get(OptionCode::from(code)).map(|option| {
            let mut bytes = Vec::new();
            dhcproto::Encodable::encode(option, &mut dhcproto::Encoder::new(&mut bytes)).unwrap();
            bytes[2..].to_vec()
        })
    };
    let mac = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];
    let uefi = Identity {
        vendor_class: Some(dc::UEFI_VENDOR_CLASS.to_vec()),
        arch: Some(7),
        ..Identity::plain(mac)
    };
    let firmware = offer(uefi.clone(), 0xc1a5_0001);
    assert_eq!(dc::boot_file(&firmware).as_deref(), Some("rescue.efi"));
    assert_eq!(raw(&firmware, 42), Some(vec![198, 18, 0, 77]));

    let ipxe = offer(uefi.as_ipxe(), 0xc1a5_0002);
    let url = dc::boot_file(&ipxe).expect("a script URL");
    assert!(url.ends_with("&class=uefi-rescue"), "{url}");
    let script = served
        .client
        .output("curl", &["-sS", "--max-time", "10", &url])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&script.stdout),
        "#!ipxe\necho rescue for 52:54:00:77:00:01\n"
    );

    let vendor_a = Identity {
        vendor_class: Some(b"vendor-a".to_vec()),
        ..Identity::plain([0x52, 0x54, 0x00, 0x77, 0x00, 0x02])
    };
    let a = offer(vendor_a, 0xc1a5_0003);
    assert_eq!(raw(&a, 224), Some(b"from-a".to_vec()));
    assert_eq!(raw(&a, 42), None);
    let plain = offer(
        Identity::plain([0x52, 0x54, 0x00, 0x77, 0x00, 0x03]),
        0xc1a5_0004,
    );
    assert_eq!((raw(&plain, 224), raw(&plain, 42)), (None, None));
}
