//! Admission control in the real BPF object under BPF_PROG_TEST_RUN: the
//! budgets of unknown machines per interface and relay, the per-MAC
//! DISCOVER limit and the TFTP read-request budgets admit, refuse and
//! refill as configured, known machines are always admitted, and only the
//! program the daemon names enforces them. Needs root.

mod common;

use std::{thread::sleep, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use common::{
    dhcp_client::message,
    frames::{tftp_rrq, FrameSpec},
};
use dhcproto::v4::MessageType;
use pxe_common::{
    admit::{AdmitConfig, BucketKey, Rate, NEW_RELAYS, TIER_TC, TIER_XDP},
    counter::Counter,
};
use pxe_user::fastpath::{FastPath, TC_PROGRAM, XDP_PROGRAM};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_NEXT: u32 = u32::MAX;
/// What BPF_PROG_TEST_RUN reports a packet arrived on: the loopback device.
const LOOPBACK_IFINDEX: u32 = 1;
const RELAY: [u8; 4] = [198, 18, 7, 1];

/// The loaded object, with the limits `config` sets and the loopback
/// interface's two budgets.
struct Lab {
    fastpath: FastPath,
}

/// What one packet became: the program's action, its verdict and whether
/// it was counted as an unknown machine admitted.
#[derive(Debug, PartialEq)]
struct Ran {
    action: u32,
    verdict: Counter,
    unknown_admitted: bool,
}

impl Lab {
    fn new(config: AdmitConfig) -> Self {
        let mut fastpath = FastPath::load_with_image_chunks(1).expect("loading the BPF object");
        fastpath.set_admission(config).unwrap();
        for giaddr in [[0; 4], NEW_RELAYS] {
            fastpath
                .create_bucket(BucketKey {
                    ifindex: LOOPBACK_IFINDEX,
                    giaddr,
                })
                .unwrap();
        }
        Self { fastpath }
    }

    fn run(&mut self, xdp: bool, frame: &[u8]) -> Ran {
        let before = self.fastpath.counters().unwrap();
        let mut out = vec![0u8; 2048];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let ebpf = self.fastpath.ebpf_mut();
        let r = if xdp {
            let program: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).unwrap().try_into().unwrap();
            program.test_run(options).unwrap()
        } else {
            let program: &mut SchedClassifier =
                ebpf.program_mut(TC_PROGRAM).unwrap().try_into().unwrap();
            program.test_run(options).unwrap()
        };
        let after = self.fastpath.counters().unwrap();
        let delta = if xdp {
            after.xdp.since(&before.xdp)
        } else {
            after.tc.since(&before.tc)
        };
        let verdicts: Vec<Counter> = Counter::ALL
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| c.is_verdict() && delta.get(*c) > 0)
            .collect();
        assert_eq!(verdicts.len(), 1, "one verdict per packet: {verdicts:?}");
        Ran {
            action: r.return_value,
            verdict: verdicts[0],
            unknown_admitted: delta.get(Counter::SEEN_DHCP_UNKNOWN_ADMITTED) > 0,
        }
    }

    fn xdp(&mut self, frame: &[u8]) -> Ran {
        self.run(true, frame)
    }
}

fn limits() -> AdmitConfig {
    AdmitConfig {
        tier: TIER_XDP,
        ..bytemuck::Zeroable::zeroed()
    }
}

fn mac(n: u32) -> [u8; 6] {
    let b = n.to_be_bytes();
    [0x02, 0xad, b[0], b[1], b[2], b[3]]
}

fn dhcp(kind: MessageType, mac: [u8; 6], giaddr: [u8; 4]) -> Vec<u8> {
    let mut d = message(kind, mac, 0x5eed, true, vec![]);
    d[24..28].copy_from_slice(&giaddr);
    let (src, dst) = if giaddr == [0; 4] { (68, 67) } else { (67, 67) };
    FrameSpec::udp(src, dst, &d).build()
}

fn discover(mac: [u8; 6]) -> Vec<u8> {
    dhcp(MessageType::Discover, mac, [0; 4])
}

fn passed_unknown() -> Ran {
    Ran {
        action: XDP_PASS,
        verdict: Counter::PASS_DHCP_TO_SERVER,
        unknown_admitted: true,
    }
}

/// Passed without taking from a budget: a known machine, or limits off.
fn passed_known() -> Ran {
    Ran {
        action: XDP_PASS,
        verdict: Counter::PASS_DHCP_TO_SERVER,
        unknown_admitted: false,
    }
}

fn dropped(verdict: Counter) -> Ran {
    Ran {
        action: XDP_DROP,
        verdict,
        unknown_admitted: false,
    }
}

#[test]
fn unknown_machines_get_their_interfaces_burst_then_are_dropped() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(1.0, 3),
        ..limits()
    });
    for n in 0..3 {
        assert_eq!(lab.xdp(&discover(mac(n))), passed_unknown(), "machine {n}");
    }
    for n in 3..10 {
        assert_eq!(
            lab.xdp(&discover(mac(n))),
            dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE),
            "machine {n}: past the burst"
        );
    }
    // Every kind of request from an unknown machine counts, not only DISCOVERs.
    let request = dhcp(MessageType::Request, mac(11), [0; 4]);
    assert_eq!(
        lab.xdp(&request),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE)
    );
}

#[test]
fn known_machines_are_admitted_with_the_budget_spent() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(1.0, 1),
        ..limits()
    });
    assert_eq!(lab.xdp(&discover(mac(1))), passed_unknown());
    assert_eq!(
        lab.xdp(&discover(mac(2))),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE)
    );
    lab.fastpath.insert_known(mac(2)).unwrap();
    for kind in [MessageType::Discover, MessageType::Request] {
        let ran = lab.xdp(&dhcp(kind, mac(2), [0; 4]));
        assert_eq!(ran, passed_known(), "{kind:?} from a known machine");
    }
    lab.fastpath.remove_known(mac(2)).unwrap();
    assert_eq!(
        lab.xdp(&discover(mac(2))),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE),
        "forgotten: unknown again"
    );
}

#[test]
fn a_spent_budget_refills_at_its_rate() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(20.0, 1),
        ..limits()
    });
    assert_eq!(lab.xdp(&discover(mac(1))), passed_unknown());
    assert_eq!(
        lab.xdp(&discover(mac(2))),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE)
    );
    // One interval at 20 a second is 50 ms.
    sleep(Duration::from_millis(60));
    assert_eq!(lab.xdp(&discover(mac(3))), passed_unknown(), "refilled");
    assert_eq!(
        lab.xdp(&discover(mac(4))),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE),
        "one token, taken"
    );
}

#[test]
fn one_mac_sending_discovers_too_fast_is_limited_alone() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(1.0, 100),
        dhcp_mac_discover: Rate::new(2.0, 2),
        ..limits()
    });
    let noisy = mac(7);
    lab.fastpath.insert_known(noisy).unwrap();
    let known = passed_known();
    assert_eq!(lab.xdp(&discover(noisy)), known);
    assert_eq!(lab.xdp(&discover(noisy)), known);
    for _ in 0..5 {
        assert_eq!(
            lab.xdp(&discover(noisy)),
            dropped(Counter::DROP_DHCP_MAC_OVER_RATE),
            "known or not, a MAC past its DISCOVER rate"
        );
    }
    assert_eq!(
        lab.xdp(&dhcp(MessageType::Request, noisy, [0; 4])),
        known,
        "its REQUESTs are not DISCOVERs"
    );
    // The loop spent nothing of the interface's budget for others.
    for n in 100..198 {
        assert_eq!(lab.xdp(&discover(mac(n))), passed_unknown(), "machine {n}");
    }
}

#[test]
fn relays_pxed_answered_have_budgets_of_their_own() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(1.0, 1),
        ..limits()
    });
    let relayed = |n| dhcp(MessageType::Discover, mac(n), RELAY);
    // A relay without a budget of its own shares the interface's for relays
    // not yet answered, whatever giaddr it claims.
    assert_eq!(lab.xdp(&relayed(1)), passed_unknown());
    assert_eq!(
        lab.xdp(&dhcp(MessageType::Discover, mac(2), [10, 9, 8, 7])),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE),
        "another made-up relay"
    );
    lab.fastpath
        .create_bucket(BucketKey {
            ifindex: LOOPBACK_IFINDEX,
            giaddr: RELAY,
        })
        .unwrap();
    assert_eq!(lab.xdp(&relayed(3)), passed_unknown(), "its own budget");
    assert_eq!(
        lab.xdp(&relayed(4)),
        dropped(Counter::DROP_DHCP_UNKNOWN_OVER_RATE)
    );
    assert_eq!(
        lab.xdp(&discover(mac(5))),
        passed_unknown(),
        "clients without a relay have theirs"
    );
}

#[test]
fn only_the_program_the_daemon_names_enforces_the_limits() {
    let mut lab = Lab::new(AdmitConfig {
        dhcp_unknown: Rate::new(1.0, 1),
        tier: TIER_TC,
        ..limits()
    });
    // XDP passes everything to TC, which decides: one budget, taken once.
    let xdp_passed = passed_known();
    assert_eq!(lab.xdp(&discover(mac(1))), xdp_passed);
    assert_eq!(
        lab.run(false, &discover(mac(1))),
        Ran {
            action: TC_NEXT,
            verdict: Counter::PASS_DHCP_TO_SERVER,
            unknown_admitted: true,
        }
    );
    assert_eq!(lab.xdp(&discover(mac(2))), xdp_passed);
    assert_eq!(
        lab.run(false, &discover(mac(2))),
        Ran {
            action: TC_ACT_SHOT,
            verdict: Counter::DROP_DHCP_UNKNOWN_OVER_RATE,
            unknown_admitted: false,
        }
    );
}

#[test]
fn with_admission_off_every_request_passes() {
    let mut lab = Lab::new(bytemuck::Zeroable::zeroed());
    for n in 0..200 {
        let ran = lab.xdp(&discover(mac(n)));
        assert_eq!(ran, passed_known());
    }
    let mut rrq = FrameSpec::udp(40000, 69, &tftp_rrq("ipxe.efi")).build();
    for _ in 0..200 {
        assert_eq!(lab.xdp(&rrq).verdict, Counter::PASS_TFTP_REQUEST);
        rrq[33] ^= 1; // another source port, same address
    }
}

/// An RRQ from client address `source`.
fn rrq_from(source: [u8; 4]) -> Vec<u8> {
    let mut frame = FrameSpec::udp(40000, 69, &tftp_rrq("ipxe.efi")).build();
    // The programs read the source address and nothing checks the IPv4 sum.
    frame[26..30].copy_from_slice(&source);
    frame
}

#[test]
fn tftp_read_requests_get_a_budget_per_source_and_one_in_all() {
    let mut lab = Lab::new(AdmitConfig {
        tftp_source: Rate::new(1.0, 2),
        tftp_global: Rate::new(1.0, 5),
        ..limits()
    });
    let passed = Ran {
        action: XDP_PASS,
        verdict: Counter::PASS_TFTP_REQUEST,
        unknown_admitted: false,
    };
    let a = [198, 18, 0, 100];
    assert_eq!(lab.xdp(&rrq_from(a)), passed);
    assert_eq!(lab.xdp(&rrq_from(a)), passed);
    assert_eq!(
        lab.xdp(&rrq_from(a)),
        dropped(Counter::DROP_TFTP_SOURCE_OVER_RATE),
        "a third from one address"
    );
    for host in 101..104 {
        assert_eq!(lab.xdp(&rrq_from([198, 18, 0, host])), passed, "{host}");
    }
    assert_eq!(
        lab.xdp(&rrq_from([198, 18, 0, 104])),
        dropped(Counter::DROP_TFTP_OVER_RATE),
        "the sixth in all"
    );
    // Refusals spend nothing: the per-source refusals above left the
    // global budget as it was, and a refused source's budget refills.
    sleep(Duration::from_millis(1100));
    assert_eq!(lab.xdp(&rrq_from(a)), passed, "a second later");
}

#[test]
fn transfers_already_running_are_never_limited() {
    let mut lab = Lab::new(AdmitConfig {
        tftp_source: Rate::new(1.0, 1),
        tftp_global: Rate::new(1.0, 1),
        ..limits()
    });
    let port = 50_123;
    lab.fastpath.register_transfer_port(port).unwrap();
    assert_eq!(
        lab.xdp(&rrq_from([198, 18, 0, 100])).verdict,
        Counter::PASS_TFTP_REQUEST
    );
    assert_eq!(
        lab.xdp(&rrq_from([198, 18, 0, 100])).verdict,
        Counter::DROP_TFTP_SOURCE_OVER_RATE
    );
    let ack = FrameSpec::udp(40000, port, &common::frames::tftp_ack(1)).build();
    for _ in 0..20 {
        assert_eq!(lab.xdp(&ack).verdict, Counter::PASS_TFTP_TRANSFER);
    }
}
