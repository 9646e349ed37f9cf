//! DHCP answered by the kernel, end to end in namespaces with the real
//! `pxed` (XDP and TC attached to a veth) and real clients: busybox udhcpc
//! and ISC dhclient are told exactly the same with the kernel path on as
//! with it off, the counters show which path answered, and a renewal the
//! kernel ACKed is on disk when pxed is SIGKILLed right after; the log says,
//! per machine, how many requests the kernel answered. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, SystemTime},
};

use common::{dhcp_client as dc, have_tool, run_ok, write_script, PXED};
use dhcproto::v4::MessageType;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use pxe_lab::{Lab, Netns};
use pxe_user::lease::{LeaseStore, RedbLeaseStore};

const POOL: &str = "198.18.0.100-198.18.0.199";
const UDHCPC_MAC: &str = "52:54:00:00:10:01";
const DHCLIENT_MAC: &str = "52:54:00:00:10:02";

struct Server {
    lab: Lab,
    client: Netns,
    pid: u32,
    log: std::path::PathBuf,
    work: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let lab = Lab::new().expect("creating the lab");
        let pxe_lab::Pair { server, client } = lab.pair().build().unwrap();
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"ipxe").unwrap();
        let leases = work.path().join("leases.redb");
        let log = work.path().join("pxed.log");
        let mut args = vec![
            "--interface",
            "eth0",
            "--boot-root",
            root.to_str().unwrap(),
            "--dhcp",
            "full",
            "--range",
            POOL,
            "--lease-file",
            leases.to_str().unwrap(),
            "--lease-time",
            "600",
            "--authoritative",
        ];
        args.extend_from_slice(extra);
        let pid = lab
            .spawn_logged(&server, PXED, &args, &log)
            .expect("starting pxed");
        assert!(
            server.wait_for_udp_port(67, Duration::from_secs(20)),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            lab,
            client,
            pid,
            log,
            work,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops pxed (SIGTERM) and returns the replies its programs sent, from
    /// the final counters: (XDP in place, TC).
    fn stop(&self) -> (u64, u64) {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM).unwrap();
        if let Some(mut child) = self.lab.take_child(self.pid) {
            let _ = child.wait();
        }
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("final counters"))
            .unwrap_or_else(|| panic!("no final counters:\n{log}"));
        (
            counter(line, "TX_DHCP_REPLY"),
            counter(line, "REDIRECT_DHCP_REPLY"),
        )
    }
}

fn counter(line: &str, name: &str) -> u64 {
    let needle = format!("{name}=");
    line.split(needle.as_str())
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What a client was told, as its script saw it: `NAME=value` lines.
fn told(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Two udhcpc runs and two dhclient runs from fixed MACs; returns what
/// each run was told.
fn clients_told(s: &Server) -> Vec<BTreeMap<String, String>> {
    let dir = s.work.path();
    let mut seen = Vec::new();
    // udhcpc: a whole DORA each run (-q quits with the lease).
    s.client
        .output("ip", &["link", "set", "eth0", "address", UDHCPC_MAC])
        .unwrap();
    for run in 0..2 {
        let out = dir.join(format!("udhcpc-{run}.env"));
        let script = write_script(dir, &format!("udhcpc-{run}.sh"), &format!(
            "[ \"$1\" = bound ] && for v in ip subnet router dns domain lease serverid siaddr boot_file; do eval echo \"$v=\\${{$v}}\"; done > {}\nexit 0\n",
            out.display()
        ));
        run_ok(
            &s.client,
            "busybox",
            &[
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", &script,
            ],
        );
        seen.push(told(&out));
    }
    // dhclient: a fresh DORA, then with its lease file an INIT-REBOOT REQUEST.
    s.client
        .output("ip", &["link", "set", "eth0", "address", DHCLIENT_MAC])
        .unwrap();
    let lf = dir.join("dhclient.leases");
    let pf = dir.join("dhclient.pid");
    for run in 0..2 {
        let out = dir.join(format!("dhclient-{run}.env"));
        let script = write_script(dir, &format!("dhclient-{run}.sh"), &format!(
            "case \"$reason\" in PREINIT) ip link set \"$interface\" up ;; BOUND|REBOOT) \
             for v in new_ip_address new_subnet_mask new_routers new_domain_name_servers new_domain_name new_dhcp_lease_time \
             new_dhcp_server_identifier new_next_server new_filename; do eval echo \"$v=\\${{$v}}\"; done > {} ;; esac\nexit 0\n",
            out.display()
        ));
        let args = [
            "-1",
            "-v",
            "-sf",
            &script,
            "-lf",
            lf.to_str().unwrap(),
            "-pf",
            pf.to_str().unwrap(),
            "eth0",
        ];
        run_ok(&s.client, "dhclient", &args);
        // dhclient -1 stays in the background once bound: stop it, by its PID.
        common::stop_by_pid_file(&pf);
        seen.push(told(&out));
    }
    seen
}

#[test]
fn udhcpc_and_dhclient_are_told_the_same_with_the_kernel_answering_as_without() {
    if !pxe_lab::privileged(
        "udhcpc_and_dhclient_are_told_the_same_with_the_kernel_answering_as_without",
    ) || !have_tool("busybox", "busybox")
        || !have_tool("dhclient", "isc-dhcp-client")
    {
        return;
    }
    let kernel = Server::start(&[]);
    let with_kernel = clients_told(&kernel);
    let (xdp, tc) = kernel.stop();
    let userspace = Server::start(&["--no-kernel-dhcp"]);
    let without = clients_told(&userspace);
    let (xdp_off, tc_off) = userspace.stop();
    eprintln!("kernel on: {xdp} XDP and {tc} TC replies; told {with_kernel:?}");

    assert_eq!(
        with_kernel, without,
        "clients were told something else with the kernel answering"
    );
    for (run, t) in with_kernel.iter().enumerate() {
        let ip: Ipv4Addr = t
            .get("ip")
            .or(t.get("new_ip_address"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (Ipv4Addr::new(198, 18, 0, 100)..=Ipv4Addr::new(198, 18, 0, 199)).contains(&ip),
            "run {run}: {t:?}"
        );
    }
    assert_eq!(
        with_kernel[0], with_kernel[1],
        "udhcpc's second run got its lease again"
    );
    // udhcpc's second DISCOVER and REQUEST, dhclient's INIT-REBOOT REQUEST:
    // on a veth, XDP leaves them to TC (native XDP_TX would be dropped).
    assert!(
        tc >= 3,
        "the kernel sent {tc} replies by TC and {xdp} by XDP:\n{}",
        kernel.log()
    );
    assert_eq!(xdp, 0);
    // The log says, per machine, what the kernel answered for it.
    let log = kernel.log();
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the kernel answered"))
        .collect();
    let answered: u64 = logged
        .iter()
        .filter_map(|l| {
            l.split("the kernel answered ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(answered, xdp + tc, "{}", logged.join("\n"));
    assert!(
        logged
            .iter()
            .all(|l| l.contains("mac=") && l.contains("address=198.18.0.")),
        "{}",
        logged.join("\n")
    );
    assert_eq!(
        (xdp_off, tc_off),
        (0, 0),
        "--no-kernel-dhcp: userspace answers everything"
    );
    assert!(
        userspace.log().contains("(INIT-REBOOT)"),
        "dhclient's second run asked for its lease back"
    );
}

#[test]
fn a_renewal_the_kernel_acked_is_on_disk_when_pxed_is_killed_right_after() {
    if !pxe_lab::privileged("a_renewal_the_kernel_acked_is_on_disk_when_pxed_is_killed_right_after")
    {
        return;
    }
    let s = Server::start(&[]);
    let mac = [0x52, 0x54, 0x00, 0x00, 0x20, 0x01];
    let (ip, acked_at) = s
        .client
        .run(move || {
            let socket = dc::client_socket("eth0");
            let ip = dc::dora(&socket, mac, 0x2001).unwrap();
            // A little later (the disk's expiry must cover a promise made
            // after the first ACK), the same client asks again: the kernel
            // answers from its template.
            std::thread::sleep(Duration::from_secs(2));
            assert_eq!(
                dc::reboot_request(&socket, mac, 0x2002, ip),
                Some(MessageType::Ack)
            );
            (
                ip,
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            )
        })
        .unwrap();
    kill(Pid::from_raw(s.pid as i32), Signal::SIGKILL).unwrap();
    if let Some(mut child) = s.lab.take_child(s.pid) {
        let _ = child.wait();
    }
    assert!(
        !s.log().contains("(INIT-REBOOT)"),
        "userspace answered the renewal; the kernel should have:\n{}",
        s.log()
    );

    let store = RedbLeaseStore::open(&s.work.path().join("leases.redb")).unwrap();
    let lease = store
        .load_all()
        .unwrap()
        .into_iter()
        .find(|l| l.ip == ip)
        .expect("the lease is on disk");
    assert_eq!(lease.mac, mac);
    assert!(
        lease.expires >= acked_at + 600,
        "the kernel's ACK at {acked_at} promised {ip} until {}, the disk holds it until {}",
        acked_at + 600,
        lease.expires
    );
}

/// A request as many clients send it: padded after its END option to the
/// 548 bytes of a minimum-size DHCP datagram, so the reply fits in place.
fn padded(
    kind: MessageType,
    mac: [u8; 6],
    xid: u32,
    extra: Vec<dhcproto::v4::DhcpOption>,
) -> Vec<u8> {
    let mut d = dc::message(kind, mac, xid, true, extra);
    d.resize(548, 0);
    d
}

#[test]
fn xdp_in_generic_mode_answers_repeat_requests_in_place_on_the_wire() {
    use dhcproto::v4::DhcpOption;
    if !pxe_lab::privileged("xdp_in_generic_mode_answers_repeat_requests_in_place_on_the_wire") {
        return;
    }
    let s = Server::start(&["--xdp-mode", "generic"]);
    let mac = [0x52, 0x54, 0x00, 0x00, 0x30, 0x01];
    let (first, again) = s
        .client
        .run(move || {
            let socket = dc::client_socket("eth0");
            let dora = |xid: u32| {
                let offer = dc::ask(
                    &socket,
                    &padded(MessageType::Discover, mac, xid, vec![]),
                    xid,
                    Duration::from_secs(2),
                )
                .expect("an OFFER");
                let request = padded(
                    MessageType::Request,
                    mac,
                    xid + 1,
                    vec![
                        DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 1)),
                        DhcpOption::RequestedIpAddress(offer.yiaddr()),
                    ],
                );
                let ack =
                    dc::ask(&socket, &request, xid + 1, Duration::from_secs(2)).expect("an ACK");
                (offer, ack)
            };
            (dora(0x3000), dora(0x4000))
        })
        .unwrap();
    let (xdp, tc) = s.stop();
    // The second exchange came from XDP; apart from the transaction id, it
    // is the first one again.
    assert_eq!((xdp, tc), (2, 0), "{}", s.log());
    assert_eq!(dc::kind(&first.1), Some(MessageType::Ack));
    for ((mut kernel, userspace), what) in [(again.0, first.0), (again.1, first.1)]
        .into_iter()
        .zip(["OFFER", "ACK"])
    {
        kernel.set_xid(userspace.xid());
        assert_eq!(
            kernel, userspace,
            "{what} from XDP differs from userspace's"
        );
    }
}

#[test]
fn sighup_takes_every_kernel_answer_back() {
    if !pxe_lab::privileged("sighup_takes_every_kernel_answer_back") {
        return;
    }
    // A config to reload: every key is optional, flags give the rest.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("pxed.toml");
    std::fs::write(&config, "# every key from the command line\n").unwrap();
    let s = Server::start(&["--config", config.to_str().unwrap()]);
    let mac = [0x52, 0x54, 0x00, 0x00, 0x40, 0x01];
    let ask_again = |xid: u32, ip: Ipv4Addr| {
        s.client
            .run(move || dc::reboot_request(&dc::client_socket("eth0"), mac, xid, ip))
            .unwrap()
    };
    let ip = s
        .client
        .run(move || dc::dora(&dc::client_socket("eth0"), mac, 0x4001).unwrap())
        .unwrap();
    assert_eq!(ask_again(0x4002, ip), Some(MessageType::Ack));
    assert!(
        !s.log().contains("(INIT-REBOOT)"),
        "the kernel should have answered:\n{}",
        s.log()
    );

    kill(Pid::from_raw(s.pid as i32), Signal::SIGHUP).unwrap();
    common::wait_for_file_text(&s.log, "SIGHUP: config reloaded", Duration::from_secs(10));
    // Any answer may have changed with the config: userspace decides again.
    assert_eq!(ask_again(0x4003, ip), Some(MessageType::Ack));
    common::wait_for_file_text(&s.log, "(INIT-REBOOT)", Duration::from_secs(5));
}
