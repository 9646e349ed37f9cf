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
//!   rule for retransmitted blocks) with a 5 ms floor, so one lost packet
//!   costs milliseconds, not the client's multi-second timeout. A spurious
//!   resend is cheap: the client re-acknowledges, and we ignore duplicates;
//!   in lockstep that second acknowledgement proves the resend needless and
//!   raises the transfer's floor (round trips with a long tail, which the
//!   samples never show). It backs off exponentially to a ceiling above the
//!   clients' own timeouts, and the transfer is abandoned after a quiet
//!   `stall_limit`. (Measured: 1 MiB at blksize 512
//!   with 5% loss each way took 15.6 s with a 50 ms floor, 2.9 s with 10 ms;
//!   the 5 ms floor: docs/BENCHMARKS.md, TFTP under loss.)
//! - While the kernel tiers serve the transfer they see the ACKs: the
//!   driver passes their progress in ([`Transfer::handle_kernel_progress`]),
//!   with the time of the kernel's last send and its round trip, and the
//!   timeout counts from that send.

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
            min_rto: Duration::from_millis(5),
            // Above the clients' own timeouts (atftp and tftp-hpa 5 s, EDK2
            // 4 s): a client that restarts its timer on every block it
            // ignores (atftp, once its one extra ACK is lost) re-acknowledges
            // only in a quiet gap longer than that. A client that retries
            // loses nothing by it: any ACK is answered at once.
            max_rto: Duration::from_secs(8),
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

/// What the kernel tiers report of a transfer handed to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelProgress {
    /// Highest block acknowledged to the kernel.
    pub last_acked: u64,
    /// Highest block sent, by anyone.
    pub last_sent: u64,
    /// When the kernel sent its last window (None: it has sent none).
    pub sent_at: Option<Instant>,
    /// The round trip the kernel measured, smoothed, and its variation.
    pub rtt: Option<(Duration, Duration)>,
    /// Duplicate or stale ACKs the kernel dropped.
    pub dup_acks: u64,
    pub xdp_sent: u64,
    pub tc_sent: u64,
}

/// Counters for the log line at the end of a transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub data_sent: u64,
    pub retransmits: u64,
    pub duplicate_acks: u64,
    /// Resends the client proved needless by acknowledging twice.
    pub spurious_resends: u64,
}

/// The highest a transfer's timeout floor rises after spurious resends
/// (Linux TCP's minimum RTO): a loss must never cost the client's own
/// timeout.
const SPURIOUS_FLOOR_CAP: Duration = Duration::from_millis(200);

/// A resend by the timer, until it proves spurious or another replaces it.
#[derive(Clone, Copy, Debug)]
struct Resend {
    /// The block resent (wide index; 0: the OACK); lockstep only.
    block: u64,
    /// The timeout that fired.
    after: Duration,
    /// The kernel's duplicate-ACK count just before it.
    kernel_dups: u64,
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
    /// While the kernel tiers serve the transfer and a resend waits out its
    /// backed-off timeout: when to look at the kernel's progress first. The
    /// kernel takes the resent block's ACK, and the losses after it must not
    /// wait for that longer timeout to be noticed.
    kernel_check: Option<Instant>,
    /// The kernel tiers have reported progress: they see the ACKs.
    kernel_serving: bool,
    /// The kernel's duplicate-ACK count when last looked at.
    kernel_dups: u64,
    /// The last resend, watched for proof that it was spurious.
    resend: Option<Resend>,
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
            kernel_check: None,
            kernel_serving: false,
            kernel_dups: 0,
            resend: None,
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
        let wake = self
            .kernel_check
            .map_or(self.deadline, |check| check.min(self.deadline));
        self.outcome.is_none().then_some(wake)
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
            if let Some(resend) = self.resend {
                if Self::wire_block(resend.block) == block {
                    // Acknowledged twice: the original arrived after all.
                    self.resent_spuriously(resend);
                }
            }
            return;
        };
        self.progress(index, now);
        if self.resend.is_some_and(|r| index > r.block) {
            // Past what was resent: a duplicate now is a gap's, not proof.
            self.resend = None;
        }
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
    /// up to `last_acked`, and blocks up to `last_sent` are out, the last
    /// window sent at `sent_at`. Catches the machine up and counts the
    /// retransmit timeout from that send, with the kernel's round trip (it
    /// sees the ACKs now); returns false if that is no news.
    pub fn handle_kernel_progress(&mut self, kernel: &KernelProgress, now: Instant) -> bool {
        if let Some((srtt, rttvar)) = kernel.rtt {
            self.srtt = Some(srtt);
            self.rttvar = rttvar;
        }
        self.kernel_dups = kernel.dup_acks;
        if let Some(resend) = self.resend {
            if kernel.dup_acks > resend.kernel_dups {
                // The client acknowledged a resent block twice (see
                // `resent_spuriously`); the kernel dropped the second.
                self.resent_spuriously(resend);
            }
        }
        let (last_acked, last_sent) = (kernel.last_acked, kernel.last_sent);
        self.kernel_serving = true;
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
        let sent_at = kernel.sent_at.filter(|&at| at <= now).unwrap_or(now);
        self.last_progress = sent_at;
        // Progress ends any backoff, as a new ACK does in TCP: the next loss
        // must again cost one round-trip timeout, not the backed-off one.
        // (Keeping the backoff until a fresh sample, as Karn would, cost 15%
        // at 5% loss; round trips that outgrow the timeout are caught by
        // `resent_spuriously` instead.)
        self.rto = self.base_rto();
        self.deadline = sent_at + self.rto;
        self.kernel_check = None;
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
        if self.outcome.is_some() {
            return;
        }
        if now < self.deadline {
            if self.kernel_check.is_some_and(|at| at <= now) {
                // The driver looked and the kernel has not moved on: the
                // resend waits out its backoff.
                self.kernel_check = None;
            }
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
        let unbacked = self.rto;
        // Lockstep only: a windowed client acknowledges again whenever a
        // block arrives twice or out of order, which a resend of a window it
        // partly had causes too, so it proves nothing there.
        let block = if self.awaiting_oack_ack {
            0
        } else {
            self.acked + 1
        };
        self.resend = (self.window == 1).then_some(Resend {
            block,
            after: unbacked,
            kernel_dups: self.kernel_dups,
        });
        self.rto = (self.rto * 2).min(self.timer.max_rto);
        self.deadline = now + self.rto;
        self.kernel_check = self.kernel_serving.then_some(now + unbacked);
        if self.awaiting_oack_ack {
            self.oack_pending = true;
        } else {
            self.next = self.acked + 1;
        }
    }

    /// A resend proved needless: the client acknowledged the original and
    /// then the copy (a lost DATA or ACK gets one acknowledgement). The round
    /// trip's tail outgrew the timeout, which the samples cannot show (the
    /// ACKs of resent blocks are not samples), so the floor of this
    /// transfer's timeout goes to twice the one that fired, up to
    /// [`SPURIOUS_FLOOR_CAP`]. Seen with 512 lockstep clients on 2 cores:
    /// round trips of 1-3 ms with stalls of 10-75 ms. A timeout before any
    /// round trip was measured was a guess, and a slow first answer (firmware
    /// reading the OACK) says nothing about the rest.
    fn resent_spuriously(&mut self, resend: Resend) {
        self.resend = None;
        self.stats.spurious_resends += 1;
        if self.srtt.is_none() || resend.block == 0 {
            return;
        }
        let floor = (resend.after * 2)
            .min(SPURIOUS_FLOOR_CAP)
            .min(self.timer.max_rto);
        self.timer.min_rto = self.timer.min_rto.max(floor);
        self.rto = self.rto.max(self.timer.min_rto);
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

    /// The client acknowledges `blocks` one after the other, 100 µs apart.
    fn acknowledge_quickly(
        t: &mut Transfer,
        blocks: std::ops::RangeInclusive<u16>,
        mut now: Instant,
    ) -> Instant {
        for block in blocks {
            now += Duration::from_micros(100);
            t.handle_ack(block, now);
            drain(t, now);
        }
        now
    }

    /// The kernel's report without times: it answered ACKs up to `acked`.
    fn kernel(acked: u64, sent: u64) -> KernelProgress {
        KernelProgress {
            last_acked: acked,
            last_sent: sent,
            ..KernelProgress::default()
        }
    }

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
    fn the_backoff_falls_quiet_longer_than_a_clients_own_timeout_before_giving_up() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 4, false), 512 * 100, timer, t0);
        drain(&mut t, t0);
        let (mut now, mut longest_gap) = (t0, Duration::ZERO);
        loop {
            let next = t.poll_timeout().unwrap();
            t.handle_timeout(next);
            if t.outcome().is_some() {
                break;
            }
            // A gap that ends in a resend, not in giving up.
            longest_gap = longest_gap.max(next - now);
            now = next;
            drain(&mut t, now);
        }
        // atftp and tftp-hpa wait 5 s, EDK2 4 s.
        assert!(longest_gap > Duration::from_secs(5), "{longest_gap:?}");
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
        assert!(t.handle_kernel_progress(&kernel(9, 10), t0));
        assert!(
            !t.handle_kernel_progress(&kernel(9, 10), t0),
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
        t.handle_kernel_progress(&kernel(9, 10), now);
        let mut at = now;
        let mut resends = 0;
        while resends < 4 {
            // Block 10 lost again and again: backoff (with a look at the
            // kernel's progress, which has nothing new, between resends).
            at = t.poll_timeout().unwrap();
            t.handle_timeout(at);
            resends += drain(&mut t, at).len();
        }
        t.handle_timeout(t.poll_timeout().unwrap());
        assert!(t.poll_timeout().unwrap() - at > TimerConfig::default().min_rto * 4);
        t.handle_kernel_progress(&kernel(19, 20), at);
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
        t.handle_kernel_progress(&kernel(5, 6), t0);
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
        assert!(t.handle_kernel_progress(&kernel(12, 16), t0));
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
        assert!(t.handle_kernel_progress(&kernel(24, 28), deadline));
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

    #[test]
    fn a_loss_in_the_kernels_hands_is_resent_one_timeout_after_the_kernel_sent() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        // Userspace reads the progress 7 ms after the kernel sent block 40,
        // with a 200 µs round trip measured in the kernel.
        let sent_at = t0 + Duration::from_millis(3);
        let read_at = sent_at + Duration::from_millis(7);
        let progress = KernelProgress {
            sent_at: Some(sent_at),
            rtt: Some((Duration::from_micros(200), Duration::from_micros(50))),
            ..kernel(39, 40)
        };
        assert!(t.handle_kernel_progress(&progress, read_at));
        assert_eq!(
            t.poll_timeout().unwrap(),
            sent_at + TimerConfig::default().min_rto,
            "one timeout after the kernel's send, not after the read"
        );
        t.handle_timeout(sent_at + TimerConfig::default().min_rto);
        assert_eq!(drain(&mut t, read_at), data([40]));
    }

    #[test]
    fn the_kernels_round_trip_sets_the_timeout() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        // Before the kernel measured anything: the initial timeout.
        t.handle_kernel_progress(&kernel(9, 10), t0);
        assert_eq!(
            t.poll_timeout().unwrap() - t0,
            TimerConfig::default().initial_rto
        );
        let slow = KernelProgress {
            rtt: Some((Duration::from_millis(30), Duration::from_millis(5))),
            sent_at: Some(t0),
            ..kernel(19, 20)
        };
        t.handle_kernel_progress(&slow, t0);
        assert_eq!(
            t.poll_timeout().unwrap() - t0,
            Duration::from_millis(50),
            "srtt + 4 rttvar"
        );
    }

    #[test]
    fn after_a_resend_the_kernels_progress_is_looked_at_before_the_backed_off_timeout() {
        let t0 = Instant::now();
        let rto = TimerConfig::default().min_rto;
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        let fast = Some((Duration::from_micros(100), Duration::from_micros(20)));
        let progress = |acked, sent_at| KernelProgress {
            sent_at: Some(sent_at),
            rtt: fast,
            ..kernel(acked, acked + 1)
        };
        t.handle_kernel_progress(&progress(9, t0), t0);
        let lost = t.poll_timeout().unwrap();
        t.handle_timeout(lost);
        assert_eq!(drain(&mut t, lost), data([10]), "block 10 resent");
        let check = t.poll_timeout().unwrap();
        assert_eq!(
            check - lost,
            rto,
            "looked at one timeout on, not the backed-off two"
        );

        // Nothing new in the kernel then: the resend waits out its backoff.
        t.handle_timeout(check);
        assert_eq!(drain(&mut t, check), vec![]);
        assert_eq!(t.poll_timeout().unwrap() - lost, rto * 2);

        // The kernel took the resent block's ACK and went on: a later loss
        // is again one timeout after the kernel's last send.
        let sent = check + Duration::from_millis(3);
        let later = sent + Duration::from_millis(4);
        assert!(t.handle_kernel_progress(&progress(30, sent), later));
        assert_eq!(t.poll_timeout().unwrap(), sent + rto);
    }

    #[test]
    fn an_ack_of_a_resent_block_twice_raises_the_timeouts_floor() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 512 * 100, timer, t0);
        assert_eq!(drain(&mut t, t0), data([1]));
        let sampled = t0 + Duration::from_micros(300);
        t.handle_ack(1, sampled);
        assert_eq!(drain(&mut t, sampled), data([2]));
        let fired = t.poll_timeout().unwrap();
        let fired_after = fired - sampled;
        t.handle_timeout(fired);
        assert_eq!(drain(&mut t, fired), data([2]), "resent");
        // The original's ACK was only slow: the client acknowledges it, then the copy.
        t.handle_ack(2, fired + Duration::from_millis(1));
        drain(&mut t, fired);
        assert_eq!(t.stats().spurious_resends, 0, "one ACK proves nothing");
        t.handle_ack(2, fired + Duration::from_millis(2));
        assert_eq!(t.stats().spurious_resends, 1);
        // Fast round trips since cannot pull the timeout under twice the one that fired.
        let mut now = fired + Duration::from_millis(2);
        now = acknowledge_quickly(&mut t, 3..=20, now);
        assert_eq!(fired_after, timer.min_rto);
        assert_eq!(t.poll_timeout().unwrap() - now, fired_after * 2);
    }

    #[test]
    fn a_slow_first_answer_leaves_the_floor_alone() {
        let t0 = Instant::now();
        let mut t = Transfer::new(&agreed(512, 1, true), 512 * 100, TimerConfig::default(), t0);
        assert_eq!(drain(&mut t, t0), vec![Outgoing::OptionAck]);
        let fired = t.poll_timeout().unwrap();
        t.handle_timeout(fired);
        assert_eq!(drain(&mut t, fired), vec![Outgoing::OptionAck], "resent");
        // Firmware took 300 ms over the OACK and acknowledges both copies.
        let mut now = t0 + Duration::from_millis(300);
        t.handle_ack(0, now);
        t.handle_ack(0, now);
        assert_eq!(t.stats().spurious_resends, 1, "counted");
        drain(&mut t, now);
        now = acknowledge_quickly(&mut t, 1..=20, now);
        assert_eq!(
            t.poll_timeout().unwrap() - now,
            TimerConfig::default().min_rto,
            "the measured timeout, not twice the guess"
        );
    }

    #[test]
    fn a_lost_block_resent_is_acknowledged_once_and_leaves_the_floor_alone() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 1, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        drain(&mut t, t0);
        let fired = t.poll_timeout().unwrap();
        t.handle_timeout(fired);
        drain(&mut t, fired);
        let mut now = fired;
        now = acknowledge_quickly(&mut t, 1..=20, now);
        assert_eq!(t.stats().spurious_resends, 0);
        assert_eq!(
            t.poll_timeout().unwrap() - now,
            TimerConfig::default().min_rto
        );
    }

    #[test]
    fn a_duplicate_the_kernel_dropped_after_a_resend_proves_it_spurious() {
        let t0 = Instant::now();
        let timer = TimerConfig::default();
        let mut t = Transfer::new(&agreed(512, 1, false), 512 * 100, timer, t0);
        drain(&mut t, t0);
        let fast = Some((Duration::from_micros(100), Duration::from_micros(20)));
        let report = |acked: u64, sent_at, dup_acks| KernelProgress {
            sent_at: Some(sent_at),
            rtt: fast,
            dup_acks,
            ..kernel(acked, acked + 1)
        };
        t.handle_kernel_progress(&report(9, t0, 3), t0);
        let fired = t.poll_timeout().unwrap();
        t.handle_kernel_progress(&report(9, t0, 3), fired);
        t.handle_timeout(fired);
        assert_eq!(drain(&mut t, fired), data([10]));
        // The kernel took both ACKs of block 10: it answered one, dropped one.
        let later = fired + Duration::from_millis(1);
        t.handle_kernel_progress(&report(10, later, 4), later);
        assert_eq!(t.stats().spurious_resends, 1);
        assert_eq!(t.poll_timeout().unwrap() - later, timer.min_rto * 2);
    }

    #[test]
    fn a_windowed_clients_gap_acks_after_a_resend_are_no_proof() {
        let t0 = Instant::now();
        let mut t = Transfer::new(
            &agreed(512, 4, false),
            512 * 100,
            TimerConfig::default(),
            t0,
        );
        assert_eq!(drain(&mut t, t0), data(1..=4));
        let mut now = t0 + Duration::from_micros(300);
        t.handle_ack(4, now);
        assert_eq!(drain(&mut t, now), data(5..=8));
        let fired = t.poll_timeout().unwrap();
        t.handle_timeout(fired);
        assert_eq!(drain(&mut t, fired), data(5..=8), "the lost window resent");
        now = fired + Duration::from_micros(300);
        t.handle_ack(8, now);
        assert_eq!(drain(&mut t, now), data(9..=12));
        // Block 10 is lost: the client acknowledges 9 for each of 11 and 12.
        t.handle_ack(9, now);
        assert_eq!(drain(&mut t, now), data(10..=13), "resumed after the gap");
        t.handle_ack(9, now);
        t.handle_ack(9, now);
        assert_eq!(t.stats().spurious_resends, 0);
    }
}
