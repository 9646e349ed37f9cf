//! A read request and then any sequence of ACKs, ERRORs, timer ticks and
//! kernel-tier progress reports, through option negotiation and the
//! transfer's state machine: never a panic; a DATA is only ever for a block
//! of the file; acknowledged ≤ sent ≤ blocks; a completed transfer has every
//! block acknowledged.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pxe_user::{
    tftp::{
        negotiate::{negotiate, Limits},
        transfer::{KernelProgress, Outcome, Outgoing, TimerConfig, Transfer},
    },
    wire::tftp::Repr,
};

fuzz_target!(|data: &[u8]| {
    let Some((&len, rest)) = data.split_first() else { return };
    let (request, rest) = rest.split_at((len as usize).min(rest.len()));
    let Ok(Repr::ReadRequest { options, .. }) = Repr::parse(request) else { return };
    let Some((size, events)) = rest.split_first_chunk::<3>() else { return };
    let file_len = u64::from(u32::from_le_bytes([size[0], size[1], size[2], 0]));
    let Ok(agreed) = negotiate(&options, file_len, &Limits::default()) else { return };

    let mut now = Instant::now();
    let mut transfer = Transfer::new(&agreed, file_len, TimerConfig::default(), now);
    let check = |t: &Transfer| {
        assert!(t.acked_blocks() <= t.last_sent(), "acked {} of {} sent", t.acked_blocks(), t.last_sent());
        assert!(t.last_sent() <= t.blocks(), "sent {} of {}", t.last_sent(), t.blocks());
        if t.outcome() == Some(&Outcome::Completed) {
            assert_eq!(t.acked_blocks(), t.blocks());
        }
    };
    for event in events.chunks_exact(3) {
        let arg = u16::from_le_bytes([event[1], event[2]]);
        match event[0] % 5 {
            0 => transfer.handle_ack(arg, now),
            1 => now += Duration::from_millis(u64::from(arg)),
            2 => transfer.handle_timeout(now),
            3 => {
                let sent = transfer.last_sent() + u64::from(arg & 0xff);
                let acked = sent.saturating_sub(u64::from(arg >> 8));
                let progress = KernelProgress {
                    last_acked: acked,
                    last_sent: sent,
                    sent_at: now.checked_sub(Duration::from_micros(u64::from(arg))),
                    rtt: (arg & 1 == 1).then(|| {
                        (Duration::from_micros(u64::from(arg)), Duration::from_micros(u64::from(arg >> 4)))
                    }),
                    dup_acks: u64::from(arg >> 12),
                    ..KernelProgress::default()
                };
                transfer.handle_kernel_progress(&progress, now);
            }
            _ => transfer.handle_error(arg, "fuzz"),
        }
        while let Some(out) = transfer.poll_transmit(now) {
            if let Outgoing::Data { index } = out {
                assert!((1..=transfer.blocks()).contains(&index), "DATA {index} of {}", transfer.blocks());
                let range = transfer.block_range(index);
                assert!(range.end as u64 <= file_len && range.start <= range.end);
            }
        }
        check(&transfer);
    }
});
