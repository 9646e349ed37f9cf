//! `bench xdp-cost`: what the XDP program costs per packet, measured with
//! BPF_PROG_TEST_RUN on the real object (nothing is attached, nothing is
//! sent): building a DATA block in place (the TFTP fast path), answering a
//! DHCP REQUEST from its client's template (the DHCP fast path), dropping a
//! stale ACK, passing a packet that is not ours, and dropping a flood's
//! packets past admission control's budgets.

use std::time::Duration;

use anyhow::Context as _;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use pxe_common::maps::{SessionConfig, SessionKey};
use pxe_user::fastpath::{FastPath, XDP_PROGRAM};

use crate::report::Latencies;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Single runs timed for the build path (each needs its session reset).
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Repetitions for the drop and pass paths (timed by the kernel in one run).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
}

const CLIENT_PORT: u16 = 2070;
const SERVER_PORT: u16 = 40_001;

fn frame(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    frame_from(CLIENT_PORT, dst_port, payload)
}

fn frame_from(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
        198,
        18,
        0,
        2,
        198,
        18,
        0,
        1,
    ];
    let check = pxe_common::csum::checksum(&[&ip]);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let mut fp =
        FastPath::load_with_image_chunks(4).context("loading the BPF object (needs root)")?;
    fp.register_transfer_port(SERVER_PORT)?;
    let image: Vec<u8> = (0..1468 * 200).map(|i: usize| (i * 13) as u8).collect();
    fp.load_image(0, &image)?;
    let key = SessionKey {
        client_ip: [198, 18, 0, 2],
        client_port: CLIENT_PORT.to_be_bytes(),
        server_port: SERVER_PORT.to_be_bytes(),
    };
    let ack = frame(SERVER_PORT, &[0, 4, 0, 1]);
    println!("xdp-cost: BPF_PROG_TEST_RUN on the real object; ns per packet");
    // What a single run costs beyond the program: the pass path timed one
    // run at a time, less the same path's mean over many repetitions.
    let dns = frame(53, &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let (action, pass_mean) = run_once(&mut fp, &dns, args.repeat)?;
    anyhow::ensure!(action == 2, "expected XDP_PASS, got {action}");
    let pass_single = single_runs(&mut fp, &dns, args.samples, 2, |_| Ok(()))?;
    let fixed = pass_single.saturating_sub(pass_mean);
    println!(
        "  fixed cost of a single run:         {:>5} ns (pass path: p50 {} ns one run at a time, {} ns mean of {})",
        fixed.as_nanos(),
        pass_single.as_nanos(),
        pass_mean.as_nanos(),
        args.repeat
    );
    for blksize in [1468u32, 512] {
        let mut entry: SessionConfig = bytemuck::Zeroable::zeroed();
        (
            entry.blksize,
            entry.blocks,
            entry.handover_sent,
            entry.window,
        ) = (blksize, 100, 1, 1);
        // Each run advances the session: put it back before the next.
        let p50 = single_runs(&mut fp, &ack, args.samples, 3, |fp| {
            Ok(fp.insert_session(key, entry)?)
        })?;
        println!(
            "  build DATA in place, blksize {blksize:>4}: {:>5} ns net (p50 {} ns of single runs less the fixed cost)",
            p50.saturating_sub(fixed).as_nanos(),
            p50.as_nanos(),
        );
    }
    let mut entry: SessionConfig = bytemuck::Zeroable::zeroed();
    (
        entry.blksize,
        entry.blocks,
        entry.handover_sent,
        entry.window,
    ) = (1468, 100, 5, 1);
    fp.insert_session(key, entry)?;
    let (action, per) = run_once(&mut fp, &ack, args.repeat)?;
    anyhow::ensure!(action == 1, "expected XDP_DROP, got {action}");
    println!(
        "  drop a stale ACK:                   {:>5} ns (mean of {})",
        per.as_nanos(),
        args.repeat
    );
    let (request, reply_len) = dhcp_template(&mut fp)?;
    // Single runs: with `repeat`, each run would start from the previous
    // one's reply, not from the request.
    let p50 = single_runs(&mut fp, &request, args.samples, 3, |_| Ok(()))?;
    println!(
        "  DHCP ACK from a template ({reply_len} B): {:>5} ns net (p50 {} ns of single runs less the fixed cost)",
        p50.saturating_sub(fixed).as_nanos(),
        p50.as_nanos(),
    );
    println!(
        "  pass a packet that is not ours:     {:>5} ns (mean of {})",
        pass_mean.as_nanos(),
        args.repeat
    );
    admission_drops(&mut fp, args.repeat)?;
    Ok(true)
}

/// What a flood's packet costs once admission control refuses it: a
/// DISCOVER from an unknown MAC past its interface's budget, one past its
/// MAC's rate, and a TFTP read request past its source's budget.
fn admission_drops(fp: &mut FastPath, repeat: u32) -> anyhow::Result<()> {
    use pxe_common::admit::{AdmitConfig, BucketKey, Rate, TIER_XDP};
    let discover = pxe_lab::client::dhcp::encode(&pxe_lab::client::dhcp::request(
        &pxe_lab::client::dhcp::Identity::plain([0x02, 0xf1, 0, 0, 0, 1]),
        dhcproto::v4::MessageType::Discover,
        1,
        vec![],
    ));
    let discover = frame_from(68, 67, &discover);
    let rrq = frame(69, b"\0\x01ipxe.efi\0octet\0blksize\x001468\0");
    // BPF_PROG_TEST_RUN reports the loopback interface.
    fp.create_bucket(BucketKey {
        ifindex: 1,
        giaddr: [0; 4],
    })?;
    let cases = [
        (
            "drop an unknown DISCOVER past its budget",
            AdmitConfig {
                dhcp_unknown: Rate::new(1.0, 1),
                ..limits(TIER_XDP)
            },
            &discover,
        ),
        (
            "drop a DISCOVER past its MAC's rate",
            AdmitConfig {
                dhcp_mac_discover: Rate::new(1.0, 1),
                ..limits(TIER_XDP)
            },
            &discover,
        ),
        (
            "drop an RRQ past its source's budget",
            AdmitConfig {
                tftp_source: Rate::new(1.0, 1),
                ..limits(TIER_XDP)
            },
            &rrq,
        ),
    ];
    for (what, config, packet) in cases {
        fp.set_admission(config)?;
        // The first run takes the budget's one token; every later one is refused.
        run_once(fp, packet, 1)?;
        let (action, per) = run_once(fp, packet, repeat)?;
        anyhow::ensure!(action == 1, "{what}: expected XDP_DROP, got {action}");
        println!("  {what:<40} {:>5} ns (mean of {repeat})", per.as_nanos());
    }
    fp.set_admission(limits(0))?;
    Ok(())
}

fn limits(tier: u32) -> pxe_common::admit::AdmitConfig {
    pxe_common::admit::AdmitConfig {
        tier,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// The median of `samples` single runs of `frame`, each expected to end in
/// `action`, with `before` run ahead of each (untimed).
fn single_runs(
    fp: &mut FastPath,
    frame: &[u8],
    samples: usize,
    action: u32,
    mut before: impl FnMut(&mut FastPath) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut timed = Latencies::default();
    for _ in 0..samples {
        before(fp)?;
        let (got, duration) = run_once(fp, frame, 1)?;
        anyhow::ensure!(got == action, "expected action {action}, got {got}");
        timed.record(duration);
    }
    Ok(timed.quantile(0.5))
}

/// A UEFI client's REQUEST and, in the kernel, the template of the ACK the
/// daemon would send it (a reply of realistic size: lease options and boot
/// file). Returns the request frame and the reply's length.
/// Option 55 of an OVMF PXE request: 35 codes.
const OVMF_REQUEST_LIST: [u8; 35] = [
    1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59, 60, 66,
    67, 97, 128, 129, 130, 131, 132, 133, 134, 135,
];

fn dhcp_template(fp: &mut FastPath) -> anyhow::Result<(Vec<u8>, usize)> {
    use dhcproto::{
        v4::{Architecture, DhcpOption, Message, MessageType, Opcode},
        Encodable, Encoder,
    };
    use pxe_user::dhcp::{
        engine::KernelAnswer,
        templates::{template, Clocks, Interface},
    };
    use std::net::Ipv4Addr;

    let mac = [0x52, 0x54, 0, 0, 0, 1];
    let server = Ipv4Addr::new(198, 18, 0, 1);
    let ip = Ipv4Addr::new(198, 18, 0, 100);
    let encode = |m: &Message| -> anyhow::Result<Vec<u8>> {
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf))?;
        Ok(buf)
    };
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut request = Message::new(unspecified, unspecified, unspecified, unspecified, &mac);
    let opts = request.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Request));
    opts.insert(DhcpOption::ServerIdentifier(server));
    opts.insert(DhcpOption::RequestedIpAddress(ip));
    opts.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
    ));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(7)));
    // What OVMF's PXE asks for (EDK2's PxeBcDhcp4.c) and the size it takes:
    // shape options the kernel mixes into the request's signature too.
    opts.insert(DhcpOption::ParameterRequestList(
        OVMF_REQUEST_LIST.iter().map(|c| (*c).into()).collect(),
    ));
    opts.insert(DhcpOption::MaxMessageSize(1472));
    let request = encode(&request)?;
    let mut reply = Message::new_with_id(1, unspecified, ip, server, unspecified, &mac);
    reply.set_opcode(Opcode::BootReply);
    reply.set_fname_str("ipxe.efi");
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Ack));
    opts.insert(DhcpOption::ServerIdentifier(server));
    opts.insert(DhcpOption::AddressLeaseTime(3600));
    opts.insert(DhcpOption::Renewal(1800));
    opts.insert(DhcpOption::Rebinding(3150));
    opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
    opts.insert(DhcpOption::Router(vec![server]));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
    opts.insert(DhcpOption::BootfileName(b"ipxe.efi".to_vec()));
    let reply = encode(&reply)?;
    let clocks = Clocks::now();
    let answer = KernelAnswer::Lease {
        ip,
        stored_until: clocks.unix_secs + 7200,
        lease_time: 3600,
    };
    // BPF_PROG_TEST_RUN runs the program as if the frame came in on loopback.
    let interface = Interface {
        ifindex: 1,
        mac: [2, 0, 0, 0, 0, 1],
        address: server,
        xdp_tx: true,
    };
    let (key, entry) =
        template(&request, &reply, &answer, 67, &interface, clocks).context("a template")?;
    fp.insert_answer(key, entry)?;
    Ok((frame_from(68, 67, &request), reply.len()))
}

fn run_once(fp: &mut FastPath, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
    let program: &mut Xdp = fp
        .ebpf_mut()
        .program_mut(XDP_PROGRAM)
        .context("no XDP program")?
        .try_into()?;
    let mut out = vec![0u8; 4096];
    let r = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok((r.return_value, r.duration))
}
