//! One read transfer as a state machine, sans-IO: the caller passes packets
//! and the time in, and asks what to send and when to wake it.
//!
//! - Blocks are counted with a wide index (1-based, `u64`); the wire carries
//!   its low 16 bits, so files over 65535 blocks roll over to 0 and go on.
//! - A window of `windowsize` blocks is in flight (RFC 7440; 1 is RFC 1350
//!   lockstep). An ACK that covers only part of the window means the client
//!   saw a gap: sending resumes after the acknowledged block.
//! - A duplicate or stale ACK changes nothing and triggers no resend (RFC 1123
//!   §4.2.3.1, the Sorcerer's Apprentice): only our own timer resends.
//! - The timer adapts to the measured round trip (Jacobson/Karels, Karn's
//!   rule for retransmitted blocks) with a 10 ms floor, so one lost packet
//!   costs milliseconds, not the client's multi-second timeout. A spurious
//!   resend is cheap: the client re-acknowledges, and we ignore duplicates.
//!   It backs off exponentially, and the transfer is abandoned after a quiet
//!   `stall_limit`. (Measured: 1 MiB at blksize 512 with 5% loss each way
//!   took 15.6 s with a 50 ms floor, 2.9 s with 10 ms.)

use std::time::{Duration, Instant};

use super::negotiate::Negotiated;

/// Retransmission policy.
#[derive(Clone, Copy, Debug)]
pub struct TimerConfig {
    /// Timeout before the first round trip is measured.
    pub initial_rto: Duration,
    /// Floor of the adaptive timeout.
    pub min_rto: Duration,
    /// Ceiling of the adaptive timeout and its backoff.
    pub max_rto: Duration,
    /// Abandon a transfer after this long without progress.
    pub stall_limit: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            initial_rto: Duration::from_millis(250),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_secs(2),
            // Longer than EDK2's 6 retries × 4 s, so a slow client is never
            // cut off while it is still trying.
            stall_limit: Duration::from_secs(30),
        }
    }
}

/// What the driver must send next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// The option acknowledgement agreed in [`Negotiated::oack`].
    OptionAck,
    /// DATA for the block with this wide index.
    Data { index: u64 },
}

/// How a transfer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every block, including the final short one, was acknowledged.
    Completed,
    /// The client sent an ERROR (e.g. OVMF's ERROR 8 after a tsize probe).
    ClientError { code: u16, message: String },
    /// No progress for the stall limit despite retransmissions.
    TimedOut { acked_blocks: u64 },
}

/// Counters for the log line at the end of a transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub data_sent: u64,
    pub retransmits: u64,
    pub duplicate_acks: u64,
}

#[derive(Debug)]
pub struct Transfer {
    blksize: u64,
    window: u64,
    file_len: u64,
    /// Number of blocks, the final (possibly empty) short block included.
    blocks: u64,
    /// Highest block acknowledged in order (0: none yet).
    acked: u64,
    /// Next block to transmit.
    next: u64,
    /// Highest block ever transmitted: anything at or below it is a resend.
    max_sent: u64,
    oack_pending: bool,
    awaiting_oack_ack: bool,
    timer: TimerConfig,
    rto: Duration,
    srtt: Option<Duration>,
    rttvar: Duration,
    /// A first-transmission block being timed, with its send time.
    probe: Option<(u64, Instant)>,
    deadline: Instant,
    last_progress: Instant,
    outcome: Option<Outcome>,
    stats: TransferStats,
}

impl Transfer {
    /// Starts a transfer of `file_len` bytes with the agreed parameters.
    pub fn new(agreed: &Negotiated, file_len: u64, timer: TimerConfig, now: Instant) -> Self {
        let blksize = u64::from(agreed.blksize.max(1));
        let mut timer = timer;
        if let Some(secs) = agreed.timeout_secs {
            // The client asked us to retransmit after this long (RFC 2349):
            // honour it as the ceiling of our adaptive timer.
            timer.max_rto = Duration::from_secs(secs.into()).max(timer.min_rto);
        }
        let oack = !agreed.oack.is_empty();
        Self {
            blksize,
            window: u64::from(agreed.windowsize.max(1)),
            file_len,
            blocks: file_len / blksize + 1,
            acked: 0,
            next: 1,
            max_sent: 0,
            oack_pending: oack,
            awaiting_oack_ack: oack,
            rto: timer.initial_rto.min(timer.max_rto),
            timer,
            srtt: None,
            rttvar: Duration::ZERO,
            probe: None,
            deadline: now + timer.initial_rto,
            last_progress: now,
            outcome: None,
            stats: TransferStats::default(),
        }
    }

    /// Byte range of the file carried by block `index`.
    pub fn block_range(&self, index: u64) -> std::ops::Range<usize> {
        let start = ((index - 1) * self.blksize).min(self.file_len);
        let end = (start + self.blksize).min(self.file_len);
        start as usize..end as usize
    }

    /// The block number on the wire for a wide index.
    pub fn wire_block(index: u64) -> u16 {
        index as u16
    }

    /// The next packet to send, if any; call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Outgoing> {
        if self.outcome.is_some() {
            return None;
        }
        if self.oack_pending {
            self.oack_pending = false;
            if self.probe.is_none() && self.stats.retransmits == 0 {
                self.probe = Some((0, now));
            }
            return Some(Outgoing::OptionAck);
        }
        if self.awaiting_oack_ack || self.next > self.blocks || self.next > self.acked + self.window
        {
            return None;
        }
        let index = self.next;
        self.next += 1;
        self.stats.data_sent += 1;
        if index > self.max_sent {
            self.max_sent = index;
            if self.probe.is_none() {
                self.probe = Some((index, now));
            }
        }
        Some(Outgoing::Data { index })
    }

    /// When the driver must call [`Transfer::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outcome.is_none().then_some(self.deadline)
    }

    /// How the transfer ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn stats(&self) -> TransferStats {
        self.stats
    }

    /// Blocks acknowledged so far.
    pub fn acked_blocks(&self) -> u64 {
        self.acked
    }

    /// An ACK from the client.
    pub fn handle_ack(&mut self, block: u16, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        if self.awaiting_oack_ack {
            if block == 0 {
                self.awaiting_oack_ack = false;
                self.progress(0, now);
            } else {
                self.stats.duplicate_acks += 1;
            }
            return;
        }
        // The one block in flight whose low 16 bits match: a window is far
        // smaller than 65536 blocks, so there is at most one.
        let in_flight = self.acked + 1..self.next;
        let Some(index) = in_flight.clone().find(|i| Self::wire_block(*i) == block) else {
            self.stats.duplicate_acks += 1; // duplicate or stale: never a reason to resend
            return;
        };
        self.progress(index, now);
        if index == self.blocks {
            self.outcome = Some(Outcome::Completed);
            return;
        }
        if index + 1 < self.next {
            // The client saw a gap after `index` (RFC 7440 §4): resume there.
            self.next = index + 1;
            self.probe = None;
        }
    }

    /// Blocks in the transfer, the final (short or empty) one included.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Highest block sent so far.
    pub fn last_sent(&self) -> u64 {
        self.max_sent
    }

    /// Blocks sent per acknowledgement (RFC 7440 windowsize; 1: lockstep).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// True once options are settled and DATA flows: the state the kernel
    /// tiers can take over.
    pub fn is_streaming_data(&self) -> bool {
        self.outcome.is_none()
            && !self.awaiting_oack_ack
            && !self.oack_pending
            && self.max_sent >= 1
    }

    /// The kernel tiers answered ACKs on our behalf: the client acknowledged
    /// up to `last_acked`, and blocks up to `last_sent` are out. Catches the
    /// machine up; returns false if that is no news.
    pub fn handle_kernel_progress(
        &mut self,
        last_acked: u64,
        last_sent: u64,
        now: Instant,
    ) -> bool {
        if self.outcome.is_some()
            || last_sent <= self.max_sent
            || last_sent > self.blocks
            || last_acked >= last_sent
        {
            return false;
        }
        self.acked = last_acked.max(self.acked);
        self.next = last_sent + 1;
        self.max_sent = last_sent;
        self.probe = None;
        self.last_progress = now;
        // Progress ends any backoff, as a new ACK does in TCP: the next loss
        // must again cost one round-trip timeout, not the backed-off one.
        self.rto = self.base_rto();
        self.deadline = now + self.rto;
        true
    }

    /// The retransmit timeout from the measured round trip, without backoff.
    fn base_rto(&self) -> Duration {
        match self.srtt {
            Some(srtt) => (srtt + self.rttvar * 4).clamp(self.timer.min_rto, self.timer.max_rto),
            None => self.timer.initial_rto.min(self.timer.max_rto),
        }
    }

    /// An ERROR from the client ends the transfer.
    pub fn handle_error(&mut self, code: u16, message: &str) {
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::ClientError {
                code,
                message: message.to_owned(),
            });
        }
    }

    /// The timer fired: resend what is unacknowledged, or give up.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() || now < self.deadline {
            return;
        }
        if now.duration_since(self.last_progress) >= self.timer.stall_limit {
            self.outcome = Some(Outcome::TimedOut {
                acked_blocks: self.acked,
            });
            return;
        }
        self.stats.retransmits += 1;
        self.probe = None; // Karn: a resent packet's ACK says nothing about the RTT
        self.rto = (self.rto * 2).min(self.timer.max_rto);
        self.deadline = now + self.rto;
        if self.awaiting_oack_ack {
            self.oack_pending = true;
        } else {
            self.next = self.acked + 1;
        }
    }

    /// Block `index` (0 for the OACK) was acknowledged.
    fn progress(&mut self, index: u64, now: Instant) {
        if let Some((probe, sent)) = self.probe {
            if index >= probe {
                self.sample_rtt(now.duration_since(sent));
                self.probe = None;
            }
        }
        self.acked = index;
        self.last_progress = now;
        self.deadline = now + self.rto;
    }

    /// RFC 6298 smoothing.
    fn sample_rtt(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        self.rto = (srtt + self.rttvar * 4).clamp(self.timer.min_rto, self.timer.max_rto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(blksize: u16, windowsize: u16, oack: bool) -> Negotiated {
        Negotiated {
            blksize,
            windowsize,
            timeout_secs: None,
            oack: if oack {
                vec![("blksize", blksize.to_string())]
            } else {
                vec![]
            },
        }
    }

    fn drain(t: &mut Transfer, now: Instant) -> Vec<Outgoing> {
        std::iter::from_fn(|| t.poll_transmit(now)).collect()
    }

    fn data(indices: impl IntoIterator<Item = u64>) -> Vec<Outgoing> {
        indices
            .into_iter()
            .map(|index| Outgoing::Data { index })
            .collect()
    }

    #[test]
    fn lockstep_transfer_without_options_sends_block_after_block() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(512, 1, false), 1024, TimerConfig::default(), t0);
        // 1024 bytes at 512: two full blocks and an empty final block.
        assert_eq!(drain(&mut t, t0), data([1]));
        t.handle_ack(1, t0);
        assert_eq!(drain(&mut t, t0), data([2]));
        t.handle_ack(2, t0);
        assert_eq!(drain(&mut t, t0), data([3]));
        assert_eq!(t.block_range(3), 1024..1024, "the final block is empty");
        t.handle_ack(3, t0);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
        assert_eq!(drain(&mut t, t0), vec![]);
    }

    #[test]
    fn empty_file_is_one_empty_block() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(512, 1, false), 0, TimerConfig::default(), t0);
        assert_eq!(drain(&mut t, t0), data([1]));
        assert_eq!(t.block_range(1), 0..0);
        t.handle_ack(1, t0);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
    }

    #[test]
    fn oack_must_be_acknowledged_with_block_zero_first() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(1468, 1, true), 100, TimerConfig::default(), t0);
        assert_eq!(drain(&mut t, t0), vec![Outgoing::OptionAck]);
        t.handle_ack(1, t0); // nonsense before the OACK is acknowledged
        assert_eq!(drain(&mut t, t0), vec![]);
        t.handle_ack(0, t0);
        assert_eq!(drain(&mut t, t0), data([1]));
        t.handle_ack(1, t0);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
    }

    #[test]
    fn a_client_error_after_the_oack_ends_the_transfer() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(1468, 4, true), 100, TimerConfig::default(), t0);
        drain(&mut t, t0);
        t.handle_error(8, "tsize probe only");
        assert_eq!(
            t.outcome(),
            Some(&Outcome::ClientError {
                code: 8,
                message: "tsize probe only".into()
            })
        );
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn duplicate_acks_never_trigger_a_resend() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(512, 1, false), 5000, TimerConfig::default(), t0);
        drain(&mut t, t0);
        t.handle_ack(1, t0);
        assert_eq!(drain(&mut t, t0), data([2]));
        for _ in 0..5 {
            t.handle_ack(1, t0);
            assert_eq!(drain(&mut t, t0), vec![], "duplicate ACK 1 must not resend");
        }
        assert_eq!(t.stats().duplicate_acks, 5);
    }

    #[test]
    fn lost_data_is_resent_by_the_timer_with_backoff() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 5000, timer, t0);
        drain(&mut t, t0);
        let first = t.poll_timeout().unwrap();
        assert_eq!(first, t0 + timer.initial_rto);
        t.handle_timeout(first - Duration::from_millis(1));
        assert_eq!(drain(&mut t, first), vec![], "not before the deadline");
        t.handle_timeout(first);
        assert_eq!(drain(&mut t, first), data([1]), "resent");
        let second = t.poll_timeout().unwrap();
        assert_eq!(second - first, timer.initial_rto * 2, "backed off");
    }

    #[test]
    fn the_timer_adapts_to_a_fast_client() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 512 * 100, timer, t0);
        let mut now = t0;
        for block in 1..=20u16 {
            drain(&mut t, now);
            now += Duration::from_micros(200);
            t.handle_ack(block, now);
        }
        let rto = t.poll_timeout().unwrap() - now;
        assert_eq!(
            rto, timer.min_rto,
            "a 200 µs round trip gives the floor, not 250 ms"
        );
    }

    #[test]
    fn the_timer_keeps_adapting_after_a_retransmission() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 512 * 100, timer, t0);
        drain(&mut t, t0);
        let mut now = t.poll_timeout().unwrap();
        t.handle_timeout(now); // block 1 lost once
        drain(&mut t, now);
        for block in 1..=30u16 {
            now += Duration::from_micros(200);
            t.handle_ack(block, now);
            drain(&mut t, now);
        }
        assert_eq!(
            t.poll_timeout().unwrap() - now,
            timer.min_rto,
            "fresh blocks are timed again"
        );
    }

    #[test]
    fn a_silent_client_is_abandoned_after_the_stall_limit() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 5000, timer, t0);
        drain(&mut t, t0);
        let mut now = t0;
        while t.outcome().is_none() {
            now = t.poll_timeout().unwrap();
            t.handle_timeout(now);
            drain(&mut t, now);
        }
        assert_eq!(t.outcome(), Some(&Outcome::TimedOut { acked_blocks: 0 }));
        assert!(now - t0 >= timer.stall_limit);
        assert!(now - t0 < timer.stall_limit + timer.max_rto + Duration::from_millis(1));
    }

    #[test]
    fn a_window_is_sent_whole_and_a_partial_ack_resumes_after_the_gap() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(512, 4, false), 512 * 10, TimerConfig::default(), t0);
        assert_eq!(drain(&mut t, t0), data(1..=4));
        t.handle_ack(4, t0);
        assert_eq!(drain(&mut t, t0), data(5..=8));
        // Block 6 was lost: the client acknowledges 5.
        t.handle_ack(5, t0);
        assert_eq!(drain(&mut t, t0), data(6..=9));
        t.handle_ack(9, t0);
        assert_eq!(
            drain(&mut t, t0),
            data(10..=11),
            "block 11 is the empty final block"
        );
        t.handle_ack(11, t0);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let t0 = Instant::now();
        let blocks = 70_000u64;
        let mut t = Transfer::new(&agreed(8, 1, false), 8 * blocks, TimerConfig::default(), t0);
        let mut wire_blocks = Vec::new();
        while t.outcome().is_none() {
            let out = drain(&mut t, t0);
            let [Outgoing::Data { index }] = out[..] else {
                panic!("one block at a time, got {out:?}")
            };
            let wire = Transfer::wire_block(index);
            wire_blocks.push(wire);
            t.handle_ack(wire, t0);
        }
        assert_eq!(wire_blocks.len() as u64, blocks + 1);
        assert_eq!(wire_blocks[65534], 65535);
        assert_eq!(wire_blocks[65535], 0, "rolls over to 0");
        assert_eq!(wire_blocks[65536], 1);
    }

    #[test]
    fn kernel_progress_catches_the_machine_up_and_it_finishes_the_transfer() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 10 + 7,
            TimerConfig::default(),
            t0,
        );
        assert_eq!(drain(&mut t, t0), data([1]));
        assert!(t.is_streaming_data());
        // The kernel answered ACKs 1..9 and sent up to block 10.
        assert!(t.handle_kernel_progress(9, 10, t0));
        assert!(
            !t.handle_kernel_progress(9, 10, t0),
            "no news the second time"
        );
        assert_eq!(
            drain(&mut t, t0),
            vec![],
            "block 10 is the kernel's, in flight"
        );
        // The client acknowledges block 10 to us (the kernel leaves the last ones to userspace).
        t.handle_ack(10, t0);
        assert_eq!(drain(&mut t, t0), data([11]), "the short final block");
        t.handle_ack(11, t0);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
    }

    #[test]
    fn kernel_progress_ends_the_backoff() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        let now = t0 + Duration::from_micros(300);
        t.handle_ack(1, now); // one RTT sample: 300 µs
        drain(&mut t, now);
        t.handle_kernel_progress(9, 10, now);
        let mut at = now;
        for _ in 0..4 {
            at = t.poll_timeout().unwrap();
            t.handle_timeout(at); // block 10 lost again and again: backoff
            drain(&mut t, at);
        }
        assert!(t.poll_timeout().unwrap() - at > TimerConfig::default().min_rto * 4);
        t.handle_kernel_progress(19, 20, at);
        assert_eq!(
            t.poll_timeout().unwrap() - at,
            TimerConfig::default().min_rto,
            "back to the measured timeout"
        );
    }

    #[test]
    fn without_kernel_progress_the_timer_resends_the_kernels_last_block() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 10 + 7,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        t.handle_kernel_progress(5, 6, t0);
        let deadline = t.poll_timeout().unwrap();
        t.handle_timeout(deadline);
        assert_eq!(
            drain(&mut t, deadline),
            data([6]),
            "block 6 was lost: resent from userspace"
        );
    }

    #[test]
    fn a_windowed_transfer_resumes_from_the_kernels_window() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 4, false),
            512 * 30 + 7,
            TimerConfig::default(),
            t0,
        );
        assert_eq!(drain(&mut t, t0), data(1..=4));
        assert!(t.is_streaming_data());
        // The kernel answered ACKs 4, 8, 12 with whole windows: 13..=16 are out.
        assert!(t.handle_kernel_progress(12, 16, t0));
        assert_eq!(
            drain(&mut t, t0),
            vec![],
            "the kernel's window is in flight"
        );
        let deadline = t.poll_timeout().unwrap();
        t.handle_timeout(deadline);
        assert_eq!(
            drain(&mut t, deadline),
            data(13..=16),
            "that window was lost: resent whole from userspace"
        );
        // The last windows are userspace's again: the ACK of 28 is ours.
        assert!(t.handle_kernel_progress(24, 28, deadline));
        t.handle_ack(28, deadline);
        assert_eq!(
            drain(&mut t, deadline),
            data(29..=31),
            "up to the short final block"
        );
        t.handle_ack(31, deadline);
        assert_eq!(t.outcome(), Some(&Outcome::Completed));
    }

    #[test]
    fn requested_timeout_caps_the_backoff() {
        let t0 = Instant::now();
        let mut a = agreed(512, 1, false);
        a.timeout_secs = Some(1);
        let mut t = Transfer::new(&a, 5000, TimerConfig::default(), t0);
        drain(&mut t, t0);
        let mut now = t0;
        for _ in 0..6 {
            now = t.poll_timeout().unwrap();
            t.handle_timeout(now);
            drain(&mut t, now);
        }
        assert_eq!(t.poll_timeout().unwrap() - now, Duration::from_secs(1));
    }
}
