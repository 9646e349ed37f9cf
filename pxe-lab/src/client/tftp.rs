//! The client side of one TFTP download as firmware runs it, sans-IO: bytes
//! from the server and timeouts in, what to send out. bench drives it on a
//! socket per transfer and on one packet socket for every transfer; the
//! tests on blocking sockets, also through a simulated bad wire.
//!
//! Lockstep (RFC 1350) or windowed (RFC 7440): an ACK after each window or
//! the last block; on a gap or a timeout, an ACK of the last block received
//! in order, so the server resumes right after it. Every byte is compared
//! with the expected file when one is given, and kept when asked.

pub mod packet;

use packet::Reply;

use super::TftpProfile;

/// Timeouts in a transfer before it is abandoned, unless
/// [`Download::giving_up_after`] says otherwise.
pub const MAX_RETRANSMITS: u64 = 50;

/// What the I/O side must do after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send; keep waiting.
    Wait,
    /// Send these bytes to the server's transfer port.
    Send(Vec<u8>),
    /// The file arrived whole (and matched, if checked). The final ACK is
    /// [`Download::final_ack`].
    Done { retransmits: u64, bytes: u64 },
    /// The transfer failed; `Some` carries an ERROR to send first, so the
    /// server stops sending to this port (firmware does the same).
    Fail { why: String, error: Option<Vec<u8>> },
}

/// What a download saw on the way, for tests that count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The options the server granted, in its order.
    pub oack: Vec<(String, String)>,
    /// DATA packets received, out-of-order ones and repeats included.
    pub data_packets: u64,
    /// DATA packets that were not the block expected next.
    pub out_of_order: u64,
}

pub struct Download<'e> {
    file: String,
    expected: Option<&'e [u8]>,
    /// The bytes received, when the caller asked to keep them.
    kept: Option<Vec<u8>>,
    block_size: usize,
    window: u16,
    received: usize,
    expected_block: u16,
    in_window: u16,
    retransmits: u64,
    max_retransmits: u64,
    /// Timeouts since the last block arrived in order, and how many in a
    /// row the firmware takes before it gives the boot up.
    silent: u64,
    max_silent: u64,
    /// A DATA block arrived in order yet (before that, the request or ACK 0 is resent).
    received_any: bool,
    last_sent: Vec<u8>,
    seen: Seen,
}

impl<'e> Download<'e> {
    /// A download of `file` asking what `ask` says (its blksize, windowsize
    /// and tsize), and the read request to send to port 69.
    pub fn start(file: &str, ask: &TftpProfile, expected: Option<&'e [u8]>) -> (Self, Vec<u8>) {
        let options = requested_options(ask);
        let options: Vec<(&str, &str)> = options.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let request = packet::read_request(file, &options);
        let download = Self {
            file: file.to_owned(),
            expected,
            kept: None,
            block_size: 512,
            window: 1,
            received: 0,
            expected_block: 1,
            in_window: 0,
            retransmits: 0,
            max_retransmits: MAX_RETRANSMITS,
            silent: 0,
            max_silent: ask.retries,
            received_any: false,
            last_sent: request.clone(),
            seen: Seen::default(),
        };
        (download, request)
    }

    /// Gives up after `timeouts` timeouts instead of [`MAX_RETRANSMITS`]: for
    /// a wire that loses packets on purpose, where the caller decides what a
    /// stall is.
    pub fn giving_up_after(mut self, timeouts: u64) -> Self {
        self.max_retransmits = timeouts;
        self
    }

    /// Keeps every byte received in order, for [`Download::into_data`].
    pub fn keeping_data(mut self) -> Self {
        self.kept = Some(Vec::new());
        self
    }

    /// The bytes kept so far (empty unless [`Download::keeping_data`]).
    pub fn into_data(self) -> Vec<u8> {
        self.kept.unwrap_or_default()
    }

    pub fn seen(&self) -> &Seen {
        &self.seen
    }

    /// Whether `datagram` can be the server's first reply, the one whose
    /// source port becomes the transfer's (TID): an OACK, DATA block 1 or an
    /// ERROR. Anything else is a stray, e.g. the retransmitted last blocks of
    /// an earlier transfer that used the same local port, and must not
    /// capture the transfer.
    pub fn is_first_reply(datagram: &[u8]) -> bool {
        matches!(
            Reply::parse(datagram),
            Some(Reply::OptionAck(_) | Reply::Data { block: 1, .. } | Reply::Error { .. })
        )
    }

    /// A datagram from the server's transfer port.
    pub fn on_datagram(&mut self, datagram: &[u8]) -> Step {
        match Reply::parse(datagram) {
            Some(Reply::OptionAck(options)) => self.on_oack(&options),
            Some(Reply::Data { block, payload }) => {
                self.seen.data_packets += 1;
                self.on_data(block, payload)
            }
            Some(Reply::Error { code, message }) => Step::Fail {
                why: format!("{}: server error {code}: {message}", self.file),
                error: None,
            },
            None => Step::Wait,
        }
    }

    fn on_oack(&mut self, options: &[(&str, &str)]) -> Step {
        for (name, value) in options {
            let parsed = match *name {
                "blksize" => value.parse().map(|v| self.block_size = v).is_ok(),
                "windowsize" => value.parse().map(|v| self.window = v).is_ok(),
                _ => true,
            };
            if !parsed {
                return self.fail(format!("bad {name} in OACK: {value:?}"));
            }
        }
        self.seen.oack = options
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self.send(packet::ack(0))
    }

    fn on_data(&mut self, block: u16, payload: &[u8]) -> Step {
        if block != self.expected_block {
            // A gap, or a block again (our ACK was lost): acknowledge the last
            // block received in order (RFC 7440 §4; RFC 1350 for lockstep).
            self.seen.out_of_order += 1;
            self.in_window = 0;
            if self.received_any {
                return self.send(packet::ack(self.expected_block.wrapping_sub(1)));
            }
            return Step::Send(self.last_sent.clone());
        }
        self.received_any = true;
        self.silent = 0;
        let end = self.received + payload.len();
        if let Some(expected) = self.expected {
            if end > expected.len() || expected[self.received..end] != *payload {
                return self.fail(format!(
                    "bytes {}..{end} differ from the expected file",
                    self.received
                ));
            }
        }
        if let Some(kept) = &mut self.kept {
            kept.extend_from_slice(payload);
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
            self.last_sent = packet::ack(block);
            return Step::Done {
                retransmits: self.retransmits,
                bytes: self.received as u64,
            };
        }
        if self.in_window >= self.window {
            self.in_window = 0;
            return self.send(packet::ack(block));
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
        self.silent += 1;
        if self.retransmits > self.max_retransmits {
            let max = self.max_retransmits;
            return self.fail(format!("no answer after {max} retries"));
        }
        if self.silent > self.max_silent {
            let max = self.max_silent;
            return self.fail(format!("the server went silent: {max} retries in a row"));
        }
        // RFC 7440 §4: on a timeout, acknowledge the last block received in order.
        if self.received_any {
            self.last_sent = packet::ack(self.expected_block.wrapping_sub(1));
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
        Step::Fail {
            why: format!("{}: {why} (at {} bytes)", self.file, self.received),
            error: Some(packet::error(&why)),
        }
    }
}

/// The options of the read request: tsize first (firmware asks the size
/// before it allocates), then blksize and windowsize when they are not the
/// protocol's defaults.
fn requested_options(ask: &TftpProfile) -> Vec<(&'static str, String)> {
    let mut options = Vec::new();
    if ask.tsize {
        options.push(("tsize", "0".to_owned()));
    }
    if ask.blksize != 0 {
        options.push(("blksize", ask.blksize.to_string()));
    }
    if ask.windowsize > 1 {
        options.push(("windowsize", ask.windowsize.to_string()));
    }
    options
}

#[cfg(test)]
mod tests;
