//! The Internet checksum (RFC 1071): the one definition for the daemon's raw
//! sockets, the BPF programs, the tests and the bench.
//!
//! It lives here, not in pxe-user, because the BPF programs fold their sums
//! with [`fold`] too. They do not call [`checksum`]: they add the words of
//! header fields one by one (a fixed number of loads the verifier can bound,
//! in native byte order, straight from packet memory), while [`checksum`]
//! walks byte slices, which only userspace has.

/// Folds a ones' complement sum to 16 bits and complements it. Four folds
/// reduce any sum of a frame's words; the loop bound is a constant, so the
/// verifier accepts it.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ones' complement sum of `a - b` for two folded sums: adding the
/// complement subtracts (RFC 1624). The sum of bytes `[x, y)` of a chunk
/// is `difference(sums[y], sums[x])` for running sums at even offsets.
#[inline(always)]
pub fn difference(a: u32, b: u32) -> u32 {
    (a & 0xffff) + u32::from(!(b as u16))
}

/// Fills `sums` with the running sums of `chunk` (see
/// `maps::ChunkSums`): `sums[k]` covers `chunk[..k * grain]`, anything past
/// `chunk`'s end counted as zero. `grain` must be even.
pub fn running_sums(chunk: &[u8], grain: usize, sums: &mut [u32]) {
    let mut sum: u64 = 0;
    for (k, slot) in sums.iter_mut().enumerate() {
        *slot = u32::from(!fold(sum));
        let from = (k * grain).min(chunk.len());
        let to = ((k + 1) * grain).min(chunk.len());
        for w in chunk[from..to].chunks(2) {
            sum += u64::from(u16::from_ne_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
        }
    }
}

/// The checksum of the concatenated `parts`, as big-endian 16-bit words. Every
/// part but the last must have an even length; an odd last byte is padded
/// with zero. A header or datagram that carries its correct checksum sums to 0.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    fold(sum)
}

/// The IPv4 pseudo-header that a UDP checksum covers before the datagram.
pub fn udp_pseudo_header(src: [u8; 4], dst: [u8; 4], udp_len: u16) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = 17; // IPPROTO_UDP
    pseudo[10..].copy_from_slice(&udp_len.to_be_bytes());
    pseudo
}

/// The checksum to write into the UDP header of `udp` (whose checksum field
/// is zero) sent from `src` to `dst`. A computed zero is sent as all ones:
/// zero on the wire means "no checksum" (RFC 768).
pub fn udp_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
    let pseudo = udp_pseudo_header(src, dst, udp.len() as u16);
    match checksum(&[&pseudo, udp]) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ones' complement sum of `bytes` as native-order words, folded.
    fn native_sum(bytes: &[u8]) -> u64 {
        bytes
            .chunks(2)
            .map(|w| u64::from(u16::from_ne_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
            .sum()
    }

    #[test]
    fn a_block_sums_from_two_running_sums_and_its_ends_as_from_its_bytes() {
        // Bytes that carry often, a file that ends inside the last grain.
        let mut chunk = [0u8; 10_001];
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let grain = 64;
        let mut sums = [0u32; 10_001 / 64 + 2];
        running_sums(&chunk, grain, &mut sums);
        let blocks: [(usize, usize); 6] = [
            (0, 1468),
            (4, 1468),
            (60, 512),
            (1468 * 3, 1468),
            (8_532, 1468),
            (64, 128),
        ];
        for (at, len) in blocks {
            let end = at + len;
            let (first, last) = (at.div_ceil(grain), end / grain);
            // What the programs do: the ends summed, the middle from the sums.
            let ends =
                native_sum(&chunk[at..first * grain]) + native_sum(&chunk[last * grain..end]);
            let fast = ends + u64::from(difference(sums[last], sums[first]));
            let slow = native_sum(&chunk[at..end]);
            assert_eq!(fold(fast), fold(slow), "block at {at}, {len} bytes");
            let wire = checksum(&[&chunk[at..end]]);
            assert_eq!(
                fold(fast),
                u16::from_ne_bytes(wire.to_be_bytes()),
                "as the wire sums it"
            );
        }
    }

    #[test]
    fn the_rfc_1071_example_sums_as_the_rfc_says() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&bytes]), !0xddf2);
        assert_eq!(
            checksum(&[&bytes[..2], &bytes[2..]]),
            !0xddf2,
            "parts are one stream"
        );
    }

    #[test]
    fn an_odd_last_byte_is_padded_with_zero() {
        assert_eq!(
            checksum(&[&[0x12, 0x34, 0x56]]),
            checksum(&[&[0x12, 0x34, 0x56, 0]])
        );
    }

    #[test]
    fn a_udp_datagram_with_its_checksum_sums_to_zero() {
        let (src, dst) = ([198, 18, 0, 1], [198, 18, 0, 2]);
        let mut udp = [0, 67, 0, 68, 0, 11, 0, 0, b'a', b'b', b'c'];
        let c = udp_checksum(src, dst, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        let pseudo = udp_pseudo_header(src, dst, udp.len() as u16);
        assert_eq!(checksum(&[&pseudo, &udp]), 0);
    }
}
