//! What the engine did with a request: the reply and where it goes, a
//! sentence for the machine's log, what the kernel may repeat, and the
//! counters of all of it.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{Message, MessageType};

use super::classify::{Firmware, Request};
use crate::lease::LeaseError;

/// Port of boot server discovery (PXE 2.1).
pub const PROXY_PORT: u16 = 4011;

/// What the kernel may answer again on its own after this reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelAnswer {
    /// Boot information without an address (proxyDHCP, port 4011): the
    /// same request shape gets the same answer while the config stands.
    Boot,
    /// A lease on disk until `stored_until` (Unix seconds): OFFER it until
    /// then, ACK it while a renewal of `lease_time` still ends before then.
    Lease {
        ip: Ipv4Addr,
        stored_until: u64,
        lease_time: u32,
    },
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 out of the serving interface.
    Broadcast,
    Unicast(SocketAddrV4),
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub message: Message,
    pub to: Destination,
}

/// What the engine did with one request.
#[derive(Debug)]
pub struct Outcome {
    pub reply: Option<Reply>,
    /// One line for the log: what was asked and what was answered.
    pub summary: String,
    /// Set when the request could not be served for a reason an operator
    /// must hear about (a full pool, a failing lease disk).
    pub problem: Option<Problem>,
    /// The request changed a lease without a reply (RELEASE, DECLINE): worth
    /// a line in the log like any answer.
    pub changed_lease: bool,
    /// The reply may be answered by the kernel the next time (set only
    /// when `EngineConfig::kernel_answers` is on).
    pub kernel: Option<KernelAnswer>,
    /// What the kernel answers this client must be forgotten (a NAK, a
    /// RELEASE or a DECLINE changed what it would be told).
    pub forget: bool,
    /// The request wrote to the lease store: its reply may leave only once
    /// the write is committed.
    pub(super) wrote: bool,
    /// An OFFER whose address was not held: offers to unknown machines
    /// already held as much of the pool as they may.
    pub unheld_offer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    PoolExhausted {
        subnet: String,
    },
    LeaseStore(String),
    /// Another server holds the address in the shared database: the client
    /// asks again and gets another one.
    Taken(String),
}

impl Outcome {
    /// No reply.
    pub fn silent(summary: String) -> Self {
        Self {
            reply: None,
            summary,
            problem: None,
            changed_lease: false,
            kernel: None,
            forget: false,
            wrote: false,
            unheld_offer: false,
        }
    }

    /// A lease changed, with no reply (RELEASE, DECLINE).
    pub fn changed(summary: String) -> Self {
        Self {
            changed_lease: true,
            ..Self::silent(summary)
        }
    }

    pub fn answered(summary: String, message: Message, to: Destination) -> Self {
        Self {
            reply: Some(Reply { message, to }),
            ..Self::silent(summary)
        }
    }

    /// The request could not be served: an operator must hear why.
    pub fn problem(summary: String, problem: Problem) -> Self {
        Self {
            problem: Some(problem),
            ..Self::silent(summary)
        }
    }

    /// Not answered because the lease could not be written.
    pub fn store_failed(req: &Request, e: &LeaseError) -> Self {
        Self::problem(
            format!(
                "{} from {}: not answered, the lease could not be stored: {e}",
                name(req.msg_type),
                req.mac
            ),
            Problem::LeaseStore(e.to_string()),
        )
    }

    /// What the kernel would answer this client must go.
    pub fn forgetting(self) -> Self {
        Self {
            forget: true,
            ..self
        }
    }

    /// The reply depended on a lease the store failed to commit: withdrawn.
    pub fn withdraw(&mut self, e: &LeaseError) {
        self.reply = None;
        self.kernel = None;
        self.summary = format!(
            "{}; not answered, the lease could not be stored: {e}",
            self.summary
        );
        self.problem = Some(match e {
            LeaseError::Taken { .. } => Problem::Taken(e.to_string()),
            _ => Problem::LeaseStore(e.to_string()),
        });
    }

    fn msg_type(&self) -> Option<MessageType> {
        self.reply.as_ref()?.message.opts().msg_type()
    }
}

/// Counters of what the engine answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub proxy_replies: u64,
    pub ignored: u64,
    pub pool_exhausted: u64,
    pub store_failures: u64,
}

impl EngineStats {
    /// Counts one outcome; `leases`: the reply was full DHCP on 67 (an
    /// OFFER or ACK of an address), not boot information only.
    pub fn count(&mut self, outcome: &Outcome, leases: bool) {
        match outcome.msg_type() {
            None if outcome.reply.is_none() => self.ignored += 1,
            Some(MessageType::Offer) if leases => self.offers += 1,
            Some(MessageType::Ack) if leases => self.acks += 1,
            Some(MessageType::Nak) => self.naks += 1,
            _ => self.proxy_replies += 1,
        }
        match &outcome.problem {
            Some(Problem::PoolExhausted { .. }) => self.pool_exhausted += 1,
            Some(Problem::LeaseStore(_)) => self.store_failures += 1,
            Some(Problem::Taken(_)) => {}
            None => {}
        }
    }
}

/// The firmware and architecture, for the log.
pub fn describe(req: &Request) -> String {
    let firmware = match req.firmware {
        Firmware::NotPxe => return "no PXE".to_owned(),
        Firmware::Pxe => "PXE",
        Firmware::Ipxe => "iPXE",
        Firmware::HttpBoot => "HTTP Boot",
    };
    format!("{firmware}, {}", req.arch.name())
}

/// A message type as the log spells it: `DISCOVER`.
pub fn name(t: MessageType) -> String {
    format!("{t:?}").to_uppercase()
}
