//! DHCP answered in the kernel: the layout of a client's reply template and
//! the request "shape" signature both sides compute.
//!
//! Userspace decides every answer first. Once it has answered a client
//! (durably, for a lease), it stores its own encoded reply as a template,
//! keyed by the client's MAC, the interface, the port and a signature of
//! the request options its answer depends on. The programs then answer the
//! next request of the same shape from the template, patching only what
//! comes from the request itself: xid, flags, ciaddr and the message type
//! (OFFER to a DISCOVER, ACK to a REQUEST). chaddr and giaddr are the
//! template's: the key holds the MAC, and a relay must match.
//!
//! The signature covers the options the daemon's answer is computed from:
//! the parameter request list (55: which configured options are sent), the
//! maximum message size (57: which fit), vendor class (60), client
//! identifier (61), user class (77), relay agent information (82: a class
//! may match its ids, and the reply echoes it), client architecture (93)
//! and machine identifier (97). Each is mixed in as its code and length,
//! then its value in little-endian 64-bit words, bytes past the option's
//! end zeroed. A request whose shape option is longer than
//! [`MAX_SHAPE_OPTION_LEN`] or repeated is never answered in the kernel.

use bytemuck::{Pod, Zeroable};

/// [`AnswerKey`] → [`AnswerEntry`]; written by the daemon after it answered a
/// client, read by both programs.
pub const DHCP_ANSWERS: &str = "DHCP_ANSWERS";
/// Templates the kernel holds at once (two shapes per machine for a rack
/// of 10,000 PXE-then-iPXE machines, with room to spare).
pub const DHCP_ANSWERS_CAPACITY: u32 = 65_536;

/// Longest reply template: the BOOTP message of a 576-byte datagram, the
/// size every client must accept (RFC 2131 §2).
pub const MAX_REPLY_LEN: usize = 548;
/// Longest value of a shape option the kernel mixes into the signature:
/// room for OVMF's option 55 (35 codes) and a relay's circuit and remote ids.
pub const MAX_SHAPE_OPTION_LEN: usize = 64;
/// Options (pad bytes included) the kernel walks before giving up.
pub const MAX_OPTION_ITEMS: u32 = 40;

// BOOTP (RFC 951, RFC 2131 §2) field offsets.
pub const BOOTP_OP: usize = 0;
pub const BOOTP_XID: usize = 4;
pub const BOOTP_FLAGS: usize = 10;
pub const BOOTP_CIADDR: usize = 12;
pub const BOOTP_GIADDR: usize = 24;
pub const BOOTP_CHADDR: usize = 28;
/// The fixed part up to and including chaddr: what a reply takes from its request.
pub const BOOTP_HEAD_LEN: usize = 44;
pub const BOOTP_MAGIC: usize = 236;
pub const BOOTP_OPTIONS: usize = 240;
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The broadcast bit of `flags` (RFC 2131 §2, figure 2).
pub const FLAG_BROADCAST: u16 = 0x8000;

pub const OPT_PAD: u8 = 0;
pub const OPT_END: u8 = 255;
pub const OPT_REQUESTED_IP: u8 = 50;
pub const OPT_OVERLOAD: u8 = 52;
pub const OPT_MESSAGE_TYPE: u8 = 53;
pub const OPT_SERVER_ID: u8 = 54;
pub const OPT_RELAY_AGENT: u8 = 82;

pub const DHCPDISCOVER: u8 = 1;
pub const DHCPOFFER: u8 = 2;
pub const DHCPREQUEST: u8 = 3;
pub const DHCPACK: u8 = 5;

/// The options an answer depends on, in the order of their bit in a
/// seen-mask (a repeat is refused).
pub const SHAPE_OPTIONS: [u8; 8] = [60, 61, 77, 93, 97, 55, 57, 82];

/// Bit of `code` in a seen-mask, if it is a shape option.
pub const fn shape_bit(code: u8) -> u32 {
    match code {
        60 => 1,
        61 => 2,
        77 => 4,
        93 => 8,
        97 => 16,
        55 => 32,
        57 => 64,
        82 => 128,
        _ => 0,
    }
}

/// Where the signature starts.
pub const SIGNATURE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Mixes one 64-bit word into a signature (a multiply-xorshift step: every
/// input bit reaches every output bit within a few words).
#[inline(always)]
pub const fn mix(h: u64, word: u64) -> u64 {
    let x = (h ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 29)
}

/// The word that opens a shape option in the signature.
#[inline(always)]
pub const fn option_word(code: u8, len: u8) -> u64 {
    ((code as u64) << 8) | len as u64
}

/// Keeps the first `valid` bytes (0..=8) of a little-endian word.
#[inline(always)]
pub const fn keep_bytes(word: u64, valid: u64) -> u64 {
    if valid >= 8 {
        word
    } else {
        word & ((1u64 << (valid * 8)) - 1)
    }
}

/// The bytes the option walk reads: a request's BOOTP message (userspace)
/// or the frame carrying it (the programs), bounds-checked by the reader.
pub trait RequestBytes {
    /// Offsets past this end the walk as if the options ended there. For
    /// the programs it is the bound the verifier needs on the cursor before
    /// a read (it cannot carry one from the variable end of the datagram).
    const MAX_OFFSET: usize;
    fn byte(&self, at: usize) -> Option<u8>;
    /// The four bytes at `at` (an address).
    fn four(&self, at: usize) -> Option<[u8; 4]>;
    /// The eight bytes at `at` as a little-endian word.
    fn word(&self, at: usize) -> Option<u64>;
}

impl RequestBytes for [u8] {
    const MAX_OFFSET: usize = usize::MAX;

    fn byte(&self, at: usize) -> Option<u8> {
        self.get(at).copied()
    }

    fn four(&self, at: usize) -> Option<[u8; 4]> {
        self.get(at..at.checked_add(4)?)?.try_into().ok()
    }

    fn word(&self, at: usize) -> Option<u64> {
        let bytes = self.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

/// What a request's options say, as far as an answer depends on them: the
/// shape signature, the message type, the requested address and the server
/// identifier. One walk ([`OptionWalk::walk`]) computes it on both sides,
/// so the daemon's template key and the kernel's lookup cannot drift apart.
///
/// The programs keep it in per-CPU scratch memory, and the walk reads and
/// writes its fields there for real (volatile): the verifier tracks stack
/// and register values exactly, and every combination of options seen
/// would be a state of the walk to explore again (past its
/// million-instruction budget).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionWalk {
    /// Of the shape options (see the module's documentation).
    pub signature: u64,
    /// Offset of the next option.
    cursor: u64,
    /// Bits of the shape options seen ([`shape_bit`]).
    seen: u32,
    /// Option 53's value; 0 if absent.
    pub msg_type: u8,
    /// Non-zero if option 50 was present.
    pub has_requested_ip: u8,
    /// Non-zero if option 54 was present.
    pub has_server_id: u8,
    _pad: u8,
    pub requested_ip: [u8; 4],
    pub server_id: [u8; 4],
}

impl OptionWalk {
    /// Walks the options in `[start, end)` of `bytes`; false for anything
    /// the kernel does not answer (see `PASS_DHCP_UNPARSED`): option
    /// overload, a malformed 50, 53 or 54, a
    /// repeated or long shape option, an option running past `end`, or more
    /// than [`MAX_OPTION_ITEMS`] items. `start` is at least 6 (options
    /// follow the BOOTP fixed part), which [`Self::mix_option`] relies on.
    #[inline(always)]
    pub fn walk<B: RequestBytes + ?Sized>(&mut self, bytes: &B, start: usize, end: usize) -> bool {
        set(&mut self.cursor, start as u64);
        set(&mut self.signature, SIGNATURE_SEED);
        set(&mut self.seen, 0);
        set(&mut self.msg_type, 0);
        set(&mut self.has_requested_ip, 0);
        set(&mut self.has_server_id, 0);
        for _ in 0..MAX_OPTION_ITEMS {
            // Read back from memory, the offset is the same unknown to the
            // verifier on every pass, so it checks the body once, not once
            // per combination of option lengths; the bound is what it needs.
            let at = get(&self.cursor) as usize;
            if at >= end || at > B::MAX_OFFSET {
                return true;
            }
            let Some(code) = bytes.byte(at) else {
                return false;
            };
            if code == OPT_END {
                return true;
            }
            if code == OPT_PAD {
                set(&mut self.cursor, (at + 1) as u64);
                continue;
            }
            let Some(len) = bytes.byte(at + 1) else {
                return false;
            };
            let len = len as usize;
            let data = at + 2;
            if data + len > end || !self.take_option(bytes, code, len, data) {
                return false;
            }
            set(&mut self.cursor, (data + len) as u64);
        }
        // More items than the kernel walks: userspace reads them.
        false
    }

    /// Takes in one option; false if the kernel must not answer its request.
    #[inline(always)]
    fn take_option<B: RequestBytes + ?Sized>(
        &mut self,
        bytes: &B,
        code: u8,
        len: usize,
        data: usize,
    ) -> bool {
        match code {
            OPT_OVERLOAD => false,
            OPT_MESSAGE_TYPE if len == 1 => bytes
                .byte(data)
                .map(|t| set(&mut self.msg_type, t))
                .is_some(),
            OPT_REQUESTED_IP if len == 4 => match bytes.four(data) {
                Some(ip) => {
                    set(&mut self.requested_ip, ip);
                    set(&mut self.has_requested_ip, 1);
                    true
                }
                None => false,
            },
            OPT_SERVER_ID if len == 4 => match bytes.four(data) {
                Some(ip) => {
                    set(&mut self.server_id, ip);
                    set(&mut self.has_server_id, 1);
                    true
                }
                None => false,
            },
            OPT_MESSAGE_TYPE | OPT_REQUESTED_IP | OPT_SERVER_ID => false,
            _ => {
                let bit = shape_bit(code);
                if bit == 0 {
                    return true;
                }
                let seen = get(&self.seen);
                if seen & bit != 0 || len > MAX_SHAPE_OPTION_LEN {
                    return false;
                }
                set(&mut self.seen, seen | bit);
                match Self::mix_option(bytes, get(&self.signature), code, len, data) {
                    Some(h) => {
                        set(&mut self.signature, h);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Mixes one shape option (≤ [`MAX_SHAPE_OPTION_LEN`] bytes at `data`) into the signature.
    /// Every read ends inside the option: a datagram may end right after it
    /// (with its END), so bytes past it may not exist. A last word shorter
    /// than eight bytes is read as the eight bytes ending with the option,
    /// shifted down: the same value as its bytes followed by zeros. (The
    /// option starts at least 8 bytes in, so those eight bytes exist.)
    #[inline(always)]
    fn mix_option<B: RequestBytes + ?Sized>(
        bytes: &B,
        mut h: u64,
        code: u8,
        len: usize,
        data: usize,
    ) -> Option<u64> {
        h = mix(h, option_word(code, len as u8));
        for i in 0..(MAX_SHAPE_OPTION_LEN / 8) {
            let from = i * 8;
            if from >= len {
                break;
            }
            let left = len - from;
            let word = if left >= 8 {
                bytes.word(data + from)?
            } else {
                bytes.word(data + len - 8)? >> ((8 - left) * 8)
            };
            h = mix(h, keep_bytes(word, left as u64));
        }
        Some(h)
    }
}

/// Stores into memory for real (LLVM would otherwise keep the value in a
/// register, where the verifier tracks it again; see [`OptionWalk`]).
#[inline(always)]
fn set<T>(field: &mut T, value: T) {
    // SAFETY: a valid, aligned, exclusively borrowed field.
    unsafe { core::ptr::write_volatile(field, value) }
}

#[inline(always)]
fn get<T: Copy>(field: &T) -> T {
    // SAFETY: as in `set`.
    unsafe { core::ptr::read_volatile(field) }
}

/// Which port a template answers on.
pub const PORT_KIND_DHCP: u8 = 0;
pub const PORT_KIND_PROXY: u8 = 1;

/// Key of `DHCP_ANSWERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AnswerKey {
    /// Of the request's shape options (see the module's documentation).
    pub signature: u64,
    /// The interface the request arrives on (its address is in the reply).
    pub ifindex: u32,
    /// chaddr's first six bytes.
    pub mac: [u8; 6],
    /// [`PORT_KIND_DHCP`] (67) or [`PORT_KIND_PROXY`] (4011).
    pub port_kind: u8,
    pub _pad: [u8; 5],
}

/// Value of `DHCP_ANSWERS`: the reply userspace sent, and when the kernel
/// may send it again. Times are `CLOCK_MONOTONIC` nanoseconds
/// (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AnswerEntry {
    /// A DISCOVER is answered (OFFER) until then; 0: never.
    pub offer_until_ns: u64,
    /// A REQUEST is answered (ACK) until then; 0: never. For a lease this is
    /// the durably stored expiry minus the lease time: no ACK the kernel sends
    /// promises more than the disk holds.
    pub ack_until_ns: u64,
    /// Replies the programs sent from this entry (a plain increment: may
    /// miss one under contention; a log figure, not an accounting one).
    pub answered: u64,
    /// Our interface's MAC: the source of broadcast replies.
    pub server_mac: [u8; 6],
    /// Offset in `reply` of option 53's value.
    pub msg_type_at: u16,
    /// Our address on the interface: source of the reply, server identifier.
    pub server_ip: [u8; 4],
    /// The leased address; zero for boot-only (proxy) answers, which name none.
    pub yiaddr: [u8; 4],
    /// The relay the answer was made for (its subnet); zero when not relayed.
    pub giaddr: [u8; 4],
    /// Bytes of `reply` in use (≤ [`MAX_REPLY_LEN`]).
    pub len: u32,
    /// Sum of `reply[..len]` as 16-bit words read in memory order
    /// (`u16::from_ne_bytes`, the order the programs sum in), not folded,
    /// with the patched fields (xid, flags, ciaddr, message type) zeroed:
    /// the programs add the request's values.
    pub sum: u32,
    /// Non-zero: XDP may send the reply itself (`XDP_TX` reaches the wire on
    /// this interface). Zero: XDP leaves it to TC.
    pub xdp_tx: u32,
    pub _pad: u32,
    pub reply: [u8; MAX_REPLY_LEN],
}

const _: () = assert!(core::mem::size_of::<AnswerKey>() == 24);
const _: () = assert!(core::mem::size_of::<AnswerEntry>() == 60 + MAX_REPLY_LEN);
const _: () = assert!(core::mem::size_of::<AnswerEntry>().is_multiple_of(8));
const _: () = assert!(BOOTP_HEAD_LEN == BOOTP_CHADDR + 16);

crate::impl_aya_pod!(AnswerKey, AnswerEntry);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_bytes_masks_what_lies_past_an_option() {
        let w = u64::from_le_bytes(*b"iPXE\xff\x00\x01\x02");
        assert_eq!(keep_bytes(w, 4), u64::from_le_bytes(*b"iPXE\0\0\0\0"));
        assert_eq!(keep_bytes(w, 8), w);
        assert_eq!(keep_bytes(w, 0), 0);
    }

    /// A BOOTP message whose options are `options`.
    fn message(options: &[u8]) -> [u8; 400] {
        let mut m = [0u8; 400];
        m[BOOTP_MAGIC..BOOTP_OPTIONS].copy_from_slice(&MAGIC_COOKIE);
        m[BOOTP_OPTIONS..BOOTP_OPTIONS + options.len()].copy_from_slice(options);
        m
    }

    fn walk(options: &[u8]) -> Option<OptionWalk> {
        let m = message(options);
        let mut w = OptionWalk::default();
        w.walk(&m[..], BOOTP_OPTIONS, BOOTP_OPTIONS + options.len())
            .then_some(w)
    }

    #[test]
    fn the_walk_reads_what_a_reply_is_decided_by() {
        let w = walk(&[53, 1, 3, 0, 50, 4, 10, 9, 0, 7, 54, 4, 10, 9, 0, 1, 255]).unwrap();
        assert_eq!(w.msg_type, DHCPREQUEST);
        assert_eq!((w.has_requested_ip, w.requested_ip), (1, [10, 9, 0, 7]));
        assert_eq!((w.has_server_id, w.server_id), (1, [10, 9, 0, 1]));
        assert_eq!(w.signature, SIGNATURE_SEED, "no shape option: the seed");
    }

    #[test]
    fn the_walk_mixes_shape_options_and_refuses_what_the_kernel_does_not_read() {
        let class = walk(&[
            53, 1, 1, 60, 9, b'P', b'X', b'E', b'C', b'l', b'i', b'e', b'n', b't',
        ]);
        assert_ne!(class.unwrap().signature, SIGNATURE_SEED);
        assert!(walk(&[53, 2, 1, 1]).is_none(), "a malformed message type");
        assert!(
            walk(&[60, 1, 1, 60, 1, 1]).is_none(),
            "a repeated shape option"
        );
        let relayed = walk(&[53, 1, 1, 82, 4, 1, 2, b'p', b'7']).unwrap();
        let other_port = walk(&[53, 1, 1, 82, 4, 1, 2, b'p', b'8']).unwrap();
        assert_ne!(relayed.signature, SIGNATURE_SEED, "82 is a shape option");
        assert_ne!(relayed.signature, other_port.signature);
        let request_list = |codes: u8| {
            let mut options = [0u8; 5 + 65];
            options[..5].copy_from_slice(&[53, 1, 1, 55, codes]);
            for (code, slot) in (1..=codes).zip(&mut options[5..]) {
                *slot = code;
            }
            walk(&options[..5 + usize::from(codes)])
        };
        assert!(request_list(64).is_some(), "a 64-code request list");
        assert!(
            request_list(65).is_none(),
            "longer than the kernel mixes in"
        );
        assert!(walk(&[52, 1, 3]).is_none(), "option overload");
        assert!(walk(&[60, 9, 1]).is_none(), "an option past the end");
        assert!(walk(&[0; 41]).is_none(), "more items than the kernel walks");
    }

    #[test]
    fn every_shape_option_has_its_own_bit() {
        let mut mask = 0;
        for code in SHAPE_OPTIONS {
            let bit = shape_bit(code);
            assert!(bit != 0 && mask & bit == 0, "option {code}");
            mask |= bit;
        }
        assert_eq!(shape_bit(53), 0);
    }
}
