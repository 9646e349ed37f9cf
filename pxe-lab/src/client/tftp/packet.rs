//! The client's side of TFTP's packets (RFC 1350, 2347): the requests and
//! ACKs it sends, the replies it reads. pxe-lab cannot use pxe-user's codec
//! (pxe-user's tests depend on pxe-lab), and a client of its own is the
//! better test: a codec bug shared by both ends would pass unseen.

const RRQ: u16 = 1;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// What a server sends a reading client.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    Data {
        block: u16,
        payload: &'a [u8],
    },
    /// Option acknowledgement: the options granted, in order.
    OptionAck(Vec<(&'a str, &'a str)>),
    Error {
        code: u16,
        message: &'a str,
    },
}

impl<'a> Reply<'a> {
    /// `None` for anything a server does not send a reader, or cannot parse.
    pub fn parse(datagram: &'a [u8]) -> Option<Self> {
        let (opcode, body) = datagram.split_first_chunk::<2>()?;
        match u16::from_be_bytes(*opcode) {
            DATA => {
                let (block, payload) = body.split_first_chunk::<2>()?;
                Some(Self::Data {
                    block: u16::from_be_bytes(*block),
                    payload,
                })
            }
            OACK => {
                let strings = nul_terminated(body)?;
                let pairs = strings.chunks_exact(2);
                if !pairs.remainder().is_empty() {
                    return None; // a name without a value
                }
                Some(Self::OptionAck(pairs.map(|p| (p[0], p[1])).collect()))
            }
            ERROR => {
                let (code, text) = body.split_first_chunk::<2>()?;
                let message = match nul_terminated(text)?.as_slice() {
                    [message] => *message,
                    _ => return None,
                };
                Some(Self::Error {
                    code: u16::from_be_bytes(*code),
                    message,
                })
            }
            _ => None,
        }
    }
}

/// The NUL-terminated UTF-8 strings that make up `body` exactly.
fn nul_terminated(body: &[u8]) -> Option<Vec<&str>> {
    let text = body.strip_suffix(&[0])?;
    text.split(|b| *b == 0)
        .map(|s| std::str::from_utf8(s).ok())
        .collect()
}

/// A read request for `file` in octet mode with `options` (name, value).
pub fn read_request(file: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = RRQ.to_be_bytes().to_vec();
    for s in [file, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(n, v)| [*n, *v]))
    {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

pub fn ack(block: u16) -> Vec<u8> {
    let mut p = ACK.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p
}

/// An ERROR with code 0 ("not defined, see the message").
pub fn error(message: &str) -> Vec<u8> {
    let mut p = ERROR.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(message.as_bytes());
    p.push(0);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_request_is_opcode_then_nul_terminated_strings() {
        assert_eq!(
            read_request("ipxe.efi", &[("tsize", "0")]),
            b"\0\x01ipxe.efi\0octet\0tsize\x000\0"
        );
    }

    #[test]
    fn replies_parse_and_malformed_ones_do_not() {
        assert_eq!(
            Reply::parse(b"\0\x03\x01\x02abc"),
            Some(Reply::Data {
                block: 0x0102,
                payload: b"abc"
            })
        );
        assert_eq!(
            Reply::parse(b"\0\x06blksize\x001468\0windowsize\x004\0"),
            Some(Reply::OptionAck(vec![
                ("blksize", "1468"),
                ("windowsize", "4")
            ]))
        );
        assert_eq!(
            Reply::parse(b"\0\x05\0\x01not found\0"),
            Some(Reply::Error {
                code: 1,
                message: "not found"
            })
        );
        assert_eq!(
            Reply::parse(b"\0\x06blksize\0"),
            None,
            "a name without a value"
        );
        assert_eq!(Reply::parse(b"\0\x05\0\x01no nul"), None);
        assert_eq!(
            Reply::parse(&ack(1)),
            None,
            "servers do not send ACKs to readers"
        );
        assert_eq!(Reply::parse(b"\0"), None);
    }
}
