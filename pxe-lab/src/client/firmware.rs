//! How the firmware the project boots behaves as a client: what it says in
//! DHCP, when it resends, and what it asks of TFTP. The figures are those of
//! the firmware's sources and of captures, as the bench and the tests have
//! always simulated them.

use std::time::Duration;

use super::dhcp::{self, Identity, Schedule};

/// A boot firmware, or a boot program that does its own networking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI PXE (EDK2's network stack): arch 7, blksize 1468, windowsize 4.
    Edk2,
    /// iPXE, as a second stage or a ROM: says "iPXE" in option 77, retries
    /// fast, TFTP lockstep with blksize 1432.
    Ipxe,
    /// PXELINUX (syslinux) on a BIOS PXE stack: it reuses the ROM's lease, and
    /// fetches its files lockstep with blksize 1408 (its 1440-byte packets).
    Pxelinux,
    /// A legacy BIOS PXE ROM: arch 0, blksize 1432, lockstep.
    LegacyRom,
}

/// What a firmware asks of a TFTP server and how long it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TftpProfile {
    /// RFC 2348 blksize asked for (0: none, 512-byte blocks).
    pub blksize: u16,
    /// RFC 7440 windowsize asked for (1: none, lockstep).
    pub windowsize: u16,
    /// Whether the request asks for the size (RFC 2349 tsize 0).
    pub tsize: bool,
    /// How long it waits for the next block before it acknowledges again.
    pub timeout: Duration,
    /// Timeouts in a row (no block in between) it takes before it gives
    /// the transfer up and the boot fails.
    pub retries: u64,
}

/// EDK2 and PXE ROMs resend a DISCOVER or REQUEST nobody answered after 4, 8,
/// 16 and 32 s, then give up.
const ROM_RETRIES: [u64; 4] = [4, 8, 16, 32];
/// How many NAKs in a row a simulated machine takes before it gives up (RFC
/// 2131 says start over; EDK2 itself ends its DHCP after its retries).
const MAX_NAKS: u32 = 8;

impl Firmware {
    /// Options 60 and 93 as the firmware sends them.
    fn pxe_class(self) -> (&'static [u8], u16) {
        match self {
            Self::Edk2 | Self::Ipxe => (b"PXEClient:Arch:00007:UNDI:003016", 7),
            Self::Pxelinux | Self::LegacyRom => (b"PXEClient:Arch:00000:UNDI:002001", 0),
        }
    }

    /// The DHCP identity of a machine with this firmware: PXE options 60, 93,
    /// 94, 97 and 55, and for iPXE option 77 (iPXE as a UEFI program; iPXE
    /// chained from a BIOS ROM keeps the ROM's identity: [`Identity::as_ipxe`]).
    pub fn identity(self, mac: [u8; 6], uuid: [u8; 16]) -> Identity {
        let (vendor_class, arch) = self.pxe_class();
        let identity = Identity {
            vendor_class: Some(vendor_class.to_vec()),
            arch: Some(arch),
            network_interface: Some((1, 2, 1)),
            uuid: Some(uuid),
            parameter_request_list: dhcp::pxe_parameter_request_list(),
            ..Identity::plain(mac)
        };
        match self {
            Self::Ipxe => identity.as_ipxe(),
            _ => identity,
        }
    }

    /// When the firmware resends in DHCP. PXELINUX asks nothing itself: it
    /// has the ROM's schedule.
    pub fn dhcp_schedule(self) -> Schedule {
        let (retries, offer_wait): (&[u64], u64) = match self {
            Self::Edk2 | Self::Pxelinux | Self::LegacyRom => (&ROM_RETRIES, 500),
            Self::Ipxe => (&[1, 2, 4, 8, 16], 200),
        };
        Schedule {
            retries: retries.iter().map(|s| Duration::from_secs(*s)).collect(),
            offer_wait: Duration::from_millis(offer_wait),
            max_naks: MAX_NAKS,
        }
    }

    pub fn tftp(self) -> TftpProfile {
        // EDK2 retries a stalled transfer 6 times (PXEBC_MTFTP_RETRIES);
        // the others are given the transfer-wide limit only.
        let (blksize, windowsize, timeout, retries) = match self {
            Self::Edk2 => (1468, 4, 4, 6),
            Self::Ipxe => (1432, 1, 1, super::tftp::MAX_RETRANSMITS),
            Self::Pxelinux => (1408, 1, 1, super::tftp::MAX_RETRANSMITS),
            Self::LegacyRom => (1432, 1, 4, 6),
        };
        TftpProfile {
            blksize,
            windowsize,
            tsize: true,
            timeout: Duration::from_secs(timeout),
            retries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tftp::Download;

    #[test]
    fn each_firmware_asks_tftp_for_its_own_block_and_window() {
        let request = |firmware: Firmware| {
            let (_, rrq) = Download::start("f", &firmware.tftp(), None);
            String::from_utf8(rrq[2..].to_vec())
                .unwrap()
                .replace('\0', " ")
        };
        assert_eq!(
            request(Firmware::Edk2),
            "f octet tsize 0 blksize 1468 windowsize 4 "
        );
        assert_eq!(request(Firmware::Ipxe), "f octet tsize 0 blksize 1432 ");
        assert_eq!(request(Firmware::Pxelinux), "f octet tsize 0 blksize 1408 ");
        assert_eq!(
            request(Firmware::LegacyRom),
            "f octet tsize 0 blksize 1432 "
        );
    }

    #[test]
    fn ipxe_retries_fast_and_says_who_it_is() {
        let rom = Firmware::LegacyRom.dhcp_schedule();
        let ipxe = Firmware::Ipxe.dhcp_schedule();
        assert_eq!(rom.retries.iter().map(Duration::as_secs).sum::<u64>(), 60);
        assert!(ipxe.retries[0] < rom.retries[0]);
        let identity = Firmware::Ipxe.identity([2; 6], [0; 16]);
        assert_eq!(identity.user_class.as_deref(), Some(dhcp::IPXE_USER_CLASS));
        assert_eq!(Firmware::LegacyRom.identity([2; 6], [0; 16]).arch, Some(0));
    }
}
