//! The TFTP fast path of the real BPF object under BPF_PROG_TEST_RUN: every
//! branch (in-sequence ACK, duplicate, unknown session, last blocks,
//! rollover, IP options, VLAN tag, malformed, windows) returns the right
//! action, and a built DATA frame is byte-exact with valid IPv4 and UDP
//! checksums, from XDP in place and from TC; a window's clones are captured
//! off the wire. Needs root.

mod common;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use common::frames::{
    internet_checksum, tftp_ack, FrameSpec, CLIENT_IP, CLIENT_MAC, SERVER_IP, SERVER_MAC,
};
use pxe_common::{
    counter::Counter,
    maps::{SessionConfig, SessionKey},
};
use pxe_user::fastpath::{FastPath, TC_PROGRAM, XDP_PROGRAM};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TC_NEXT: u32 = u32::MAX;
const CLIENT_PORT: u16 = 2070;
const SERVER_PORT: u16 = 40_001;

fn image(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

fn key() -> SessionKey {
    SessionKey {
        client_ip: CLIENT_IP,
        client_port: CLIENT_PORT.to_be_bytes(),
        server_port: SERVER_PORT.to_be_bytes(),
    }
}

/// A fast path with one image loaded and one session at `last_sent`.
fn setup(image_bytes: &[u8], blksize: u32, last_sent: u32) -> FastPath {
    let mut fp = FastPath::load_with_image_chunks(40).expect("loading the BPF object");
    fp.register_transfer_port(SERVER_PORT).unwrap();
    fp.load_image(7, image_bytes).unwrap();
    let blocks = (image_bytes.len() as u32) / blksize + 1;
    fp.insert_session(
        key(),
        SessionConfig {
            image: 7,
            blksize,
            blocks,
            handover_sent: last_sent,
            handover_acked: last_sent.saturating_sub(1),
            window: 1,
            ..SessionConfig::default_zeroed()
        },
    )
    .unwrap();
    fp
}

trait Zeroed {
    fn default_zeroed() -> Self;
}
impl Zeroed for SessionConfig {
    fn default_zeroed() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

fn ack(block: u16) -> Vec<u8> {
    FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &tftp_ack(block)).build()
}

fn run_xdp(fp: &mut FastPath, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &mut Xdp = fp
        .ebpf_mut()
        .program_mut(XDP_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; 4096];
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn run_tc(fp: &mut FastPath, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &mut SchedClassifier = fp
        .ebpf_mut()
        .program_mut(TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; 4096];
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A fast path whose session has window `window`: blocks up to `last_sent`
/// are out, the client acknowledged `last_acked`.
fn setup_window(image_bytes: &[u8], window: u32, last_acked: u32, last_sent: u32) -> FastPath {
    let mut fp = setup(image_bytes, 1468, last_sent);
    let mut s = fp.session_config(&key()).unwrap().unwrap();
    (s.window, s.handover_acked) = (window, last_acked);
    fp.insert_session(key(), s).unwrap();
    fp
}

/// Frames sent out of `lo` in the calling thread's namespace while `f` runs
/// (a packet socket sees outgoing frames too).
fn frames_sent_on_lo<T>(f: impl FnOnce() -> T) -> (T, Vec<Vec<u8>>) {
    // SAFETY: plain socket calls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
        let bound = libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(bound, 0, "bind to lo: {}", std::io::Error::last_os_error());
        let result = f();
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            );
            if n < 0 {
                break;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        libc::close(fd);
        (result, frames)
    }
}

/// Checks a DATA frame byte for byte: addresses swapped, lengths, block,
/// payload, and both checksums valid.
fn assert_data_frame(frame: &[u8], block: u16, payload: &[u8], what: &str) {
    assert_eq!(
        frame.len(),
        14 + 20 + 8 + 4 + payload.len(),
        "{what}: frame length"
    );
    assert_eq!(&frame[0..6], &CLIENT_MAC, "{what}: destination MAC");
    assert_eq!(&frame[6..12], &SERVER_MAC, "{what}: source MAC");
    assert_eq!(&frame[12..14], &[0x08, 0x00]);
    let ip = &frame[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        20 + 8 + 4 + payload.len(),
        "{what}: IP total length"
    );
    assert_eq!(ip[9], 17);
    assert_eq!(&ip[12..16], &SERVER_IP, "{what}: source IP");
    assert_eq!(&ip[16..20], &CLIENT_IP, "{what}: destination IP");
    assert_eq!(internet_checksum(ip), 0, "{what}: IP header checksum");
    let udp = &frame[34..];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), SERVER_PORT);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), CLIENT_PORT);
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        udp.len(),
        "{what}: UDP length"
    );
    assert_ne!(&udp[6..8], &[0, 0], "{what}: a UDP checksum is sent");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&SERVER_IP);
    pseudo.extend_from_slice(&CLIENT_IP);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(udp);
    assert_eq!(internet_checksum(&pseudo), 0, "{what}: UDP checksum");
    assert_eq!(
        &udp[8..12],
        &[0, 3, (block >> 8) as u8, block as u8],
        "{what}: DATA header"
    );
    assert!(&udp[12..] == payload, "{what}: payload");
}

fn counter_delta(
    fp: &FastPath,
    before: &pxe_user::fastpath::Counters,
    counter: Counter,
) -> (u64, u64) {
    let now = fp.counters().unwrap();
    (
        now.xdp.since(&before.xdp).get(counter),
        now.tc.since(&before.tc).get(counter),
    )
}

#[test]
fn an_in_sequence_ack_gets_the_next_block_from_xdp_byte_exact() {
    if !pxe_lab::privileged("an_in_sequence_ack_gets_the_next_block_from_xdp_byte_exact") {
        return;
    }
    let file = image(1468 * 10 + 100);
    for blksize in [1468u32, 1432, 512, 8] {
        let mut fp = setup(&file, blksize, 1);
        let before = fp.counters().unwrap();
        let (action, out) = run_xdp(&mut fp, &ack(1));
        assert_eq!(action, XDP_TX, "blksize {blksize}");
        let b = blksize as usize;
        assert_data_frame(&out, 2, &file[b..2 * b], &format!("XDP, blksize {blksize}"));
        let s = fp.session(&key()).unwrap().unwrap();
        assert_eq!((s.last_sent, s.xdp_sent), (2, 1), "the session advanced");
        assert_eq!(counter_delta(&fp, &before, Counter::TX_TFTP_DATA), (1, 0));
    }
}

#[test]
fn the_tc_tier_builds_the_same_frame_and_redirects_it() {
    if !pxe_lab::privileged("the_tc_tier_builds_the_same_frame_and_redirects_it") {
        return;
    }
    let file = image(1468 * 10 + 100);
    let mut fp = setup(&file, 1468, 3);
    let before = fp.counters().unwrap();
    let (action, out) = run_tc(&mut fp, &ack(3));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_data_frame(&out, 4, &file[3 * 1468..4 * 1468], "TC");
    let s = fp.session(&key()).unwrap().unwrap();
    assert_eq!((s.last_sent, s.tc_sent), (4, 1));
    assert_eq!(
        counter_delta(&fp, &before, Counter::REDIRECT_TFTP_DATA),
        (0, 1)
    );
}

#[test]
fn duplicate_and_stale_acks_are_dropped_without_a_resend() {
    if !pxe_lab::privileged("duplicate_and_stale_acks_are_dropped_without_a_resend") {
        return;
    }
    let file = image(1468 * 10);
    let mut fp = setup(&file, 1468, 5);
    let before = fp.counters().unwrap();
    for block in [4u16, 3, 0, 6, 9999] {
        let (action, _) = run_xdp(&mut fp, &ack(block));
        assert_eq!(action, XDP_DROP, "ACK {block} when block 5 is out");
        let (action, _) = run_tc(&mut fp, &ack(block));
        assert_eq!(action, TC_ACT_SHOT, "TC, ACK {block}");
    }
    let s = fp.session(&key()).unwrap().unwrap();
    assert_eq!(
        (s.last_sent, s.dup_acks, s.xdp_sent),
        (5, 10, 0),
        "nothing sent, nothing advanced"
    );
    assert_eq!(
        counter_delta(&fp, &before, Counter::DROP_TFTP_STALE_ACK),
        (5, 5)
    );
}

/// A lockstep session handed over at block 1 whose ACK the kernel answered.
fn after_the_kernel_sent_block_2(file: &[u8]) -> FastPath {
    let mut fp = setup(file, 1468, 1);
    let (action, _) = run_xdp(&mut fp, &ack(1));
    assert_eq!(action, XDP_TX, "the kernel sent block 2");
    fp
}

#[test]
fn a_hand_over_from_a_stale_read_never_moves_the_kernels_progress_back() {
    if !pxe_lab::privileged("a_hand_over_from_a_stale_read_never_moves_the_kernels_progress_back") {
        return;
    }
    let file = image(1468 * 10);
    let mut fp = after_the_kernel_sent_block_2(&file);
    // Userspace hands over again from what it saw before the kernel moved on.
    let stale = fp.session_config(&key()).unwrap().unwrap();
    fp.hand_over(key(), stale).unwrap();
    let s = fp.session(&key()).unwrap().unwrap();
    assert_eq!(
        (s.last_sent, s.xdp_sent),
        (2, 1),
        "the kernel's progress stands"
    );
    let (action, out) = run_xdp(&mut fp, &ack(2));
    assert_eq!(action, XDP_TX, "ACK 2 is in sequence, not a duplicate");
    assert_data_frame(&out, 3, &file[2 * 1468..3 * 1468], "block 3");
}

#[test]
fn the_kernel_times_its_sends_and_measures_the_round_trip_of_whole_windows() {
    if !pxe_lab::privileged(
        "the_kernel_times_its_sends_and_measures_the_round_trip_of_whole_windows",
    ) {
        return;
    }
    let file = image(1468 * 20);
    let mut fp = after_the_kernel_sent_block_2(&file);
    let first = fp.session(&key()).unwrap().unwrap();
    assert_ne!(first.sent_ns, 0, "the send is timestamped");
    assert_eq!(
        first.srtt_ns, 0,
        "block 1 was userspace's: no sample from its ACK"
    );

    // The client's ACK of block 2 arrives 3 ms after the kernel sent it.
    std::thread::sleep(std::time::Duration::from_millis(3));
    assert_eq!(run_xdp(&mut fp, &ack(2)).0, XDP_TX);
    let timed = fp.session(&key()).unwrap().unwrap();
    assert!(timed.sent_ns > first.sent_ns, "the new send is timestamped");
    assert!(
        (3_000_000..1_000_000_000).contains(&timed.srtt_ns),
        "a 3 ms round trip, measured {} ns",
        timed.srtt_ns
    );
    assert_eq!(
        timed.rttvar_ns,
        timed.srtt_ns / 2,
        "RFC 6298's first sample"
    );

    // Userspace resends block 3 and says so with a new hand-over: the ACK
    // that follows is not a sample (Karn), the one after it is again.
    let config = fp.session_config(&key()).unwrap().unwrap();
    fp.hand_over(key(), config).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(run_xdp(&mut fp, &ack(3)).0, XDP_TX);
    let after_resend = fp.session(&key()).unwrap().unwrap();
    assert_eq!(
        (after_resend.srtt_ns, after_resend.last_sent),
        (timed.srtt_ns, 4),
        "no sample from the ACK of a resent block"
    );
    assert_eq!(run_xdp(&mut fp, &ack(4)).0, XDP_TX);
    let again = fp.session(&key()).unwrap().unwrap();
    assert!(
        again.srtt_ns < timed.srtt_ns,
        "a fast sample pulls the average down"
    );
}

#[test]
fn a_hand_over_ahead_of_the_kernel_is_adopted_and_keeps_its_counters() {
    if !pxe_lab::privileged("a_hand_over_ahead_of_the_kernel_is_adopted_and_keeps_its_counters") {
        return;
    }
    let file = image(1468 * 10);
    let mut fp = after_the_kernel_sent_block_2(&file);
    // Userspace's timer resent and the client moved on: blocks up to 6 are out.
    let mut config = fp.session_config(&key()).unwrap().unwrap();
    (config.handover_acked, config.handover_sent) = (5, 6);
    fp.hand_over(key(), config).unwrap();
    let (action, out) = run_xdp(&mut fp, &ack(6));
    assert_eq!(action, XDP_TX);
    assert_data_frame(&out, 7, &file[6 * 1468..7 * 1468], "block 7");
    let s = fp.session(&key()).unwrap().unwrap();
    assert_eq!(
        (s.last_acked, s.last_sent, s.xdp_sent),
        (6, 7, 2),
        "adopted, with the blocks sent before it still counted"
    );
}

#[test]
fn the_last_blocks_and_everything_unusual_go_to_userspace_untouched() {
    if !pxe_lab::privileged("the_last_blocks_and_everything_unusual_go_to_userspace_untouched") {
        return;
    }
    let file = image(1468 * 4 + 10); // blocks 1-4 full, block 5 short
    let mut with_options = FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &tftp_ack(1));
    with_options.ip_options = vec![1; 4];
    let mut error = FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &[0, 5, 0, 0, b'x', 0]);
    error.frag_off = 0x4000;
    let cases: Vec<(&str, u32, Vec<u8>, Counter)> = vec![
        (
            "ACK of block 4: the short final block 5 is userspace's",
            4,
            ack(4),
            Counter::PASS_TFTP_LAST_BLOCKS,
        ),
        (
            "ACK of the final block ends the transfer in userspace",
            5,
            ack(5),
            Counter::PASS_TFTP_LAST_BLOCKS,
        ),
        (
            "IP options",
            1,
            with_options.build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        (
            "VLAN-tagged ACK",
            1,
            FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &tftp_ack(1))
                .tagged(0x8100, 5)
                .build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        (
            "an ERROR from the client",
            1,
            error.build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        (
            "an ACK from another client port",
            1,
            FrameSpec::udp(CLIENT_PORT + 1, SERVER_PORT, &tftp_ack(1)).build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        (
            "a short ACK",
            1,
            FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &[0, 4, 0]).build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
        (
            "an ACK with trailing bytes",
            1,
            FrameSpec::udp(CLIENT_PORT, SERVER_PORT, &[0, 4, 0, 1, 0, 0]).build(),
            Counter::PASS_TFTP_TRANSFER,
        ),
    ];
    for (what, last_sent, frame, want) in cases {
        let mut fp = setup(&file, 1468, last_sent);
        let before = fp.counters().unwrap();
        let (action, out) = run_xdp(&mut fp, &frame);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: untouched");
        let now = fp.counters().unwrap().xdp.since(&before.xdp);
        assert_eq!(now.get(want), 1, "{what}: counted as {}", want.name());
        if frame.len() > 34 {
            let (action, out) = run_tc(&mut fp, &frame);
            assert_eq!(action, TC_NEXT, "{what}: TC");
            assert_eq!(out, frame, "{what}: TC untouched");
        }
        assert_eq!(
            fp.session(&key()).unwrap().unwrap().last_sent,
            last_sent,
            "{what}: session unchanged"
        );
    }
}

#[test]
fn block_numbers_roll_over_in_the_kernel_too() {
    if !pxe_lab::privileged("block_numbers_roll_over_in_the_kernel_too") {
        return;
    }
    // blksize 8: block 65,540 is only 512 KiB into the file.
    let file = image(8 * 70_000);
    let mut fp = setup(&file, 8, 65_540);
    let (action, out) = run_xdp(&mut fp, &ack(65_540u32 as u16)); // 65540 mod 65536 = 4
    assert_eq!(action, XDP_TX);
    let offset = 65_540 * 8;
    assert_data_frame(&out, 5, &file[offset..offset + 8], "rolled over");
    assert_eq!(fp.session(&key()).unwrap().unwrap().last_sent, 65_541);
}

#[test]
fn images_larger_than_a_chunk_are_served_across_chunk_boundaries() {
    if !pxe_lab::privileged("images_larger_than_a_chunk_are_served_across_chunk_boundaries") {
        return;
    }
    let file = image(3 * 1024 * 1024 + 12345);
    let blocks = file.len() / 1468;
    let mut fp = setup(&file, 1468, 1);
    // Walk a stretch around each chunk boundary.
    for boundary in [714usize, 1428, 2142] {
        for last_sent in boundary - 2..boundary + 2 {
            if last_sent + 1 >= blocks {
                continue;
            }
            fp.insert_session(
                key(),
                SessionConfig {
                    image: 7,
                    blksize: 1468,
                    blocks: blocks as u32 + 1,
                    handover_sent: last_sent as u32,
                    window: 1,
                    ..SessionConfig::default_zeroed()
                },
            )
            .unwrap();
            let (action, out) = run_xdp(&mut fp, &ack(last_sent as u16));
            assert_eq!(action, XDP_TX, "block {}", last_sent + 1);
            assert_data_frame(
                &out,
                (last_sent + 1) as u16,
                &file[last_sent * 1468..(last_sent + 1) * 1468],
                &format!("block {}", last_sent + 1),
            );
        }
    }
}

#[test]
fn a_windowed_ack_is_answered_with_the_whole_next_window_by_tc() {
    if !pxe_lab::privileged("a_windowed_ack_is_answered_with_the_whole_next_window_by_tc") {
        return;
    }
    // Clones leave through the test device (the namespace's loopback): run
    // in a lab namespace so they never touch the machine's own.
    let lab = pxe_lab::Lab::new().unwrap();
    let ns = lab.add_netns("prog").unwrap();
    ns.run(|| {
        let file = image(1468 * 30 + 100);
        let mut fp = setup_window(&file, 4, 4, 8);
        let before = fp.counters().unwrap();
        let (action, _) = run_xdp(&mut fp, &ack(8));
        assert_eq!(
            action, XDP_PASS,
            "XDP sends one frame per ACK: a window is TC's"
        );
        assert_eq!(
            counter_delta(&fp, &before, Counter::PASS_TFTP_WINDOWED),
            (1, 0)
        );

        let ((action, last), clones) = frames_sent_on_lo(|| run_tc(&mut fp, &ack(8)));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_data_frame(
            &last,
            12,
            &file[11 * 1468..12 * 1468],
            "the window's last block, redirected",
        );
        assert_eq!(clones.len(), 3, "blocks 9, 10 and 11 as clones");
        for (i, clone) in clones.iter().enumerate() {
            let block = 9 + i;
            assert_data_frame(
                clone,
                block as u16,
                &file[(block - 1) * 1468..block * 1468],
                &format!("clone of block {block}"),
            );
        }
        let s = fp.session(&key()).unwrap().unwrap();
        assert_eq!((s.last_acked, s.last_sent, s.tc_sent), (8, 12, 4));

        // The client saw a gap after 10 (RFC 7440): the next window starts at 11.
        let ((action, last), clones) = frames_sent_on_lo(|| run_tc(&mut fp, &ack(10)));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_data_frame(&last, 14, &file[13 * 1468..14 * 1468], "window 11..=14");
        assert_eq!(clones.len(), 3);
        let s = fp.session(&key()).unwrap().unwrap();
        assert_eq!((s.last_acked, s.last_sent, s.tc_sent), (10, 14, 8));

        // ACKs older than the window in flight are duplicates: dropped.
        for old in [10u16, 9, 8, 0] {
            let (action, _) = run_tc(&mut fp, &ack(old));
            assert_eq!(action, TC_ACT_SHOT, "ACK {old} with 11..=14 in flight");
        }
        let s = fp.session(&key()).unwrap().unwrap();
        assert_eq!((s.last_sent, s.dup_acks), (14, 4), "nothing resent");
    })
    .unwrap();
}

#[test]
fn a_window_that_would_reach_the_final_block_is_left_to_userspace() {
    if !pxe_lab::privileged("a_window_that_would_reach_the_final_block_is_left_to_userspace") {
        return;
    }
    // 12 full blocks and a short 13th: after ACK 8 the window 9..=12 is the
    // kernel's; after ACK 9, 10..=13 would include the final block.
    let file = image(1468 * 12 + 100);
    let mut fp = setup_window(&file, 4, 5, 9);
    let frame = ack(9);
    let (action, out) = run_tc(&mut fp, &frame);
    assert_eq!(action, TC_NEXT);
    assert_eq!(out, frame, "untouched");
    let s = fp.session(&key()).unwrap().unwrap();
    assert_eq!(
        (s.last_acked, s.last_sent, s.tc_sent),
        (5, 9, 0),
        "the session is userspace's to finish"
    );
}
