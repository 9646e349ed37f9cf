//! The programs attached to a veth in a throwaway namespace, in native and in
//! generic XDP mode, with real UDP traffic from a peer namespace: the counters
//! must show exactly what was sent. Needs root.

use std::{
    net::UdpSocket,
    thread::sleep,
    time::{Duration, Instant},
};

use pxe_common::counter::Counter;
use pxe_lab::{Lab, Netns};
use pxe_user::fastpath::{AttachedXdp, Counters, FastPath, XdpModeChoice};

const SERVER: &str = "198.18.0.1";
const TRANSFER_PORT: u16 = 40_001;
const PER_PORT: u64 = 5;

/// (destination port, the counter it must land in)
const TRAFFIC: [(u16, Counter); 6] = [
    (67, Counter::PASS_DHCP_TO_SERVER),
    (68, Counter::PASS_DHCP_TO_CLIENT),
    (4011, Counter::PASS_PROXY_DHCP),
    (69, Counter::PASS_TFTP_REQUEST),
    (TRANSFER_PORT, Counter::PASS_TFTP_TRANSFER),
    (5000, Counter::PASS_OTHER_UDP),
];

fn lab() -> (Lab, Netns, Netns) {
    let lab = Lab::new().expect("creating the lab");
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    (lab, server, client)
}

/// What is sent to `port`: a DHCP DISCOVER of a client the kernel has no
/// answer for (67, 4011; the programs read DHCP and pass it), else a probe.
fn payload(port: u16) -> Vec<u8> {
    if port != 67 && port != 4011 {
        return b"pxe-lab probe".to_vec();
    }
    let mut p = vec![0u8; 300];
    p[..3].copy_from_slice(&[1, 1, 6]); // BOOTREQUEST, Ethernet, 6-byte MAC
    p[28..34].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    p[236..244].copy_from_slice(&[99, 130, 83, 99, 53, 1, 1, 255]); // cookie, DISCOVER, end
    p
}

fn send_traffic(client: &Netns) {
    client
        .run(|| {
            let socket = UdpSocket::bind("198.18.0.2:0").expect("binding the client socket");
            for (port, _) in TRAFFIC {
                for _ in 0..PER_PORT {
                    socket
                        .send_to(&payload(port), (SERVER, port))
                        .expect("sending a probe");
                }
            }
        })
        .unwrap();
}

/// Polls until every expected counter has its count (packets cross the veth
/// asynchronously), then returns the counters.
fn settled_counters(fastpath: &FastPath, check_tc: bool) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = fastpath.counters().unwrap();
        let done = TRAFFIC.iter().all(|(_, counter)| {
            c.xdp.get(*counter) >= PER_PORT && (!check_tc || c.tc.get(*counter) >= PER_PORT)
        });
        if done || Instant::now() > deadline {
            return c;
        }
        sleep(Duration::from_millis(20));
    }
}

fn attach_and_count(choice: XdpModeChoice, want: AttachedXdp) {
    let (_lab, server, client) = lab();
    let fastpath = server
        .run(move || {
            let mut fastpath = FastPath::load().expect("loading the BPF object");
            let got = fastpath.attach_xdp("eth0", choice).expect("attaching XDP");
            assert_eq!(got, Some(want), "attached mode");
            fastpath.attach_tc("eth0").expect("attaching TC");
            fastpath.register_transfer_port(TRANSFER_PORT).unwrap();
            fastpath
        })
        .unwrap();

    send_traffic(&client);
    let counters = settled_counters(&fastpath, true);
    for (port, counter) in TRAFFIC {
        assert_eq!(
            counters.xdp.get(counter),
            PER_PORT,
            "{want:?} XDP, port {port}: {}",
            counters.xdp
        );
        // TC ingress runs after XDP passed the packet up, so it sees the same datagrams.
        assert_eq!(
            counters.tc.get(counter),
            PER_PORT,
            "{want:?} TC, port {port}: {}",
            counters.tc
        );
    }
}

#[test]
fn native_xdp_on_veth_counts_real_udp_by_port() {
    if pxe_lab::privileged("native_xdp_on_veth_counts_real_udp_by_port") {
        attach_and_count(XdpModeChoice::Native, AttachedXdp::Native);
    }
}

#[test]
fn generic_xdp_on_veth_counts_real_udp_by_port() {
    if pxe_lab::privileged("generic_xdp_on_veth_counts_real_udp_by_port") {
        attach_and_count(XdpModeChoice::Generic, AttachedXdp::Generic);
    }
}

#[test]
fn auto_mode_picks_native_on_veth() {
    if pxe_lab::privileged("auto_mode_picks_native_on_veth") {
        attach_and_count(XdpModeChoice::Auto, AttachedXdp::Native);
    }
}

#[test]
fn with_xdp_off_the_tc_program_alone_sees_the_traffic() {
    if !pxe_lab::privileged("with_xdp_off_the_tc_program_alone_sees_the_traffic") {
        return;
    }
    let (_lab, server, client) = lab();
    let fastpath = server
        .run(|| {
            let mut fastpath = FastPath::load().unwrap();
            assert_eq!(
                fastpath.attach_xdp("eth0", XdpModeChoice::Off).unwrap(),
                None
            );
            fastpath.attach_tc("eth0").unwrap();
            fastpath
        })
        .unwrap();
    send_traffic(&client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fastpath.counters().unwrap().tc.get(Counter::PASS_OTHER_UDP) < PER_PORT
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(20));
    }
    let counters = fastpath.counters().unwrap();
    assert_eq!(counters.xdp.packets(), 0, "no XDP program, no XDP counts");
    assert_eq!(counters.tc.get(Counter::PASS_DHCP_TO_SERVER), PER_PORT);
    // Without the registration, transfer-port traffic is just other UDP.
    assert_eq!(counters.tc.get(Counter::PASS_OTHER_UDP), 2 * PER_PORT);
}

#[test]
fn attaching_to_a_missing_interface_names_it() {
    if !pxe_lab::privileged("attaching_to_a_missing_interface_names_it") {
        return;
    }
    let (_lab, server, _client) = lab();
    let message = server
        .run(|| {
            let mut fastpath = FastPath::load().unwrap();
            fastpath
                .attach_xdp("nope0", XdpModeChoice::Auto)
                .unwrap_err()
                .to_string()
        })
        .unwrap();
    assert!(
        message.contains("no interface named \"nope0\""),
        "{message}"
    );
}
