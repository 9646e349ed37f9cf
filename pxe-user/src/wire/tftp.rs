//! TFTP packets: RFC 1350, with the option extension of RFC 2347 (OACK) and
//! the options of RFC 2348 (blksize), 2349 (timeout, tsize) and 7440
//! (windowsize).
//!
//! [`Repr::parse`] accepts any byte slice and either returns a packet or a
//! [`WireError`]; it never panics. Option names are matched case-insensitively
//! (RFC 2347) and unknown options are kept, so the negotiation layer decides.

use std::fmt;

/// The largest block size any client may ask for (RFC 2348: 8 to 65464).
pub const MAX_BLKSIZE: u16 = 65464;
/// The smallest block size (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// RFC 1350's block size, used when the client asks for none.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Length of a DATA packet's header (opcode, block).
pub const DATA_HEADER_LEN: usize = 4;

mod opcode {
    pub const RRQ: u16 = 1;
    pub const WRQ: u16 = 2;
    pub const DATA: u16 = 3;
    pub const ACK: u16 = 4;
    pub const ERROR: u16 = 5;
    pub const OACK: u16 = 6;
}

/// Transfer mode of a request. Boot files are binary; `netascii` is accepted
/// on the wire and served as octets (no PXE client asks for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
    Mail,
}

/// Error codes of RFC 1350 §5 and RFC 2347.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionsRefused,
    Other(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            Self::NotDefined => 0,
            Self::FileNotFound => 1,
            Self::AccessViolation => 2,
            Self::DiskFull => 3,
            Self::IllegalOperation => 4,
            Self::UnknownTransferId => 5,
            Self::FileExists => 6,
            Self::NoSuchUser => 7,
            Self::OptionsRefused => 8,
            Self::Other(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::NotDefined,
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTransferId,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionsRefused,
            c => Self::Other(c),
        }
    }
}

/// One option of a request or OACK, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TftpOption<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

/// A parsed TFTP packet borrowing from the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repr<'a> {
    ReadRequest {
        filename: &'a str,
        mode: Mode,
        options: Vec<TftpOption<'a>>,
    },
    WriteRequest {
        filename: &'a str,
    },
    Data {
        block: u16,
        payload: &'a [u8],
    },
    Ack {
        block: u16,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    OptionAck {
        options: Vec<TftpOption<'a>>,
    },
}

/// Why a datagram is not a TFTP packet we can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than an opcode, or a fixed field is cut off.
    Truncated,
    /// An opcode RFC 1350/2347 does not define.
    UnknownOpcode(u16),
    /// A string field lacks its terminating NUL.
    Unterminated,
    /// A string field is not valid UTF-8 (TFTP strings are netascii).
    NotText,
    /// The mode is none of netascii, octet, mail.
    UnknownMode,
    /// An option name without a value.
    DanglingOption,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("packet is truncated"),
            Self::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            Self::Unterminated => f.write_str("a string field is not NUL-terminated"),
            Self::NotText => f.write_str("a string field is not text"),
            Self::UnknownMode => f.write_str("unknown transfer mode"),
            Self::DanglingOption => f.write_str("an option has no value"),
        }
    }
}

impl std::error::Error for WireError {}

impl<'a> Repr<'a> {
    /// Parses one datagram.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, WireError> {
        let (op, body) = split_u16(datagram)?;
        match op {
            opcode::RRQ => {
                let mut fields = Strings(body);
                let filename = fields.next_str()?;
                let mode = parse_mode(fields.next_str()?)?;
                let options = parse_options(&mut fields)?;
                Ok(Self::ReadRequest {
                    filename,
                    mode,
                    options,
                })
            }
            opcode::WRQ => {
                let mut fields = Strings(body);
                Ok(Self::WriteRequest {
                    filename: fields.next_str()?,
                })
            }
            opcode::DATA => {
                let (block, payload) = split_u16(body)?;
                Ok(Self::Data { block, payload })
            }
            opcode::ACK => {
                let (block, _) = split_u16(body)?;
                Ok(Self::Ack { block })
            }
            opcode::ERROR => {
                let (code, rest) = split_u16(body)?;
                // Some stacks omit the message's NUL; accept what is there.
                let message = match rest.iter().position(|&b| b == 0) {
                    Some(end) => &rest[..end],
                    None => rest,
                };
                let message = std::str::from_utf8(message).unwrap_or("(message is not text)");
                Ok(Self::Error {
                    code: ErrorCode::from_code(code),
                    message,
                })
            }
            opcode::OACK => {
                let mut fields = Strings(body);
                Ok(Self::OptionAck {
                    options: parse_options(&mut fields)?,
                })
            }
            other => Err(WireError::UnknownOpcode(other)),
        }
    }

    /// Bytes [`Repr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        2 + match self {
            Self::ReadRequest {
                filename,
                mode,
                options,
            } => filename.len() + 1 + mode_str(*mode).len() + 1 + options_len(options),
            Self::WriteRequest { filename } => filename.len() + 1 + "octet".len() + 1,
            Self::Data { payload, .. } => 2 + payload.len(),
            Self::Ack { .. } => 2,
            Self::Error { message, .. } => 2 + message.len() + 1,
            Self::OptionAck { options } => options_len(options),
        }
    }

    /// Writes the packet into `buf[..self.buffer_len()]` and returns that length.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Repr::buffer_len`]: a caller bug, not input.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let len = self.buffer_len();
        let mut w = Writer {
            buf: &mut buf[..len],
            at: 0,
        };
        match self {
            Self::ReadRequest {
                filename,
                mode,
                options,
            } => {
                w.u16(opcode::RRQ);
                w.cstr(filename);
                w.cstr(mode_str(*mode));
                w.options(options);
            }
            Self::WriteRequest { filename } => {
                w.u16(opcode::WRQ);
                w.cstr(filename);
                w.cstr("octet");
            }
            Self::Data { block, payload } => {
                w.u16(opcode::DATA);
                w.u16(*block);
                w.bytes(payload);
            }
            Self::Ack { block } => {
                w.u16(opcode::ACK);
                w.u16(*block);
            }
            Self::Error { code, message } => {
                w.u16(opcode::ERROR);
                w.u16(code.code());
                w.cstr(message);
            }
            Self::OptionAck { options } => {
                w.u16(opcode::OACK);
                w.options(options);
            }
        }
        debug_assert_eq!(w.at, len);
        len
    }

    /// The packet as a fresh vector (for tests and the slow path).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.buffer_len()];
        self.emit(&mut v);
        v
    }
}

/// Writes a DATA header for `block` into `buf[..4]`; the payload follows it.
/// The hot path uses this to copy file bytes straight after the header.
pub fn emit_data_header(block: u16, buf: &mut [u8]) {
    buf[..2].copy_from_slice(&opcode::DATA.to_be_bytes());
    buf[2..4].copy_from_slice(&block.to_be_bytes());
}

fn split_u16(b: &[u8]) -> Result<(u16, &[u8]), WireError> {
    match b {
        [hi, lo, rest @ ..] => Ok((u16::from_be_bytes([*hi, *lo]), rest)),
        _ => Err(WireError::Truncated),
    }
}

fn parse_mode(mode: &str) -> Result<Mode, WireError> {
    if mode.eq_ignore_ascii_case("octet") {
        Ok(Mode::Octet)
    } else if mode.eq_ignore_ascii_case("netascii") {
        Ok(Mode::Netascii)
    } else if mode.eq_ignore_ascii_case("mail") {
        Ok(Mode::Mail)
    } else {
        Err(WireError::UnknownMode)
    }
}

fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Octet => "octet",
        Mode::Netascii => "netascii",
        Mode::Mail => "mail",
    }
}

fn parse_options<'a>(fields: &mut Strings<'a>) -> Result<Vec<TftpOption<'a>>, WireError> {
    let mut options = Vec::new();
    while !fields.0.is_empty() {
        let name = fields.next_str()?;
        if name.is_empty() && fields.0.iter().all(|&b| b == 0) {
            break; // trailing NUL padding, seen from some PXE ROMs
        }
        let value = fields.next_str().map_err(|_| WireError::DanglingOption)?;
        options.push(TftpOption { name, value });
    }
    Ok(options)
}

fn options_len(options: &[TftpOption<'_>]) -> usize {
    options
        .iter()
        .map(|o| o.name.len() + 1 + o.value.len() + 1)
        .sum()
}

/// Successive NUL-terminated strings.
struct Strings<'a>(&'a [u8]);

impl<'a> Strings<'a> {
    fn next_str(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::Unterminated)?;
        let s = std::str::from_utf8(&self.0[..end]).map_err(|_| WireError::NotText)?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

struct Writer<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn cstr(&mut self, s: &str) {
        self.bytes(s.as_bytes());
        self.bytes(&[0]);
    }
    fn options(&mut self, options: &[TftpOption<'_>]) {
        for o in options {
            self.cstr(o.name);
            self.cstr(o.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt<'a>(name: &'a str, value: &'a str) -> TftpOption<'a> {
        TftpOption { name, value }
    }

    #[test]
    fn rrq_with_options_parses_as_uefi_sends_it() {
        let bytes =
            b"\x00\x01bootx64.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
        let want = Repr::ReadRequest {
            filename: "bootx64.efi",
            mode: Mode::Octet,
            options: vec![
                opt("tsize", "0"),
                opt("blksize", "1468"),
                opt("windowsize", "4"),
            ],
        };
        assert_eq!(Repr::parse(bytes), Ok(want.clone()));
        assert_eq!(
            want.to_vec(),
            bytes.to_vec(),
            "emit is the inverse of parse"
        );
    }

    #[test]
    fn mode_is_case_insensitive() {
        let got = Repr::parse(b"\x00\x01f\x00OCTET\x00").unwrap();
        assert_eq!(
            got,
            Repr::ReadRequest {
                filename: "f",
                mode: Mode::Octet,
                options: vec![]
            }
        );
    }

    #[test]
    fn trailing_nul_padding_after_options_is_ignored() {
        let got = Repr::parse(b"\x00\x01f\x00octet\x00blksize\x001432\x00\x00\x00").unwrap();
        assert_eq!(
            got,
            Repr::ReadRequest {
                filename: "f",
                mode: Mode::Octet,
                options: vec![opt("blksize", "1432")]
            }
        );
    }

    #[test]
    fn every_packet_kind_round_trips() {
        let packets = [
            Repr::WriteRequest { filename: "x" },
            Repr::Data {
                block: 65535,
                payload: b"hello",
            },
            Repr::Data {
                block: 0,
                payload: b"",
            },
            Repr::Ack { block: 7 },
            Repr::Error {
                code: ErrorCode::FileNotFound,
                message: "no such file",
            },
            Repr::OptionAck {
                options: vec![opt("blksize", "1468"), opt("tsize", "12345")],
            },
        ];
        for p in packets {
            let bytes = p.to_vec();
            assert_eq!(Repr::parse(&bytes), Ok(p.clone()), "{p:?}");
        }
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        let cases: &[(&[u8], WireError)] = &[
            (b"", WireError::Truncated),
            (b"\x00", WireError::Truncated),
            (b"\x00\x04\x01", WireError::Truncated),
            (b"\x00\x03\x00", WireError::Truncated),
            (b"\x00\x09abc", WireError::UnknownOpcode(9)),
            (b"\x00\x01file", WireError::Unterminated),
            (b"\x00\x01file\x00", WireError::Unterminated),
            (b"\x00\x01file\x00binary\x00", WireError::UnknownMode),
            (b"\x00\x01\xff\xfe\x00octet\x00", WireError::NotText),
            (
                b"\x00\x01f\x00octet\x00blksize\x00",
                WireError::DanglingOption,
            ),
            (
                b"\x00\x01f\x00octet\x00blksize\x001432",
                WireError::DanglingOption,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Repr::parse(bytes), Err(*want), "{bytes:02x?}");
        }
    }

    #[test]
    fn error_without_nul_keeps_its_message() {
        assert_eq!(
            Repr::parse(b"\x00\x05\x00\x08no tsize"),
            Ok(Repr::Error {
                code: ErrorCode::OptionsRefused,
                message: "no tsize"
            })
        );
    }

    #[test]
    fn parse_never_panics_on_noise() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..4000usize {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Favour small opcodes and NULs so the deep paths are reached.
                    match x % 4 {
                        0 => 0,
                        1 => 1 + (x >> 8) as u8 % 6,
                        _ => (x >> 16) as u8,
                    }
                })
                .collect();
            let _ = Repr::parse(&bytes);
        }
    }
}
