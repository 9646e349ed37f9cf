//! Option negotiation for a read request (RFC 2347, 2348, 2349, 7440): which
//! options we accept, with what values, and what the OACK says.

use crate::wire::tftp::{TftpOption, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};

/// What the server is willing to agree to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest block size offered: a DATA packet must fit the path MTU
    /// (1468 = 1500 − 20 IPv4 − 8 UDP − 4 TFTP). Larger requests are lowered
    /// to this, as RFC 2348 allows.
    pub max_blksize: u16,
    /// Largest window (RFC 7440) granted; larger requests are lowered.
    pub max_windowsize: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_blksize: 1468,
            max_windowsize: 64,
        }
    }
}

/// The agreed parameters of one transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Seconds the client asked us to wait before retransmitting (RFC 2349).
    pub timeout_secs: Option<u8>,
    /// Options to confirm in an OACK, in the client's order; empty means no
    /// OACK: the transfer starts with DATA block 1, as RFC 1350 has it.
    pub oack: Vec<(&'static str, String)>,
}

/// A request whose options we refuse (answered with ERROR 8, RFC 2347).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// Agrees on the options of a read request for a file of `file_len` bytes.
/// Unknown options are ignored (left out of the OACK); an option with an
/// impossible value refuses the request. The first occurrence of a repeated
/// option counts.
pub fn negotiate(
    options: &[TftpOption<'_>],
    file_len: u64,
    limits: &Limits,
) -> Result<Negotiated, Refused> {
    let mut agreed = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout_secs: None,
        oack: Vec::new(),
    };
    let mut seen: Vec<&'static str> = Vec::new();
    for option in options {
        let Some(name) = known_name(option.name) else {
            continue;
        };
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let value = option.value.trim();
        match name {
            "blksize" => {
                let asked = number(name, value)?;
                if asked < u64::from(MIN_BLKSIZE) {
                    return Err(Refused(format!("blksize {asked} is below {MIN_BLKSIZE}")));
                }
                let granted = asked
                    .min(u64::from(MAX_BLKSIZE))
                    .min(u64::from(limits.max_blksize)) as u16;
                agreed.blksize = granted;
                agreed.oack.push((name, granted.to_string()));
            }
            "windowsize" => {
                let asked = number(name, value)?;
                if asked == 0 || asked > 65535 {
                    return Err(Refused(format!("windowsize {asked} is outside 1..65535")));
                }
                let granted = (asked as u16).min(limits.max_windowsize.max(1));
                agreed.windowsize = granted;
                agreed.oack.push((name, granted.to_string()));
            }
            "timeout" => {
                let asked = number(name, value)?;
                if !(1..=255).contains(&asked) {
                    return Err(Refused(format!(
                        "timeout {asked} is outside 1..255 seconds"
                    )));
                }
                agreed.timeout_secs = Some(asked as u8);
                agreed.oack.push((name, asked.to_string()));
            }
            "tsize" => {
                // In a read request the client sends 0 and we answer with the size (RFC 2349).
                number(name, value)?;
                agreed.oack.push((name, file_len.to_string()));
            }
            _ => unreachable!("known_name returns only the names matched above"),
        }
    }
    Ok(agreed)
}

fn known_name(name: &str) -> Option<&'static str> {
    ["blksize", "windowsize", "timeout", "tsize"]
        .into_iter()
        .find(|known| known.eq_ignore_ascii_case(name))
}

fn number(name: &str, value: &str) -> Result<u64, Refused> {
    value
        .parse()
        .map_err(|_| Refused(format!("{name} value {value:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<TftpOption<'a>> {
        pairs
            .iter()
            .map(|(name, value)| TftpOption { name, value })
            .collect()
    }

    fn oack(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|(n, v)| (*n, v.to_string())).collect()
    }

    #[test]
    fn uefi_request_is_granted_as_asked() {
        let got = negotiate(
            &opts(&[("tsize", "0"), ("blksize", "1468"), ("windowsize", "4")]),
            9000,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(got.blksize, 1468);
        assert_eq!(got.windowsize, 4);
        assert_eq!(
            got.oack,
            oack(&[("tsize", "9000"), ("blksize", "1468"), ("windowsize", "4")])
        );
    }

    #[test]
    fn blksize_above_the_limit_is_lowered_not_refused() {
        let got = negotiate(&opts(&[("BLKSIZE", "65464")]), 1, &Limits::default()).unwrap();
        assert_eq!(got.blksize, 1468);
        assert_eq!(got.oack, oack(&[("blksize", "1468")]));
        let got = negotiate(
            &opts(&[("blksize", "99999")]),
            1,
            &Limits {
                max_blksize: 65464,
                max_windowsize: 1,
            },
        )
        .unwrap();
        assert_eq!(got.blksize, 65464);
    }

    #[test]
    fn no_options_means_no_oack_and_rfc1350_defaults() {
        let got = negotiate(&[], 5, &Limits::default()).unwrap();
        assert_eq!((got.blksize, got.windowsize, got.oack.len()), (512, 1, 0));
    }

    #[test]
    fn unknown_options_are_ignored() {
        let got = negotiate(
            &opts(&[("multicast", ""), ("rollover", "0")]),
            5,
            &Limits::default(),
        )
        .unwrap();
        assert!(got.oack.is_empty());
    }

    #[test]
    fn absurd_values_are_refused() {
        for (name, value) in [
            ("blksize", "7"),
            ("blksize", "0"),
            ("blksize", "lots"),
            ("windowsize", "0"),
            ("windowsize", "70000"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("tsize", "-1"),
        ] {
            assert!(
                negotiate(&opts(&[(name, value)]), 5, &Limits::default()).is_err(),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn the_first_of_repeated_options_counts() {
        let got = negotiate(
            &opts(&[("blksize", "1024"), ("blksize", "8")]),
            5,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(got.blksize, 1024);
        assert_eq!(got.oack, oack(&[("blksize", "1024")]));
    }
}
