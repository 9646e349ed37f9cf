//! `bench xdp-cost`: what the XDP program costs per packet, measured with
//! BPF_PROG_TEST_RUN on the real object (nothing is attached, nothing is
//! sent): building a DATA block in place (the TFTP fast path), dropping a
//! stale ACK, and passing a packet that is not ours.

use std::time::Duration;

use anyhow::Context as _;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use pxe_common::maps::{SessionEntry, SessionKey};
use pxe_user::fastpath::{FastPath, XDP_PROGRAM};

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
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&CLIENT_PORT.to_be_bytes());
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
    for blksize in [1468u32, 512] {
        let mut samples = Vec::with_capacity(args.samples);
        for _ in 0..args.samples {
            let mut entry: SessionEntry = bytemuck::Zeroable::zeroed();
            (entry.blksize, entry.blocks, entry.last_sent, entry.window) = (blksize, 100, 1, 1);
            fp.insert_session(key, entry)?;
            let (action, duration) = run_once(&mut fp, &ack, 1)?;
            anyhow::ensure!(action == 3, "expected XDP_TX, got {action}");
            samples.push(duration);
        }
        samples.sort();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_nanos();
        println!("  build DATA in place, blksize {blksize:>4}: p50 {:>5} ns, p90 {:>5} ns ({} single runs)", at(0.5), at(0.9), samples.len());
    }
    let mut entry: SessionEntry = bytemuck::Zeroable::zeroed();
    (entry.blksize, entry.blocks, entry.last_sent) = (1468, 100, 5);
    fp.insert_session(key, entry)?;
    let (action, per) = run_once(&mut fp, &ack, args.repeat)?;
    anyhow::ensure!(action == 1, "expected XDP_DROP, got {action}");
    println!(
        "  drop a stale ACK:                   {:>5} ns (mean of {})",
        per.as_nanos(),
        args.repeat
    );
    let dns = frame(53, &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let (action, per) = run_once(&mut fp, &dns, args.repeat)?;
    anyhow::ensure!(action == 2, "expected XDP_PASS, got {action}");
    println!(
        "  pass a packet that is not ours:     {:>5} ns (mean of {})",
        per.as_nanos(),
        args.repeat
    );
    Ok(true)
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
