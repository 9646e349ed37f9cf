//! Map names, keys, values and capacities, shared by the programs and the loader.
//!
//! aya's `#[map(name = "...")]` takes a literal, so the BPF statics carry these
//! names as identifiers; a userspace test loads the object and checks every
//! name in [`ALL`] exists there.

use bytemuck::{Pod, Zeroable};

/// `Counter` index → per-CPU `u64`; written by the XDP program, read by the daemon.
pub const XDP_COUNTERS: &str = "XDP_COUNTERS";
/// `Counter` index → per-CPU `u64`; written by the TC program, read by the daemon.
pub const TC_COUNTERS: &str = "TC_COUNTERS";
/// [`TftpPortKey`] → [`TftpPortEntry`]; written by the daemon when a transfer
/// opens its server port, read by both programs to recognise transfer traffic.
pub const TFTP_PORTS: &str = "TFTP_PORTS";

/// Image chunk index → [`CHUNK_SIZE`] bytes of boot files; filled by the
/// daemon through `mmap` of the map, read by both programs to build DATA.
pub const IMAGE_CHUNKS: &str = "IMAGE_CHUNKS";
/// Chunk index → [`ChunkSums`], the running checksums of that chunk of
/// `IMAGE_CHUNKS`; written by the daemon with the chunk, read by both
/// programs, which checksum a DATA block from two of them and the block's
/// ends instead of from every byte.
pub const CHUNK_SUMS: &str = "CHUNK_SUMS";
/// Image id → [`ImageEntry`]; written by the daemon when it loads a file
/// into `IMAGE_CHUNKS`, read by both programs.
pub const IMAGES: &str = "IMAGES";
/// [`SessionKey`] → [`SessionConfig`]: how the kernel serves a transfer and
/// from which point. Written only by the daemon (when it hands a transfer
/// over), read by both programs.
pub const TFTP_SESSIONS: &str = "TFTP_SESSIONS";
/// [`SessionKey`] → [`SessionProgress`]: how far the kernel got, when it
/// last sent and the round trip it measures. Written only by the programs
/// (on every in-sequence ACK), read by the daemon for its retransmit timer.
pub const TFTP_PROGRESS: &str = "TFTP_PROGRESS";

/// Every map the object must define.
pub const ALL: &[&str] = &[
    XDP_COUNTERS,
    TC_COUNTERS,
    TFTP_PORTS,
    IMAGE_CHUNKS,
    CHUNK_SUMS,
    IMAGES,
    TFTP_SESSIONS,
    TFTP_PROGRESS,
    crate::dhcp::DHCP_ANSWERS,
    crate::admit::ADMIT_CONFIG,
    crate::admit::DHCP_KNOWN,
    crate::admit::DHCP_BUCKETS,
    crate::admit::DHCP_MAC_RATE,
    crate::admit::TFTP_SOURCE_RATE,
    crate::admit::TFTP_GLOBAL_RATE,
];

/// Largest TFTP block the kernel tiers build: a DATA frame of 1514 bytes at
/// MTU 1500. Larger blocks are served by userspace.
pub const MAX_FAST_BLKSIZE: u32 = 1468;
/// Bytes per image chunk (one map value).
pub const CHUNK_SIZE: u32 = 1 << 20;
/// File bytes each chunk starts after the previous one: chunks overlap by
/// the largest fast-path block, so every block lies inside one chunk and the
/// verifier can bound the copy by a single map value.
pub const CHUNK_STRIDE: u32 = CHUNK_SIZE - MAX_FAST_BLKSIZE;
/// Bytes between two running checksums of a chunk. Smaller grains leave
/// less to sum at a block's ends and take more memory: at 64 the sums are
/// 1/16 of the chunks, and each end of a block has under 64 bytes to sum.
pub const SUM_GRAIN: u32 = 64;
/// Running checksums per chunk: one at every grain from 0 to CHUNK_SIZE,
/// and one unused to keep the value a multiple of 8 bytes (an mmapped or
/// array map's stride).
pub const SUMS_PER_CHUNK: usize = (CHUNK_SIZE / SUM_GRAIN) as usize + 2;
/// `sums[k]`: the ones' complement sum (folded, not complemented) of the
/// chunk's first `k * SUM_GRAIN` bytes as native-order 16-bit words, bytes
/// past the file's end counted as zero (see `csum::running_sums`).
pub type ChunkSums = [u32; SUMS_PER_CHUNK];
/// Number of chunks the object declares; the daemon sets the real size at
/// load time from its memory budget (an array map is allocated whole).
pub const IMAGE_CHUNKS_DEFAULT: u32 = 8;
/// Images that can be loaded at once.
pub const IMAGES_CAPACITY: u32 = 256;
/// Transfers the kernel tiers can serve at once.
pub const TFTP_SESSIONS_CAPACITY: u32 = 65_536;

/// Where an image lives in `IMAGE_CHUNKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ImageEntry {
    pub first_chunk: u32,
    pub chunks: u32,
    /// File length in bytes.
    pub len: u32,
    /// Non-zero once the chunks are filled; a session of an image that is
    /// being replaced keeps serving the old generation's chunks.
    pub ready: u32,
}

impl ImageEntry {
    /// Chunk index and offset inside it of file byte `offset`, for a block
    /// that starts there (the block then fits in that chunk).
    pub const fn locate(&self, offset: u32) -> (u32, u32) {
        let chunk = offset / CHUNK_STRIDE;
        (self.first_chunk + chunk, offset - chunk * CHUNK_STRIDE)
    }
}

/// Key of `TFTP_SESSIONS`: the transfer as the client's ACK names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SessionKey {
    pub client_ip: [u8; 4],
    pub client_port: [u8; 2],
    pub server_port: [u8; 2],
}

/// Value of `TFTP_SESSIONS`: what userspace decided about a kernel session.
///
/// One writer per field (katran's rule): every field here is written by the
/// daemon only, every field of [`SessionProgress`] by the programs only, so
/// neither side can undo what the other wrote. Userspace moves a running
/// session on by publishing a new hand-over (a fresh `handover` number with
/// the point it reached); the kernel adopts it into its progress
/// ([`SessionProgress::adopt`]) at the next ACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionConfig {
    pub image: u32,
    pub blksize: u32,
    /// Blocks in the transfer, the final (short or empty) one included.
    pub blocks: u32,
    /// Blocks sent per ACK (RFC 7440 windowsize; 1 is lockstep), at most
    /// [`MAX_KERNEL_WINDOW`]. An ACK of any block in the window in flight
    /// (`last_sent - window < block ≤ last_sent`) is answered with the
    /// `window` blocks after it; older ACKs are duplicates.
    pub window: u32,
    /// Number of this hand-over, never 0 (see [`next_handover`]): the
    /// kernel adopts a hand-over whose number differs from the one its
    /// progress records.
    pub handover: u32,
    /// Highest block the client had acknowledged to userspace at the
    /// hand-over (wide index; 0: none yet).
    pub handover_acked: u32,
    /// Highest block userspace had sent at the hand-over (wide index).
    pub handover_sent: u32,
    pub _pad: u32,
}

/// Value of `TFTP_PROGRESS`: what the kernel did with a session. Written by
/// the programs only; the daemon creates it zeroed before the session's
/// [`SessionConfig`] exists and removes it after the config is gone, the
/// only moments no program can be writing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionProgress {
    /// The hand-over adopted last (0: none yet).
    pub handover: u32,
    /// Highest block the client acknowledged (wide index; 0: none yet).
    pub last_acked: u32,
    /// Highest block sent, by either side (wide index, 1-based).
    pub last_sent: u32,
    /// Blocks the kernel tiers sent, by tier (XDP in place, TC redirect).
    pub xdp_sent: u32,
    pub tc_sent: u32,
    /// Duplicate or stale ACKs dropped.
    pub dup_acks: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the kernel last sent a
    /// window (0: never): userspace's retransmit deadline counts from here.
    pub sent_ns: u64,
    /// Smoothed round trip and its variation in ns (RFC 6298), from ACKs of
    /// whole kernel-sent windows (0: no sample yet).
    pub srtt_ns: u64,
    pub rttvar_ns: u64,
    /// Non-zero while the window sent at `sent_ns` may be timed: cleared by
    /// a new hand-over, which userspace publishes when it resends (Karn's
    /// rule: the ACK of a resent block says nothing about the round trip).
    pub timed: u32,
    pub _pad: u32,
}

impl SessionProgress {
    /// Takes in the hand-over of `config` if it is not the one adopted last;
    /// true if it was new. Both marks only ever rise on either side (a block
    /// sent stays sent, an acknowledgement stays received), so the merge
    /// takes the higher of each: a hand-over that userspace made from a read
    /// older than the kernel's latest progress cannot move it backwards.
    #[inline(always)]
    pub fn adopt(&mut self, config: &SessionConfig) -> bool {
        if self.handover == config.handover {
            return false;
        }
        self.handover = config.handover;
        self.last_acked = self.last_acked.max(config.handover_acked);
        self.last_sent = self.last_sent.max(config.handover_sent);
        self.timed = 0;
        true
    }

    /// The kernel sent blocks `acked + 1 ..= acked + count` at `now_ns` in
    /// answer to an ACK of `acked`. An ACK of the whole window sent last
    /// (and not resent since) is a round-trip sample: the kernel answers at
    /// once, so ACK to ACK is one round trip.
    #[inline(always)]
    pub fn sent_window(&mut self, acked: u32, count: u32, now_ns: u64) {
        if self.timed != 0 && acked == self.last_sent && self.sent_ns != 0 && now_ns > self.sent_ns
        {
            self.sample_rtt(now_ns - self.sent_ns);
        }
        self.last_acked = acked;
        self.last_sent = acked + count;
        self.sent_ns = now_ns;
        self.timed = 1;
    }

    /// RFC 6298 §2 smoothing (gains 1/8 and 1/4), in integers.
    #[inline(always)]
    pub fn sample_rtt(&mut self, rtt_ns: u64) {
        let rtt = if rtt_ns == 0 { 1 } else { rtt_ns };
        if self.srtt_ns == 0 {
            self.srtt_ns = rtt;
            self.rttvar_ns = rtt / 2;
        } else {
            let delta = rtt.abs_diff(self.srtt_ns);
            self.rttvar_ns = (self.rttvar_ns * 3 + delta) / 4;
            self.srtt_ns = (self.srtt_ns * 7 + rtt) / 8;
        }
    }
}

/// Number of the first hand-over of a session (its progress starts at 0).
pub const FIRST_HANDOVER: u32 = 1;

/// The hand-over number after `previous`: it differs from every recent one
/// and is never 0, the "nothing adopted" of a fresh progress entry.
pub const fn next_handover(previous: u32) -> u32 {
    match previous.wrapping_add(1) {
        0 => FIRST_HANDOVER,
        next => next,
    }
}

/// Largest window the kernel tiers serve: the TC tier sends a window as one
/// frame per block (clone and redirect), unrolled this many times at most.
/// UEFI (EDK2) asks for 4; larger windows stay in userspace, whose GSO
/// sends a window in one call: at 16 that beat the clones per block
/// (docs/BENCHMARKS.md, windows above 8).
pub const MAX_KERNEL_WINDOW: u32 = 8;

const _: () = assert!(core::mem::size_of::<ImageEntry>() == 16);
const _: () = assert!(core::mem::size_of::<SessionKey>() == 8);
const _: () = assert!(core::mem::size_of::<SessionConfig>() == 32);
const _: () = assert!(core::mem::size_of::<SessionProgress>() == 56);
const _: () = assert!(CHUNK_STRIDE > 0);

/// How many transfer ports can be registered at once: one per running transfer.
pub const TFTP_PORTS_CAPACITY: u32 = 65_536;

/// Key of `TFTP_PORTS`: a server-side UDP port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TftpPortKey {
    pub port: [u8; 2],
    /// Explicit: Pod forbids implicit padding, and the kernel hashes all four bytes.
    pub _pad: [u8; 2],
}

impl TftpPortKey {
    pub const fn new(port: u16) -> Self {
        Self {
            port: port.to_be_bytes(),
            _pad: [0; 2],
        }
    }
}

/// Value of `TFTP_PORTS`: presence is what matters today; `flags` is reserved
/// for the fast-path tiers and must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TftpPortEntry {
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<TftpPortKey>() == 4);
const _: () = assert!(core::mem::size_of::<TftpPortEntry>() == 4);

crate::impl_aya_pod!(
    TftpPortKey,
    TftpPortEntry,
    ImageEntry,
    SessionKey,
    SessionConfig,
    SessionProgress
);

#[cfg(test)]
mod tests {
    use super::*;

    fn handed_over(handover: u32, acked: u32, sent: u32) -> SessionConfig {
        SessionConfig {
            handover,
            handover_acked: acked,
            handover_sent: sent,
            ..Zeroable::zeroed()
        }
    }

    #[test]
    fn a_new_hand_over_is_adopted_once() {
        let mut p = SessionProgress::zeroed();
        let config = handed_over(FIRST_HANDOVER, 3, 4);
        assert!(p.adopt(&config));
        assert_eq!((p.handover, p.last_acked, p.last_sent), (1, 3, 4));
        p.last_sent = 9;
        assert!(
            !p.adopt(&config),
            "adopted already: the kernel's own progress stands"
        );
        assert_eq!(p.last_sent, 9);
    }

    #[test]
    fn a_hand_over_behind_the_kernel_never_moves_its_progress_back() {
        let mut p = SessionProgress {
            handover: 1,
            last_acked: 7,
            last_sent: 8,
            xdp_sent: 7,
            ..Zeroable::zeroed()
        };
        assert!(p.adopt(&handed_over(2, 5, 6)));
        assert_eq!(
            (p.handover, p.last_acked, p.last_sent, p.xdp_sent),
            (2, 7, 8, 7)
        );
        assert!(
            p.adopt(&handed_over(3, 9, 12)),
            "ahead of the kernel: taken"
        );
        assert_eq!((p.last_acked, p.last_sent), (9, 12));
    }

    #[test]
    fn hand_over_numbers_skip_zero_when_they_wrap() {
        assert_eq!(next_handover(FIRST_HANDOVER), 2);
        assert_eq!(next_handover(u32::MAX), FIRST_HANDOVER);
        assert_ne!(next_handover(0), 0);
    }

    #[test]
    fn every_fast_path_block_lies_inside_one_chunk() {
        let image = ImageEntry {
            first_chunk: 3,
            chunks: 8,
            len: 7 * CHUNK_SIZE,
            ready: 1,
        };
        for blksize in [512u32, 1024, 1428, 1432, 1456, 1468] {
            let mut offset = 0;
            while offset < image.len {
                let (chunk, at) = image.locate(offset);
                assert!(
                    (3..3 + 8).contains(&chunk),
                    "block at {offset} in chunk {chunk}"
                );
                assert!(
                    at + blksize <= CHUNK_SIZE,
                    "block of {blksize} at {offset} crosses its chunk"
                );
                offset += blksize;
            }
        }
    }
}
