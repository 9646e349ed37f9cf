//! Who boots what: the narrow seam between the protocol servers and the
//! operator's intent. DHCP, TFTP and HTTP ask the policy; they never read the
//! config themselves.

pub mod render;
pub mod r#static;

use std::fmt;

/// A MAC address as it appears in chaddr.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Accepts `aa:bb:cc:dd:ee:ff`, with `-` or no separators, any case.
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
            ));
        }
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Mac(mac))
    }
}

/// Client system architecture (DHCP option 93, RFC 4578 §2.1 and the IANA
/// registry), reduced to what selects a boot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// 0: x86 BIOS (legacy PXE ROMs, PXELINUX).
    Bios,
    /// 6: x86 UEFI, 32-bit.
    UefiIa32,
    /// 7 and 9: x64 UEFI (EDK2 sends 7; some firmware sends 9, EFI BC).
    UefiX64,
    /// 11: ARM64 UEFI.
    UefiArm64,
    /// 16: x64 UEFI HTTP Boot.
    UefiX64Http,
    /// 19: ARM64 UEFI HTTP Boot.
    UefiArm64Http,
    /// 41: Raspberry Pi (ARM64 boot ROM's own code).
    RaspberryPi,
    /// Anything else, with its code.
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Bios,
            6 => Self::UefiIa32,
            7 | 9 => Self::UefiX64,
            11 => Self::UefiArm64,
            16 => Self::UefiX64Http,
            19 => Self::UefiArm64Http,
            41 => Self::RaspberryPi,
            other => Self::Other(other),
        }
    }

    /// The name used in config, logs and iPXE script URLs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::UefiIa32 => "uefi-ia32",
            Self::UefiX64 => "uefi-x64",
            Self::UefiArm64 => "uefi-arm64",
            Self::UefiX64Http => "uefi-x64-http",
            Self::UefiArm64Http => "uefi-arm64-http",
            Self::RaspberryPi => "rpi",
            Self::Other(_) => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Bios,
            Self::UefiIa32,
            Self::UefiX64,
            Self::UefiArm64,
            Self::UefiX64Http,
            Self::UefiArm64Http,
            Self::RaspberryPi,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    /// True for the UEFI HTTP Boot architectures, which get a URL as boot file.
    pub fn is_http_boot(self) -> bool {
        matches!(self, Self::UefiX64Http | Self::UefiArm64Http)
    }
}

/// How a machine is answered regardless of how its boot client identifies
/// itself: for boot chains that would otherwise be misread (an iPXE build
/// that must be given a PXE NBP such as pxelinux.0, firmware with a bogus
/// vendor class).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// Firmware PXE: a boot file over TFTP.
    Pxe,
    /// iPXE: the script URL.
    Ipxe,
    /// UEFI HTTP Boot: a URL.
    HttpBoot,
}

impl ClientKind {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pxe" => Some(Self::Pxe),
            "ipxe" => Some(Self::Ipxe),
            "http" => Some(Self::HttpBoot),
            _ => None,
        }
    }
}

/// What the servers know about a machine when they ask the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub mac: Mac,
    pub arch: Arch,
    /// Client machine identifier (option 97), as text, when sent.
    pub uuid: Option<String>,
}

/// The policy's answer for one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSpec {
    /// Profile the machine boots with.
    pub profile: String,
    /// Network boot program for firmware PXE (a path in the boot root), by
    /// the machine's architecture; `None` for an architecture the profile
    /// has no file for.
    pub boot_file: Option<String>,
    /// The iPXE script this machine gets (already rendered).
    pub ipxe_script: String,
    /// Host name to hand out, if configured.
    pub hostname: Option<String>,
}

/// The iPXE script for a machine that must not netboot: boot from disk.
pub const LOCAL_BOOT_SCRIPT: &str =
    "#!ipxe\necho pxed: this machine boots from its local disk\nexit\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_in_common_spellings_and_prints_canonically() {
        for s in ["52:54:00:AB:cd:01", "52-54-00-ab-cd-01", "525400abcd01"] {
            assert_eq!(
                s.parse::<Mac>().unwrap().to_string(),
                "52:54:00:ab:cd:01",
                "{s}"
            );
        }
        for bad in [
            "52:54:00:ab:cd",
            "zz:54:00:ab:cd:01",
            "",
            "52:54:00:ab:cd:01:02",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn option_93_codes_map_to_architectures() {
        assert_eq!(Arch::from_code(0), Arch::Bios);
        assert_eq!(Arch::from_code(7), Arch::UefiX64);
        assert_eq!(Arch::from_code(9), Arch::UefiX64);
        assert_eq!(Arch::from_code(11), Arch::UefiArm64);
        assert_eq!(Arch::from_code(16), Arch::UefiX64Http);
        assert_eq!(Arch::from_code(41), Arch::RaspberryPi);
        assert_eq!(Arch::from_code(1234), Arch::Other(1234));
        for a in [
            Arch::Bios,
            Arch::UefiX64,
            Arch::UefiArm64,
            Arch::UefiX64Http,
        ] {
            assert_eq!(Arch::from_name(a.name()), Some(a));
        }
    }
}
