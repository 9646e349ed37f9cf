//! DHCP answered by the real BPF object under BPF_PROG_TEST_RUN. The daemon's
//! engine answers a client first and its reply becomes the kernel's
//! template through the daemon's own code (`templates`, `KernelAnswers`);
//! then every kind of repeat request is run through XDP and TC and the
//! kernel's reply is compared byte for byte with what the engine answers to
//! the same request. Requests the kernel must not answer, malformed and
//! hostile ones included, must pass untouched. Needs root.

mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use common::{
    dhcp_client::message,
    frames::{internet_checksum, FrameSpec, Noise, CLIENT_IP, CLIENT_MAC},
};
use dhcproto::{
    v4::{relay, DhcpOption, MessageType, OptionCode},
    Decodable as _, Encodable, Encoder,
};
use pxe_common::{counter::Counter, dhcp::AnswerKey};
use pxe_user::{
    dhcp::{
        classify::classify,
        engine::{Arrival, Destination, Engine, EngineConfig, Mode},
        pool::{parse_range, Subnet},
        templates::{self, Clocks, Interface},
    },
    fastpath::{FastPath, KernelAnswers, TC_PROGRAM, XDP_PROGRAM},
    lease::MemLeaseStore,
    observe::Observer,
    policy::{
        r#static::{Profile, StaticPolicy},
        Mac, SharedPolicy,
    },
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_REDIRECT: u32 = 7;
const TC_NEXT: u32 = u32::MAX;
/// What BPF_PROG_TEST_RUN reports a packet arrived on: the loopback device.
const LOOPBACK_IFINDEX: u32 = 1;
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x21];

fn subnet(net: &str, range: &str) -> Subnet {
    Subnet {
        network: net.parse().unwrap(),
        ranges: vec![parse_range(range).unwrap()],
        exclude: vec![],
        router: None,
        dns: vec![SERVER],
        domain: Some("lab".into()),
        lease_time: 3600,
        options: Default::default(),
    }
}

/// The daemon's DHCP side for one interface, with the kernel answering
/// repeat requests: the engine, the object, and the seam between them.
struct Lab {
    engine: Engine,
    fastpath: Arc<Mutex<FastPath>>,
    answers: KernelAnswers,
    interface: Interface,
}

impl Lab {
    fn new(mode: Mode, xdp_tx: bool) -> Self {
        let config = EngineConfig {
            mode,
            subnets: vec![
                subnet("198.18.0.0/24", "198.18.0.100-198.18.0.109"),
                subnet("198.18.7.0/24", "198.18.7.10-198.18.7.19"),
            ],
            reservations: HashMap::new(),
            authoritative: false,
            http_port: 80,
            kernel_answers: true,
            shared_pools: false,
        };
        let policy = SharedPolicy::new(StaticPolicy {
            profiles: [("default".to_owned(), Profile::named("default"))].into(),
            machines: HashMap::new(),
            default_profile: Some("default".into()),
            provision: None,
            classes: Vec::new(),
        });
        let engine =
            Engine::new(config, policy.clone(), Box::new(MemLeaseStore::default())).unwrap();
        let fastpath = Arc::new(Mutex::new(
            FastPath::load_with_image_chunks(1).expect("loading the BPF object"),
        ));
        let answers = KernelAnswers::new(Arc::clone(&fastpath), Arc::new(Observer::off()));
        let interface = Interface {
            ifindex: LOOPBACK_IFINDEX,
            mac: SERVER_MAC,
            address: SERVER,
            xdp_tx,
        };
        Self {
            engine,
            fastpath,
            answers,
            interface,
        }
    }

    /// The engine answers `datagram` as the daemon does, handing a
    /// repeatable reply to the kernel. Returns the reply's bytes and where it went.
    fn daemon(
        &mut self,
        datagram: &[u8],
        port: u16,
        source: SocketAddrV4,
    ) -> Option<(Vec<u8>, Destination)> {
        let request = classify(datagram).unwrap();
        let now = Clocks::now();
        let outcome = self.engine.handle(
            &request,
            Arrival {
                port,
                source,
                server_ip: SERVER,
            },
            now.unix_secs,
        );
        if outcome.forget {
            self.answers.forget(request.mac.0);
        }
        let reply = outcome.reply?;
        let mut bytes = Vec::new();
        reply.message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        if let Some(kernel) = outcome.kernel {
            let (key, entry) =
                templates::template(datagram, &bytes, &kernel, port, &self.interface, now)
                    .expect("a template");
            self.answers.install(key, entry, self.answers.epoch());
        }
        Some((bytes, reply.to))
    }

    fn run(&self, xdp: bool, frame: &[u8]) -> (u32, Vec<u8>, Counter) {
        let mut fp = self.fastpath.lock().unwrap();
        let before = fp.counters().unwrap();
        let mut out = vec![0u8; 4096];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let r = if xdp {
            let program: &mut Xdp = fp
                .ebpf_mut()
                .program_mut(XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            program.test_run(options).unwrap()
        } else {
            let program: &mut SchedClassifier = fp
                .ebpf_mut()
                .program_mut(TC_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            program.test_run(options).unwrap()
        };
        out.truncate(r.data_size_out as usize);
        let after = fp.counters().unwrap();
        let (now, then) = if xdp {
            (&after.xdp, &before.xdp)
        } else {
            (&after.tc, &before.tc)
        };
        let delta = now.since(then);
        let verdicts: Vec<Counter> = Counter::ALL
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| c.is_verdict() && delta.get(*c) > 0)
            .collect();
        assert_eq!(
            verdicts.len(),
            1,
            "exactly one verdict per packet, got {verdicts:?}"
        );
        (r.return_value, out, verdicts[0])
    }

    fn answered(&self) -> u64 {
        let fp = self.fastpath.lock().unwrap();
        let c = fp.counters().unwrap();
        c.xdp.get(Counter::TX_DHCP_REPLY) + c.tc.get(Counter::REDIRECT_DHCP_REPLY)
    }
}

fn frame(datagram: &[u8], src_port: u16, dst_port: u16) -> Vec<u8> {
    FrameSpec::udp(src_port, dst_port, datagram).build()
}

fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

/// A UEFI PXE request (vendor class, architecture 7, machine identifier).
fn uefi(kind: MessageType, xid: u32, broadcast: bool, extra: Vec<DhcpOption>) -> Vec<u8> {
    let mut d = message(kind, MAC, xid, true, extra);
    if !broadcast {
        d[10] = 0;
    }
    d
}

fn with_ciaddr(mut d: Vec<u8>, ip: Ipv4Addr) -> Vec<u8> {
    d[12..16].copy_from_slice(&ip.octets());
    d
}

fn selecting(xid: u32, ip: Ipv4Addr) -> Vec<u8> {
    uefi(
        MessageType::Request,
        xid,
        true,
        vec![
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(ip),
        ],
    )
}

/// DISCOVER, REQUEST through the daemon: the client holds a lease and the
/// kernel a template for its shape.
fn leased(lab: &mut Lab) -> Ipv4Addr {
    let (offer, _) = lab
        .daemon(&uefi(MessageType::Discover, 1, true, vec![]), 67, client())
        .expect("an OFFER");
    let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&offer[16..20]).unwrap());
    lab.daemon(&selecting(2, ip), 67, client()).expect("an ACK");
    ip
}

/// Checks a reply frame the kernel built: addressing, lengths, checksums,
/// and the BOOTP message byte for byte against the daemon's.
fn assert_reply(
    out: &[u8],
    want: &[u8],
    to: Destination,
    src_port: u16,
    request_src_mac: [u8; 6],
    what: &str,
) {
    let (dst_mac, dst_ip, dst_port) = match to {
        Destination::Broadcast => ([0xff; 6], Ipv4Addr::BROADCAST, 68),
        Destination::Unicast(a) => (request_src_mac, *a.ip(), a.port()),
    };
    assert_eq!(out.len(), 14 + 28 + want.len(), "{what}: frame length");
    assert_eq!(&out[0..6], &dst_mac, "{what}: destination MAC");
    assert_eq!(&out[6..12], &SERVER_MAC, "{what}: source MAC");
    let ip = &out[14..34];
    assert_eq!(internet_checksum(ip), 0, "{what}: IPv4 header checksum");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        28 + want.len(),
        "{what}: IPv4 total length"
    );
    assert_eq!(&ip[12..16], &SERVER.octets(), "{what}: source address");
    assert_eq!(&ip[16..20], &dst_ip.octets(), "{what}: destination address");
    let udp = &out[34..42];
    assert_eq!(
        u16::from_be_bytes([udp[0], udp[1]]),
        src_port,
        "{what}: source port"
    );
    assert_eq!(
        u16::from_be_bytes([udp[2], udp[3]]),
        dst_port,
        "{what}: destination port"
    );
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp[4..6]);
    pseudo.extend_from_slice(&out[34..]);
    assert_eq!(internet_checksum(&pseudo), 0, "{what}: UDP checksum");
    assert!(
        out[42..] == *want,
        "{what}: the BOOTP message differs from the daemon's\nkernel: {:02x?}\ndaemon: {:02x?}",
        &out[42..],
        want
    );
}

/// Runs `request` through the kernel (XDP in place, then TC), then through
/// the daemon, and checks the kernel answered exactly as the daemon does.
fn assert_kernel_answers_as_daemon(
    lab: &mut Lab,
    request: &[u8],
    port: u16,
    source: SocketAddrV4,
    what: &str,
) {
    let src_port = if port == 4011 { 4011 } else { 67 };
    let f = frame(request, source.port(), port);
    let (xdp_action, xdp_out, xdp_verdict) = lab.run(true, &f);
    let (tc_action, tc_out, tc_verdict) = lab.run(false, &f);
    let (want, to) = lab
        .daemon(request, port, source)
        .expect("the daemon answers");
    assert_eq!(
        (xdp_action, xdp_verdict),
        (XDP_TX, Counter::TX_DHCP_REPLY),
        "{what}: XDP"
    );
    assert_eq!(
        (tc_action, tc_verdict),
        (TC_ACT_REDIRECT, Counter::REDIRECT_DHCP_REPLY),
        "{what}: TC"
    );
    assert_reply(
        &xdp_out,
        &want,
        to,
        src_port,
        CLIENT_MAC,
        &format!("{what} (XDP)"),
    );
    assert_reply(
        &tc_out,
        &want,
        to,
        src_port,
        CLIENT_MAC,
        &format!("{what} (TC)"),
    );
}

/// The kernel passes `f` on untouched with `verdict`, in both tiers.
fn assert_passed(lab: &Lab, f: &[u8], verdict: Counter, what: &str) {
    for xdp in [true, false] {
        let (action, out, got) = lab.run(xdp, f);
        let tier = if xdp { "XDP" } else { "TC" };
        assert_eq!(
            action,
            if xdp { XDP_PASS } else { TC_NEXT },
            "{what} ({tier}): action"
        );
        assert_eq!(got, verdict, "{what} ({tier}): verdict");
        assert!(out == f, "{what} ({tier}): the frame was changed");
    }
}

#[test]
fn repeat_requests_of_a_leased_client_get_the_daemons_reply_byte_for_byte() {
    let mut lab = Lab::new(Mode::Full, true);
    let first = uefi(MessageType::Discover, 1, true, vec![]);
    assert_passed(
        &lab,
        &frame(&first, 68, 67),
        Counter::PASS_DHCP_TO_SERVER,
        "a DISCOVER before any answer",
    );
    let ip = leased(&mut lab);

    assert_kernel_answers_as_daemon(
        &mut lab,
        &uefi(MessageType::Discover, 0x1111, true, vec![]),
        67,
        client(),
        "DISCOVER, broadcast flag",
    );
    assert_kernel_answers_as_daemon(
        &mut lab,
        &uefi(MessageType::Discover, 0x2222, false, vec![]),
        67,
        client(),
        "DISCOVER, no broadcast flag",
    );
    assert_kernel_answers_as_daemon(
        &mut lab,
        &selecting(0x3333, ip),
        67,
        client(),
        "REQUEST (SELECTING)",
    );
    let init_reboot = uefi(
        MessageType::Request,
        0x4444,
        false,
        vec![DhcpOption::RequestedIpAddress(ip)],
    );
    assert_kernel_answers_as_daemon(
        &mut lab,
        &init_reboot,
        67,
        client(),
        "REQUEST (INIT-REBOOT)",
    );
    let renewing = with_ciaddr(uefi(MessageType::Request, 0x5555, false, vec![]), ip);
    assert_kernel_answers_as_daemon(
        &mut lab,
        &renewing,
        67,
        SocketAddrV4::new(ip, 68),
        "REQUEST (RENEWING, unicast to ciaddr)",
    );
    let rebinding = with_ciaddr(uefi(MessageType::Request, 0x6666, true, vec![]), ip);
    assert_kernel_answers_as_daemon(
        &mut lab,
        &rebinding,
        67,
        SocketAddrV4::new(ip, 68),
        "REQUEST (REBINDING, broadcast flag)",
    );
    assert!(lab.answered() >= 12);
}

#[test]
fn requests_whose_answer_is_not_decided_pass_to_userspace_untouched() {
    let mut lab = Lab::new(Mode::Full, true);
    let ip = leased(&mut lab);
    let other = Ipv4Addr::new(198, 18, 0, 109);
    let cases = [
        (
            "REQUEST for another address",
            selecting(7, other),
            Counter::PASS_DHCP_NOT_DECIDED,
        ),
        (
            "REQUEST naming another server",
            uefi(
                MessageType::Request,
                7,
                true,
                vec![
                    DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 2)),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            ),
            Counter::PASS_DHCP_NOT_DECIDED,
        ),
        (
            "renewal of another address",
            with_ciaddr(uefi(MessageType::Request, 7, false, vec![]), other),
            Counter::PASS_DHCP_NOT_DECIDED,
        ),
        (
            "the same client relayed",
            {
                let mut d = uefi(MessageType::Discover, 7, true, vec![]);
                d[24..28].copy_from_slice(&RELAY.octets());
                d
            },
            Counter::PASS_DHCP_NOT_DECIDED,
        ),
        (
            "another shape: iPXE's user class",
            uefi(
                MessageType::Discover,
                7,
                true,
                vec![DhcpOption::UserClass(b"iPXE".to_vec())],
            ),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        (
            "RELEASE",
            with_ciaddr(
                uefi(
                    MessageType::Release,
                    7,
                    false,
                    vec![DhcpOption::ServerIdentifier(SERVER)],
                ),
                ip,
            ),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        (
            "DECLINE",
            uefi(
                MessageType::Decline,
                7,
                false,
                vec![DhcpOption::RequestedIpAddress(ip)],
            ),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        (
            "INFORM",
            with_ciaddr(uefi(MessageType::Inform, 7, false, vec![]), ip),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        (
            "another client of the same shape",
            {
                let mut d = uefi(MessageType::Discover, 7, true, vec![]);
                d[33] ^= 1;
                d
            },
            Counter::PASS_DHCP_TO_SERVER,
        ),
    ];
    for (what, datagram, verdict) in cases {
        assert_passed(&lab, &frame(&datagram, 68, 67), verdict, what);
    }

    // Past the durable horizon the kernel stops ACKing (and OFFERing past the stored lease).
    let key = {
        let (_, _) = lab.daemon(&selecting(8, ip), 67, client()).unwrap();
        let request = selecting(9, ip);
        let sig = templates::signature(&request).unwrap();
        AnswerKey {
            signature: sig,
            ifindex: LOOPBACK_IFINDEX,
            mac: MAC,
            port_kind: 0,
            _pad: [0; 5],
        }
    };
    let mut fp = lab.fastpath.lock().unwrap();
    let mut entry = fp.answer(&key).unwrap().expect("the client's template");
    entry.ack_until_ns = 1;
    entry.offer_until_ns = 1;
    fp.insert_answer(key, entry).unwrap();
    drop(fp);
    assert_passed(
        &lab,
        &frame(&selecting(10, ip), 68, 67),
        Counter::PASS_DHCP_NOT_DECIDED,
        "REQUEST past the horizon",
    );
    assert_passed(
        &lab,
        &frame(&uefi(MessageType::Discover, 11, true, vec![]), 68, 67),
        Counter::PASS_DHCP_NOT_DECIDED,
        "DISCOVER past the stored lease",
    );
}

#[test]
fn a_release_or_nak_takes_the_clients_templates_back() {
    let mut lab = Lab::new(Mode::Full, true);
    let ip = leased(&mut lab);
    let release = with_ciaddr(
        uefi(
            MessageType::Release,
            7,
            false,
            vec![DhcpOption::ServerIdentifier(SERVER)],
        ),
        ip,
    );
    assert!(lab
        .daemon(&release, 67, SocketAddrV4::new(ip, 68))
        .is_none());
    assert!(lab.answers.is_empty(), "RELEASE forgets the client");
    assert_passed(
        &lab,
        &frame(&selecting(8, ip), 68, 67),
        Counter::PASS_DHCP_TO_SERVER,
        "REQUEST after RELEASE",
    );
}

#[test]
fn an_answer_decided_before_a_policy_change_is_not_learnt_after_it() {
    let mut lab = Lab::new(Mode::Full, true);
    let ip = leased(&mut lab);
    assert!(!lab.answers.is_empty());
    // A repeat REQUEST is decided under the policy as it is...
    let request = selecting(9, ip);
    let decided_in = lab.answers.epoch();
    let now = Clocks::now();
    let arrival = Arrival {
        port: 67,
        source: client(),
        server_ip: SERVER,
    };
    let outcome = lab
        .engine
        .handle(&classify(&request).unwrap(), arrival, now.unix_secs);
    let mut bytes = Vec::new();
    outcome
        .reply
        .expect("an ACK")
        .message
        .encode(&mut Encoder::new(&mut bytes))
        .unwrap();
    let answer = outcome.kernel.expect("a repeatable answer");
    let (key, entry) =
        templates::template(&request, &bytes, &answer, 67, &lab.interface, now).unwrap();
    // ...the operator changes this machine before the answer reaches the
    // kernel (what the API and SIGHUP do)...
    lab.answers.invalidate(&[MAC]);
    assert!(lab.answers.is_empty(), "its templates are taken back");
    // ...and the late template is refused: the kernel never repeats the old
    // policy's answer.
    lab.answers.install(key, entry, decided_in);
    assert!(
        lab.answers.is_empty(),
        "a template decided before the change"
    );
    assert_passed(
        &lab,
        &frame(&selecting(10, ip), 68, 67),
        Counter::PASS_DHCP_TO_SERVER,
        "REQUEST after the change",
    );
    // One decided after the change is learnt as ever.
    lab.answers.install(key, entry, lab.answers.epoch());
    assert_eq!(lab.answers.len(), 1);
}

#[test]
fn a_lease_that_moves_takes_back_the_template_that_named_the_old_address() {
    let mut lab = Lab::new(Mode::Full, true);
    let old = leased(&mut lab);
    // The machine is given a reserved address. (pxed also clears every
    // template on SIGHUP; here the engine alone is reconfigured, so what is
    // checked is that the move itself takes the old template back.)
    let moved = Ipv4Addr::new(198, 18, 0, 105);
    let mut config = lab.engine.config().clone();
    config.reservations.insert(Mac(MAC), moved);
    lab.engine.reconfigure(config);
    // iPXE, another request shape of the same client, is moved there.
    let ipxe = |kind, xid, mut extra: Vec<DhcpOption>| {
        extra.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        uefi(kind, xid, true, extra)
    };
    let (offer, _) = lab
        .daemon(&ipxe(MessageType::Discover, 20, vec![]), 67, client())
        .unwrap();
    assert_eq!(offer[16..20], moved.octets());
    let request = |xid| {
        ipxe(
            MessageType::Request,
            xid,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(moved),
            ],
        )
    };
    lab.daemon(&request(21), 67, client()).expect("an ACK");
    // The firmware shape's template named the address the engine just
    // released: it is gone, so the kernel cannot hand that address out.
    assert_passed(
        &lab,
        &frame(&selecting(22, old), 68, 67),
        Counter::PASS_DHCP_TO_SERVER,
        "the old shape asking for the old address",
    );
    assert_kernel_answers_as_daemon(
        &mut lab,
        &request(23),
        67,
        client(),
        "iPXE asking for its new address",
    );
}

#[test]
fn proxy_replies_on_67_and_4011_come_from_the_kernel_as_the_daemon_sends_them() {
    let mut lab = Lab::new(Mode::Proxy, true);
    let discover = uefi(MessageType::Discover, 1, true, vec![]);
    lab.daemon(&discover, 67, client()).expect("a proxy OFFER");
    assert_kernel_answers_as_daemon(
        &mut lab,
        &uefi(MessageType::Discover, 2, false, vec![]),
        67,
        client(),
        "proxy DISCOVER",
    );
    let request_67 = selecting(3, Ipv4Addr::new(198, 18, 0, 50));
    assert_passed(
        &lab,
        &frame(&request_67, 68, 67),
        Counter::PASS_DHCP_NOT_DECIDED,
        "a REQUEST on 67 (the network server's)",
    );

    let client_ip = Ipv4Addr::from(CLIENT_IP);
    let on_4011 = |xid| with_ciaddr(uefi(MessageType::Request, xid, false, vec![]), client_ip);
    let source = SocketAddrV4::new(client_ip, 68);
    assert_passed(
        &lab,
        &frame(&on_4011(4), 68, 4011),
        Counter::PASS_PROXY_DHCP,
        "the first REQUEST on 4011",
    );
    lab.daemon(&on_4011(4), 4011, source)
        .expect("an ACK on 4011");
    assert_kernel_answers_as_daemon(&mut lab, &on_4011(5), 4011, source, "REQUEST on 4011");
}

#[test]
fn a_relayed_client_is_answered_through_its_relay() {
    answered_through_the_relay(vec![]);
}

/// Option 82 is in the kernel's signature: the relay's ids (a class may
/// match them) and the echo the reply carries are the template's, so the
/// same port is answered in the kernel and another port goes to the daemon.
#[test]
fn a_relayed_client_with_option_82_is_answered_in_the_kernel_with_it_echoed() {
    let agent = |port: &[u8]| {
        let mut info = relay::RelayAgentInformation::default();
        info.insert(relay::RelayInfo::AgentCircuitId(port.to_vec()));
        info.insert(relay::RelayInfo::AgentRemoteId(vec![0x00, 0x1a, 0x2b]));
        DhcpOption::RelayAgentInformation(info)
    };
    let lab = answered_through_the_relay(vec![agent(b"Gi1/0/7")]);
    let mut elsewhere = uefi(MessageType::Discover, 5, false, vec![agent(b"Gi1/0/8")]);
    elsewhere[24..28].copy_from_slice(&RELAY.octets());
    let (action, _, verdict) = lab.run(true, &frame(&elsewhere, 67, 67));
    assert_eq!(
        action, XDP_PASS,
        "another port: another signature ({verdict:?})"
    );
}

/// DISCOVER and REQUEST through the relay with `agent` options; the kernel
/// then answers the next of each as the daemon did. Returns the lab.
fn answered_through_the_relay(agent: Vec<DhcpOption>) -> Lab {
    let mut lab = Lab::new(Mode::Full, true);
    let relayed = |kind, xid, mut extra: Vec<DhcpOption>| {
        extra.extend(agent.iter().cloned());
        let mut d = uefi(kind, xid, false, extra);
        d[24..28].copy_from_slice(&RELAY.octets());
        d
    };
    let relay = SocketAddrV4::new(RELAY, 67);
    let (offer, _) = lab
        .daemon(&relayed(MessageType::Discover, 1, vec![]), 67, relay)
        .unwrap();
    let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&offer[16..20]).unwrap());
    assert_eq!(ip.octets()[2], 7, "an address of the relay's subnet");
    let request = |xid| {
        relayed(
            MessageType::Request,
            xid,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(ip),
            ],
        )
    };
    let (ack, _) = lab.daemon(&request(2), 67, relay).unwrap();
    if !agent.is_empty() {
        let reply = dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&ack)).unwrap();
        assert_eq!(
            reply.opts().get(OptionCode::RelayAgentInformation),
            agent.first(),
            "the daemon echoes option 82"
        );
    }
    assert_kernel_answers_as_daemon(
        &mut lab,
        &request(3),
        67,
        relay,
        "relayed REQUEST (to giaddr:67)",
    );
    assert_kernel_answers_as_daemon(
        &mut lab,
        &relayed(MessageType::Discover, 4, vec![]),
        67,
        relay,
        "relayed DISCOVER",
    );
    lab
}

#[test]
fn xdp_leaves_the_reply_to_tc_where_it_may_not_transmit() {
    let mut lab = Lab::new(Mode::Full, false);
    let ip = leased(&mut lab);
    let f = frame(&selecting(5, ip), 68, 67);
    let (action, out, verdict) = lab.run(true, &f);
    assert_eq!((action, verdict), (XDP_PASS, Counter::PASS_DHCP_TO_TC));
    assert!(out == f, "untouched");
    let (action, _, verdict) = lab.run(false, &f);
    assert_eq!(
        (action, verdict),
        (TC_ACT_REDIRECT, Counter::REDIRECT_DHCP_REPLY)
    );
}

#[test]
fn malformed_truncated_and_hostile_requests_pass_untouched() {
    let mut lab = Lab::new(Mode::Full, true);
    let ip = leased(&mut lab);
    let good = selecting(5, ip);
    // Sanity: the unmodified request is one the kernel answers.
    let (action, _, _) = lab.run(true, &frame(&good, 68, 67));
    assert_eq!(action, XDP_TX);

    let options_end = good.iter().rposition(|&b| b == 255).unwrap();
    let with_option = |option: &[u8]| {
        let mut d = good[..options_end].to_vec();
        d.extend_from_slice(option);
        d.push(255);
        d
    };
    let mut cases: Vec<(String, Vec<u8>, Counter)> = vec![
        (
            "option overload (52)".into(),
            frame(&with_option(&[52, 1, 3]), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a second vendor class".into(),
            frame(&with_option(&[60, 4, b'P', b'X', b'E', b'C']), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a 65-byte client identifier".into(),
            frame(&with_option(&[&[61u8, 65][..], &[1; 65]].concat()), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "an option longer than the datagram".into(),
            frame(&[&good[..options_end], &[12, 200, 1, 2]].concat(), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a message type of length 0".into(),
            frame(&with_option(&[53, 0]), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a requested address of length 3".into(),
            frame(&with_option(&[50, 3, 1, 2, 3]), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a zero-length user class (another shape)".into(),
            frame(&with_option(&[77, 0]), 68, 67),
            Counter::PASS_DHCP_TO_SERVER,
        ),
        (
            "41 pad-and-option items".into(),
            frame(&with_option(&[[12u8, 0]; 41].concat()), 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "no magic cookie".into(),
            frame(
                &{
                    let mut d = good.clone();
                    d[236] = 0;
                    d
                },
                68,
                67,
            ),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "a BOOTREPLY".into(),
            frame(
                &{
                    let mut d = good.clone();
                    d[0] = 2;
                    d
                },
                68,
                67,
            ),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "hlen 16".into(),
            frame(
                &{
                    let mut d = good.clone();
                    d[2] = 16;
                    d
                },
                68,
                67,
            ),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "BOOTP without options".into(),
            frame(&good[..240], 68, 67),
            Counter::PASS_DHCP_UNPARSED,
        ),
        (
            "IPv4 options".into(),
            {
                let mut s = FrameSpec::udp(68, 67, &good);
                s.ip_options = vec![1; 4];
                s.build()
            },
            Counter::PASS_DHCP_UNPARSED,
        ),
    ];
    // UDP length larger than the datagram, and a frame cut short (IPv4 says more).
    let mut lying = frame(&good, 68, 67);
    lying[38..40].copy_from_slice(&((8 + good.len() + 40) as u16).to_be_bytes());
    cases.push((
        "UDP length beyond the datagram".into(),
        lying,
        Counter::PASS_DHCP_UNPARSED,
    ));
    let whole = frame(&good, 68, 67);
    for cut in [42 + 20, 42 + 239, 42 + 243, whole.len() - 1] {
        cases.push((
            format!("cut to {cut} bytes"),
            whole[..cut].to_vec(),
            Counter::PASS_DHCP_UNPARSED,
        ));
    }
    for (what, f, verdict) in &cases {
        assert_passed(&lab, f, *verdict, what);
    }

    // Random bytes over the options of a client the kernel answers: never a
    // reply (no shape can match), never a change.
    let mut rng = Noise::new(6);
    for round in 0..300 {
        let mut d = good.clone();
        let len = 1 + (rng.next_u64() % 60) as usize;
        let at = 240 + (rng.next_u64() % (d.len() as u64 - 240)) as usize;
        let noise = rng.bytes(len);
        for (i, b) in noise.into_iter().enumerate() {
            if let Some(slot) = d.get_mut(at + i) {
                *slot = b;
            }
        }
        let f = frame(&d, 68, 67);
        for xdp in [true, false] {
            let (action, out, verdict) = lab.run(xdp, &f);
            if matches!(
                verdict,
                Counter::TX_DHCP_REPLY | Counter::REDIRECT_DHCP_REPLY
            ) {
                // Only possible if the noise left the shape and addresses intact:
                // then the reply must be the daemon's.
                let (want, to) = lab
                    .daemon(&d, 67, client())
                    .expect("the daemon answers what the kernel did");
                assert_reply(
                    &out,
                    &want,
                    to,
                    67,
                    CLIENT_MAC,
                    &format!("noise round {round}"),
                );
            } else {
                assert!(
                    out == f,
                    "noise round {round}: changed with verdict {verdict:?} (action {action})"
                );
            }
        }
    }
}
