//! The real BPF object, run with BPF_PROG_TEST_RUN: every frame is classified
//! into exactly one verdict counter, counted, and passed on byte for byte.
//! Needs root (loading BPF programs).

mod common;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use common::frames::{dhcp_payload, tftp_ack, tftp_rrq, FrameSpec, Noise};
use pxe_common::{counter::Counter, maps};
use pxe_user::fastpath::{CounterSnapshot, FastPath, TC_PROGRAM, XDP_PROGRAM};

const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1), i.e. TCX_NEXT: "not mine, next please".
const TC_NEXT: u32 = u32::MAX;
const TRANSFER_PORT: u16 = 40_001;
const QINQ: u16 = 0x88a8;
const DOT1Q: u16 = 0x8100;

struct Fixture {
    description: &'static str,
    frame: Vec<u8>,
    verdict: Counter,
    vlan_tagged: bool,
}

fn fixture(description: &'static str, frame: Vec<u8>, verdict: Counter) -> Fixture {
    Fixture {
        description,
        frame,
        verdict,
        vlan_tagged: false,
    }
}

fn tagged(description: &'static str, frame: Vec<u8>, verdict: Counter) -> Fixture {
    Fixture {
        description,
        frame,
        verdict,
        vlan_tagged: true,
    }
}

fn fixtures() -> Vec<Fixture> {
    let dhcp = || FrameSpec::udp(68, 67, &dhcp_payload());
    let with = |f: fn(&mut FrameSpec)| {
        let mut spec = dhcp();
        f(&mut spec);
        spec.build()
    };
    let full = dhcp().build();
    vec![
        fixture(
            "DHCP request to port 67 is classified as DHCP to the server",
            full.clone(),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        fixture(
            "DHCP reply to port 68 is classified as DHCP to a client",
            FrameSpec::udp(67, 68, &dhcp_payload()).build(),
            Counter::PASS_DHCP_TO_CLIENT,
        ),
        fixture(
            "PXE boot server discovery to port 4011 is classified as proxyDHCP",
            FrameSpec::udp(68, 4011, &dhcp_payload()).build(),
            Counter::PASS_PROXY_DHCP,
        ),
        fixture(
            "TFTP read request to port 69 is classified as a TFTP request",
            FrameSpec::udp(2070, 69, &tftp_rrq("ipxe.efi")).build(),
            Counter::PASS_TFTP_REQUEST,
        ),
        fixture(
            "TFTP ACK to a registered transfer port is classified as transfer traffic",
            FrameSpec::udp(2070, TRANSFER_PORT, &tftp_ack(1)).build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        fixture(
            "TFTP ACK to port 69 is transfer traffic (transfers on one port)",
            FrameSpec::udp(2070, 69, &tftp_ack(1)).build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        fixture(
            "TFTP ACK to an unregistered port is other UDP",
            FrameSpec::udp(2070, TRANSFER_PORT + 1, &tftp_ack(1)).build(),
            Counter::PASS_OTHER_UDP,
        ),
        fixture(
            "DNS query is other UDP",
            FrameSpec::udp(5353, 53, b"\x12\x34\x01\x00").build(),
            Counter::PASS_OTHER_UDP,
        ),
        tagged(
            "DHCP request behind one 802.1Q tag is DHCP and counted as tagged",
            dhcp().tagged(DOT1Q, 100).build(),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        tagged(
            "TFTP request behind one 802.1ad tag is a TFTP request",
            FrameSpec::udp(2070, 69, &tftp_rrq("pxelinux.0"))
                .tagged(QINQ, 7)
                .build(),
            Counter::PASS_TFTP_REQUEST,
        ),
        tagged(
            "Double-tagged (QinQ) DHCP is passed as stacked VLAN",
            dhcp().tagged(QINQ, 7).tagged(DOT1Q, 100).build(),
            Counter::PASS_STACKED_VLAN,
        ),
        fixture(
            "IPv4 with 40 bytes of options (IHL 15) still finds the DHCP port (left to userspace)",
            with(|s| s.ip_options = vec![1; 40]),
            Counter::PASS_DHCP_UNPARSED,
        ),
        fixture(
            "IPv4 with one option word (IHL 6) still finds the DHCP port (left to userspace)",
            with(|s| s.ip_options = vec![1; 4]),
            Counter::PASS_DHCP_UNPARSED,
        ),
        fixture(
            "IHL below 5 is a bad IPv4 header",
            with(|s| s.ihl_override = Some(4)),
            Counter::PASS_BAD_IPV4_HEADER,
        ),
        fixture(
            "IHL 0 is a bad IPv4 header",
            with(|s| s.ihl_override = Some(0)),
            Counter::PASS_BAD_IPV4_HEADER,
        ),
        fixture(
            "Header longer than the total length is a bad IPv4 header",
            with(|s| {
                s.ihl_override = Some(15);
                s.total_len_override = Some(40)
            }),
            Counter::PASS_BAD_IPV4_HEADER,
        ),
        fixture(
            "Version 6 inside an IPv4 EtherType is a bad IPv4 header",
            with(|s| s.version = 6),
            Counter::PASS_BAD_IPV4_HEADER,
        ),
        fixture(
            "IHL pointing past the end of the frame is truncated",
            {
                let mut f = with(|s| s.ihl_override = Some(15));
                f.truncate(14 + 20 + 4);
                f
            },
            Counter::PASS_TRUNCATED,
        ),
        fixture(
            "First fragment (more fragments set) is a fragment",
            with(|s| s.frag_off = 0x2000),
            Counter::PASS_FRAGMENT,
        ),
        fixture(
            "Later fragment (non-zero offset) is a fragment",
            with(|s| s.frag_off = 0x00b9),
            Counter::PASS_FRAGMENT,
        ),
        fixture(
            "TCP is not UDP",
            {
                let mut s = dhcp();
                s.proto = 6;
                s.payload = vec![0; 20];
                s.build()
            },
            Counter::PASS_NOT_UDP,
        ),
        fixture(
            "ICMP is not UDP",
            {
                let mut s = dhcp();
                s.proto = 1;
                s.payload = vec![8, 0, 0, 0, 0, 1, 0, 1];
                s.build()
            },
            Counter::PASS_NOT_UDP,
        ),
        fixture(
            "ARP is not IPv4",
            {
                let mut f = full[..14].to_vec();
                f[12..14].copy_from_slice(&[0x08, 0x06]);
                f.extend_from_slice(&[0; 28]);
                f
            },
            Counter::PASS_NOT_IPV4,
        ),
        fixture(
            "IPv6 is not IPv4",
            {
                let mut f = full.clone();
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
                f
            },
            Counter::PASS_NOT_IPV4,
        ),
        tagged(
            "IPv6 behind a VLAN tag is not IPv4",
            {
                let mut f = dhcp().tagged(DOT1Q, 5).build();
                f[16..18].copy_from_slice(&[0x86, 0xdd]);
                f
            },
            Counter::PASS_NOT_IPV4,
        ),
        fixture(
            "Ethernet header alone is a truncated IPv4 frame",
            full[..14].to_vec(),
            Counter::PASS_TRUNCATED,
        ),
        tagged(
            "A VLAN tag cut in half is truncated",
            dhcp().tagged(DOT1Q, 100).build()[..16].to_vec(),
            Counter::PASS_TRUNCATED,
        ),
        fixture(
            "IPv4 header cut short is truncated",
            full[..14 + 12].to_vec(),
            Counter::PASS_TRUNCATED,
        ),
        fixture(
            "UDP header cut short is truncated",
            full[..14 + 20 + 5].to_vec(),
            Counter::PASS_TRUNCATED,
        ),
        fixture(
            "Total length ending inside the UDP header is truncated",
            with(|s| s.total_len_override = Some(24)),
            Counter::PASS_TRUNCATED,
        ),
    ]
}

fn load() -> FastPath {
    let mut fastpath = FastPath::load().expect("loading the BPF object");
    fastpath
        .register_transfer_port(TRANSFER_PORT)
        .expect("registering the transfer port");
    fastpath
}

/// Runs `frame` through the XDP program and returns (action, frame out).
fn run_xdp(fastpath: &mut FastPath, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &mut Xdp = fastpath
        .ebpf_mut()
        .program_mut(XDP_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; frame.len() + 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on the XDP program with {frame:02x?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs `frame` through the TC program and returns (action, frame out).
fn run_tc(fastpath: &mut FastPath, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &mut SchedClassifier = fastpath
        .ebpf_mut()
        .program_mut(TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; frame.len() + 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on the TC program with {frame:02x?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Asserts that exactly the expected counters moved by one.
fn assert_counted(
    case: &str,
    before: &CounterSnapshot,
    after: &CounterSnapshot,
    verdict: Counter,
    vlan: bool,
) {
    let delta = after.since(before);
    for (counter, name) in Counter::ALL {
        let want = u64::from(*counter == verdict || (vlan && *counter == Counter::SEEN_VLAN_TAG));
        assert_eq!(delta.get(*counter), want, "{case}: counter {name}");
    }
}

#[test]
fn xdp_classifies_counts_and_passes_every_fixture_untouched() {
    if !pxe_lab::privileged("xdp_classifies_counts_and_passes_every_fixture_untouched") {
        return;
    }
    let mut fastpath = load();
    // The kernel refuses test runs shorter than an Ethernet header (and no NIC
    // delivers such a runt), so the shortest fixture is a bare header.
    for f in fixtures().into_iter().filter(|f| f.frame.len() >= 14) {
        let before = fastpath.counters().unwrap().xdp;
        let (action, out) = run_xdp(&mut fastpath, &f.frame);
        assert_eq!(action, XDP_PASS, "{}: action", f.description);
        assert_eq!(out, f.frame, "{}: frame must pass untouched", f.description);
        assert_counted(
            f.description,
            &before,
            &fastpath.counters().unwrap().xdp,
            f.verdict,
            f.vlan_tagged,
        );
    }
}

#[test]
fn tc_classifies_counts_and_passes_every_fixture_untouched() {
    if !pxe_lab::privileged("tc_classifies_counts_and_passes_every_fixture_untouched") {
        return;
    }
    let mut fastpath = load();
    // The kernel's skb test run refuses a bare Ethernet header, and an IPv4
    // EtherType without a whole fixed IPv4 header (the stack drops those before
    // TC ever sees them). Those fixtures are for XDP only.
    let skb_can_exist =
        |f: &[u8]| f.len() > 14 && !(f[12..14] == [0x08, 0x00] && f.len() < 14 + 20);
    for f in fixtures().into_iter().filter(|f| skb_can_exist(&f.frame)) {
        let before = fastpath.counters().unwrap().tc;
        let (action, out) = run_tc(&mut fastpath, &f.frame);
        assert_eq!(action, TC_NEXT, "{}: action", f.description);
        assert_eq!(out, f.frame, "{}: frame must pass untouched", f.description);
        assert_counted(
            f.description,
            &before,
            &fastpath.counters().unwrap().tc,
            f.verdict,
            f.vlan_tagged,
        );
    }
}

#[test]
fn unregistering_a_transfer_port_makes_its_traffic_other_udp() {
    if !pxe_lab::privileged("unregistering_a_transfer_port_makes_its_traffic_other_udp") {
        return;
    }
    let mut fastpath = load();
    let ack = FrameSpec::udp(2070, TRANSFER_PORT, &tftp_ack(9)).build();
    let before = fastpath.counters().unwrap().xdp;
    run_xdp(&mut fastpath, &ack);
    fastpath.unregister_transfer_port(TRANSFER_PORT).unwrap();
    fastpath
        .unregister_transfer_port(TRANSFER_PORT)
        .expect("unregistering twice is harmless");
    run_xdp(&mut fastpath, &ack);
    let delta = fastpath.counters().unwrap().xdp.since(&before);
    assert_eq!(delta.get(Counter::PASS_TFTP_TRANSFER), 1);
    assert_eq!(delta.get(Counter::PASS_OTHER_UDP), 1);
}

#[test]
fn garbage_frames_pass_untouched_with_exactly_one_verdict_each() {
    if !pxe_lab::privileged("garbage_frames_pass_untouched_with_exactly_one_verdict_each") {
        return;
    }
    let mut fastpath = load();
    let mut noise = Noise::new(0x5eed);
    let valid = FrameSpec::udp(68, 67, &dhcp_payload()).build();
    for i in 0..2_000 {
        let frame = match i % 3 {
            // Pure noise of any length.
            0 => {
                let len = 14 + (noise.next_u64() % 200) as usize;
                noise.bytes(len)
            }
            // A real IPv4 EtherType followed by noise, so the IPv4 checks are exercised.
            1 => {
                let len = 14 + (noise.next_u64() % 100) as usize;
                let mut f = noise.bytes(len);
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                f
            }
            // A valid DHCP frame with a few header bytes flipped.
            _ => {
                let mut f = valid.clone();
                for _ in 0..3 {
                    let at = (noise.next_u64() % 50) as usize;
                    f[at] ^= noise.next_u64() as u8 | 1;
                }
                f
            }
        };
        let before = fastpath.counters().unwrap().xdp;
        let (action, out) = run_xdp(&mut fastpath, &frame);
        assert_eq!(action, XDP_PASS, "garbage frame {i}: {frame:02x?}");
        assert_eq!(out, frame, "garbage frame {i} must pass untouched");
        let delta = fastpath.counters().unwrap().xdp.since(&before);
        assert_eq!(
            delta.packets(),
            1,
            "garbage frame {i}: exactly one verdict, got {delta}"
        );
    }
}

#[test]
fn object_defines_every_shared_map_and_both_programs() {
    if !pxe_lab::privileged("object_defines_every_shared_map_and_both_programs") {
        return;
    }
    let mut fastpath = FastPath::load().expect("loading the BPF object");
    let ebpf = fastpath.ebpf_mut();
    for name in maps::ALL {
        assert!(
            ebpf.map(name).is_some(),
            "map {name} is missing from the object"
        );
    }
    assert!(ebpf.program(XDP_PROGRAM).is_some());
    assert!(ebpf.program(TC_PROGRAM).is_some());
}

/// The meter the benchmarks read the programs' own cost with (issue 17's
/// honest accounting) counts every run of each program by its name. Other
/// tests of this binary may run copies of the programs meanwhile, so the
/// counts are floors.
#[test]
fn the_benchmarks_bpf_meter_counts_each_programs_runs() {
    if !pxe_lab::privileged("the_benchmarks_bpf_meter_counts_each_programs_runs") {
        return;
    }
    let mut fastpath = load();
    let frame = FrameSpec::udp(68, 67, &dhcp_payload()).build();
    let meter = pxe_lab::bpf_stats::BpfMeter::start();
    for _ in 0..25 {
        run_xdp(&mut fastpath, &frame);
    }
    for _ in 0..10 {
        run_tc(&mut fastpath, &frame);
    }
    let programs = meter.stop();
    let of = |name: &str| {
        programs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} not metered: {programs:?}"))
    };
    let (xdp, tc) = (of("pxe_ingress"), of("pxe_tc_ingress"));
    assert!(xdp.runs >= 25 && xdp.run_time_ns > 0, "{xdp:?}");
    assert!(tc.runs >= 10 && tc.run_time_ns > 0, "{tc:?}");
}
