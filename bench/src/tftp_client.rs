//! The client side of one TFTP download as firmware runs it, sans-IO: bytes
//! from the server and timeouts in, what to send out. Both of the harness's
//! I/O paths drive it: a socket per transfer (`tftp::download`) and one
//! packet socket for every transfer (`tftp_packet`).
//!
//! Lockstep (RFC 1350) or windowed (RFC 7440): an ACK after each window or
//! the last block; on a gap or a timeout, an ACK of the last block received
//! in order, so the server resumes right after it. Every byte is compared
//! with the expected file when one is given.

use pxe_user::wire::tftp::{ErrorCode, Mode, Repr, TftpOption};

/// Timeouts without an answer before the transfer is abandoned.
const MAX_RETRANSMITS: u64 = 50;

/// What the I/O side must do after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send; keep waiting.
    Wait,
    /// Send these bytes to the server's transfer port.
    Send(Vec<u8>),
    /// The file arrived whole (and matched, if checked).
    Done { retransmits: u64, bytes: u64 },
    /// The transfer failed; `Some` carries an ERROR to send first, so the
    /// server stops sending to this port (firmware does the same).
    Fail { why: String, error: Option<Vec<u8>> },
}

pub struct Download<'e> {
    file: String,
    expected: Option<&'e [u8]>,
    block_size: usize,
    window: u16,
    received: usize,
    expected_block: u16,
    in_window: u16,
    retransmits: u64,
    /// A DATA block arrived in order yet (before that, the request or ACK 0 is resent).
    received_any: bool,
    last_sent: Vec<u8>,
}

impl<'e> Download<'e> {
    /// A download of `file` asking for `blksize` (0: none) and `windowsize`
    /// (1: none), and the read request to send to port 69.
    pub fn start(
        file: &str,
        blksize: u16,
        windowsize: u16,
        expected: Option<&'e [u8]>,
    ) -> (Self, Vec<u8>) {
        let blk = blksize.to_string();
        let win = windowsize.to_string();
        let mut options = vec![TftpOption {
            name: "tsize",
            value: "0",
        }];
        if blksize != 0 {
            options.push(TftpOption {
                name: "blksize",
                value: &blk,
            });
        }
        if windowsize > 1 {
            options.push(TftpOption {
                name: "windowsize",
                value: &win,
            });
        }
        let request = Repr::ReadRequest {
            filename: file,
            mode: Mode::Octet,
            options,
        }
        .to_vec();
        let download = Self {
            file: file.to_owned(),
            expected,
            block_size: 512,
            window: 1,
            received: 0,
            expected_block: 1,
            in_window: 0,
            retransmits: 0,
            received_any: false,
            last_sent: request.clone(),
        };
        (download, request)
    }

    /// Whether `datagram` can be the server's first reply, the one whose
    /// source port becomes the transfer's (TID): an OACK, DATA block 1 or an
    /// ERROR. Anything else is a stray, e.g. the retransmitted last blocks of
    /// an earlier transfer that used the same local port, and must not
    /// capture the transfer.
    pub fn is_first_reply(datagram: &[u8]) -> bool {
        matches!(
            Repr::parse(datagram),
            Ok(Repr::OptionAck { .. } | Repr::Data { block: 1, .. } | Repr::Error { .. })
        )
    }

    /// A datagram from the server's transfer port.
    pub fn on_datagram(&mut self, datagram: &[u8]) -> Step {
        match Repr::parse(datagram) {
            Ok(Repr::OptionAck { options }) => {
                for o in &options {
                    let parsed = match o.name {
                        "blksize" => o.value.parse().map(|v| self.block_size = v).is_ok(),
                        "windowsize" => o.value.parse().map(|v| self.window = v).is_ok(),
                        _ => true,
                    };
                    if !parsed {
                        return self.fail(format!("bad {} in OACK: {:?}", o.name, o.value));
                    }
                }
                self.send(Repr::Ack { block: 0 }.to_vec())
            }
            Ok(Repr::Data { block, payload }) => self.on_data(block, payload),
            Ok(Repr::Error { code, message }) => Step::Fail {
                why: format!("{}: server error {}: {message}", self.file, code.code()),
                error: None,
            },
            Ok(_) | Err(_) => Step::Wait,
        }
    }

    fn on_data(&mut self, block: u16, payload: &[u8]) -> Step {
        if block != self.expected_block {
            // A gap, or a block again (our ACK was lost): acknowledge the last
            // block received in order (RFC 7440 §4; RFC 1350 for lockstep).
            self.in_window = 0;
            if self.received_any {
                return self.send(
                    Repr::Ack {
                        block: self.expected_block.wrapping_sub(1),
                    }
                    .to_vec(),
                );
            }
            return Step::Send(self.last_sent.clone());
        }
        self.received_any = true;
        let end = self.received + payload.len();
        if let Some(expected) = self.expected {
            if end > expected.len() || expected[self.received..end] != *payload {
                return self.fail(format!(
                    "bytes {}..{end} differ from the expected file",
                    self.received
                ));
            }
        }
        self.received = end;
        self.expected_block = self.expected_block.wrapping_add(1);
        self.in_window += 1;
        let last = payload.len() < self.block_size;
        if last {
            if let Some(expected) = self.expected.filter(|e| e.len() != self.received) {
                return self.fail(format!(
                    "ended at {} of {} bytes",
                    self.received,
                    expected.len()
                ));
            }
            // The final ACK goes out; nothing more will come.
            self.last_sent = Repr::Ack { block }.to_vec();
            return Step::Done {
                retransmits: self.retransmits,
                bytes: self.received as u64,
            };
        }
        if self.in_window >= self.window {
            self.in_window = 0;
            return self.send(Repr::Ack { block }.to_vec());
        }
        Step::Wait
    }

    /// The final ACK, to send when `Done` is returned.
    pub fn final_ack(&self) -> &[u8] {
        &self.last_sent
    }

    /// No datagram within the timeout.
    pub fn on_timeout(&mut self) -> Step {
        self.retransmits += 1;
        if self.retransmits > MAX_RETRANSMITS {
            return self.fail(format!("no answer after {MAX_RETRANSMITS} retries"));
        }
        // RFC 7440 §4: on a timeout, acknowledge the last block received in order.
        if self.received_any {
            self.last_sent = Repr::Ack {
                block: self.expected_block.wrapping_sub(1),
            }
            .to_vec();
            self.in_window = 0;
        }
        Step::Send(self.last_sent.clone())
    }

    /// Gives up (the run's time limit): the ERROR to send, and why.
    pub fn abandon(&mut self, why: &str) -> Step {
        self.fail(why.to_owned())
    }

    fn send(&mut self, bytes: Vec<u8>) -> Step {
        self.last_sent = bytes.clone();
        Step::Send(bytes)
    }

    fn fail(&self, why: String) -> Step {
        let error = Repr::Error {
            code: ErrorCode::NotDefined,
            message: &why,
        }
        .to_vec();
        Step::Fail {
            why: format!("{}: {why} (at {} bytes)", self.file, self.received),
            error: Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        Repr::Data { block, payload }.to_vec()
    }

    fn ack(block: u16) -> Step {
        Step::Send(Repr::Ack { block }.to_vec())
    }

    #[test]
    fn a_windowed_download_acks_each_window_and_the_last_block() {
        let file: Vec<u8> = (0..2600u32).map(|i| i as u8).collect();
        let (mut d, rrq) = Download::start("f", 512, 2, Some(&file));
        assert!(matches!(Repr::parse(&rrq), Ok(Repr::ReadRequest { .. })));
        let oack = Repr::OptionAck {
            options: vec![
                TftpOption {
                    name: "blksize",
                    value: "512",
                },
                TftpOption {
                    name: "windowsize",
                    value: "2",
                },
            ],
        }
        .to_vec();
        assert_eq!(d.on_datagram(&oack), ack(0));
        assert_eq!(d.on_datagram(&data(1, &file[..512])), Step::Wait);
        assert_eq!(d.on_datagram(&data(2, &file[512..1024])), ack(2));
        // Block 4 before 3: a gap, acknowledged at the last block in order.
        assert_eq!(d.on_datagram(&data(4, &file[1536..2048])), ack(2));
        assert_eq!(d.on_datagram(&data(3, &file[1024..1536])), Step::Wait);
        assert_eq!(
            d.on_timeout(),
            ack(3),
            "a timeout acknowledges the last block in order"
        );
        assert_eq!(d.on_datagram(&data(4, &file[1536..2048])), Step::Wait);
        assert_eq!(d.on_datagram(&data(5, &file[2048..2560])), ack(5));
        assert_eq!(
            d.on_datagram(&data(6, &file[2560..])),
            Step::Done {
                retransmits: 1,
                bytes: 2600
            }
        );
        assert_eq!(d.final_ack(), Repr::Ack { block: 6 }.to_vec());
    }

    #[test]
    fn a_corrupted_block_fails_the_download_and_tells_the_server() {
        let file = vec![7u8; 1000];
        let (mut d, _) = Download::start("f", 0, 1, Some(&file));
        let mut bad = file[..512].to_vec();
        bad[100] ^= 1;
        match d.on_datagram(&data(1, &bad)) {
            Step::Fail {
                why,
                error: Some(error),
            } => {
                assert!(why.contains("differ"), "{why}");
                assert!(matches!(Repr::parse(&error), Ok(Repr::Error { .. })));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_an_oack_data_1_or_error_can_open_the_transfer() {
        let oack = Repr::OptionAck {
            options: vec![TftpOption {
                name: "blksize",
                value: "512",
            }],
        }
        .to_vec();
        assert!(Download::is_first_reply(&oack));
        assert!(Download::is_first_reply(&data(1, b"x")));
        assert!(Download::is_first_reply(
            &Repr::Error {
                code: ErrorCode::FileNotFound,
                message: "no"
            }
            .to_vec()
        ));
        assert!(!Download::is_first_reply(&data(
            2857,
            b"the end of an earlier transfer"
        )));
        assert!(!Download::is_first_reply(b"\x00"));
    }

    #[test]
    fn silence_ends_in_failure_after_the_retries() {
        let (mut d, rrq) = Download::start("f", 1468, 4, None);
        for _ in 0..MAX_RETRANSMITS {
            assert_eq!(d.on_timeout(), Step::Send(rrq.clone()), "the request again");
        }
        assert!(matches!(d.on_timeout(), Step::Fail { .. }));
    }
}
