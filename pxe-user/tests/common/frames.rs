//! Builds Ethernet frames byte by byte for BPF_PROG_TEST_RUN fixtures, including
//! the malformed ones a parser must survive. Checksums are computed, so a
//! well-formed frame here is one a real stack would accept.

pub const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
pub const CLIENT_IP: [u8; 4] = [198, 18, 0, 2];
pub const SERVER_IP: [u8; 4] = [198, 18, 0, 1];

/// An Ethernet/IPv4 frame with a UDP (or other) payload, every field settable.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    /// 802.1Q/802.1ad tags, outermost first, as (TPID, VLAN id).
    pub tags: Vec<(u16, u16)>,
    pub ether_type: u16,
    pub version: u8,
    /// IPv4 options; padded with zeros to a multiple of four.
    pub ip_options: Vec<u8>,
    /// Overrides the IHL computed from the options.
    pub ihl_override: Option<u8>,
    /// Overrides the total length computed from the content.
    pub total_len_override: Option<u16>,
    /// Flags and fragment offset as on the wire (e.g. 0x2000 = more fragments).
    pub frag_off: u16,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl FrameSpec {
    /// A well-formed UDP datagram from the client to the server.
    pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Self {
        Self {
            tags: Vec::new(),
            ether_type: 0x0800,
            version: 4,
            ip_options: Vec::new(),
            ihl_override: None,
            total_len_override: None,
            frag_off: 0x4000, // don't fragment, as DHCP clients and TFTP stacks send
            proto: 17,
            src_port,
            dst_port,
            payload: payload.to_vec(),
        }
    }

    pub fn tagged(mut self, tpid: u16, vlan: u16) -> Self {
        self.tags.push((tpid, vlan));
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&SERVER_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        for (tpid, vlan) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vlan.to_be_bytes());
        }
        f.extend_from_slice(&self.ether_type.to_be_bytes());

        let mut options = self.ip_options.clone();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let ihl = self.ihl_override.unwrap_or((5 + options.len() / 4) as u8);
        let l4 = self.l4_bytes();
        let total_len = self
            .total_len_override
            .unwrap_or((20 + options.len() + l4.len()) as u16);

        let ip_start = f.len();
        f.push((self.version << 4) | (ihl & 0x0f));
        f.push(0);
        f.extend_from_slice(&total_len.to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag_off.to_be_bytes());
        f.push(64);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&CLIENT_IP);
        f.extend_from_slice(&SERVER_IP);
        f.extend_from_slice(&options);
        let check = internet_checksum(&f[ip_start..]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&check.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    fn l4_bytes(&self) -> Vec<u8> {
        if self.proto != 17 {
            return self.payload.clone();
        }
        let len = (8 + self.payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&self.src_port.to_be_bytes());
        udp.extend_from_slice(&self.dst_port.to_be_bytes());
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let check = pxe_common::csum::udp_checksum(CLIENT_IP, SERVER_IP, &udp);
        udp[6..8].copy_from_slice(&check.to_be_bytes());
        udp
    }
}

/// RFC 1071 checksum of `bytes` (0 when they carry their correct checksum).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    pxe_common::csum::checksum(&[bytes])
}

/// A BOOTP-sized DHCPDISCOVER from an unknown client: the kernel reads it
/// and, with no reply template for it, passes it on.
pub fn dhcp_payload() -> Vec<u8> {
    let mut p = vec![0u8; 300];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[28..34].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
    p[240..244].copy_from_slice(&[53, 1, 1, 255]); // DISCOVER, end
    p
}

/// A TFTP read request for `file` in octet mode.
pub fn tftp_rrq(file: &str) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(file.as_bytes());
    p.push(0);
    p.extend_from_slice(b"octet\0");
    p
}

/// A TFTP ACK for `block`.
pub fn tftp_ack(block: u16) -> Vec<u8> {
    let mut p = vec![0, 4];
    p.extend_from_slice(&block.to_be_bytes());
    p
}

/// A deterministic pseudo-random byte source (xorshift64*), for garbage frames.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
