//! The DHCP loop of one interface: receive, classify, ask the engine, send.
//! One engine (and so one lease database) serves every interface; each
//! request carries our address on the interface it arrived on.
//!
//! The loop runs on a thread of its own, blocking: a burst's commit waits
//! for the disk, and nothing else waits on it. Every hop between threads
//! costs a wake-up, and at a few thousand new machines a second wake-ups
//! were most of the CPU (docs/BENCHMARKS.md, DHCP for new machines).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use dhcproto::{v4::MessageType, Encodable, Encoder};
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags},
    sys::time::TimeSpec,
};
use tracing::{debug, error, info, warn};

use super::{
    classify::{classify, Request},
    engine::{Arrival, Destination, Engine, Outcome, Problem, StoreNews, PROXY_PORT},
    socket::{bind, send_waiting, Port67, DHCP_SERVER_PORT},
    templates::{self, Clocks, Interface},
};
use crate::{
    fastpath::{KernelAdmission, KernelAnswers},
    observe::Observer,
};

/// The DHCP sockets of one interface.
pub struct Listener {
    pub interface: String,
    /// Our address there: what replies say and where they come from.
    pub address: Ipv4Addr,
    /// Port 67.
    dhcp: Port67,
    /// Port 4011, boot server discovery.
    discovery: UdpSocket,
    /// Where the kernel answers repeat requests from our replies, if it does.
    kernel: Option<(Arc<KernelAnswers>, Interface)>,
    /// The kernel's admission limits and this interface's index, if on.
    admission: Option<(Arc<KernelAdmission>, u32)>,
    /// How long a burst that will write waits for more requests (see
    /// [`Listener::with_commit_linger`]).
    linger: Duration,
}

impl Listener {
    /// Opens ports 67 and 4011 on `interface`. `share_67` (proxy mode) lets
    /// port 67 be received beside a server that holds it exclusively.
    pub fn open(interface: &str, address: Ipv4Addr, share_67: bool) -> io::Result<Self> {
        let dhcp = Port67::open(interface, address, share_67)?;
        if dhcp.is_beside() {
            warn!(
                interface,
                "DHCP: another server holds port 67 here without SO_REUSEADDR; \
                 proxy mode receives DISCOVERs beside it through a raw socket"
            );
        }
        let discovery = bind(interface, PROXY_PORT)?;
        Ok(Self {
            interface: interface.to_owned(),
            address,
            dhcp,
            discovery,
            kernel: None,
            admission: None,
            linger: Duration::ZERO,
        })
    }

    /// A burst with a request that writes a lease waits up to `linger`
    /// for more before it is decided: one commit then covers more leases.
    /// A commit (an fsync, a database round trip) costs far more CPU than
    /// the wait; a client waits milliseconds more for its ACK.
    pub fn with_commit_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Tells the kernel's admission control which machines and relays pxed
    /// now knows (`ifindex`: this interface's).
    pub fn with_admission(mut self, admission: Arc<KernelAdmission>, ifindex: u32) -> Self {
        self.admission = Some((admission, ifindex));
        self
    }

    /// Hands each reply the engine marks repeatable to the kernel as a template.
    pub fn with_kernel_answers(
        mut self,
        answers: Arc<KernelAnswers>,
        interface: Interface,
    ) -> Self {
        self.kernel = Some((answers, interface));
        self
    }
}

/// A request with what its template needs: the datagram as received.
struct Received {
    request: Request,
    arrival: Arrival,
    datagram: Option<Vec<u8>>,
}

/// Requests decided together, their leases committed with one disk flush:
/// a boot storm's DISCOVERs and REQUESTs arrive by the thousand, and one
/// flush each would cap the server at the disk's flushes per second.
const MAX_BURST: usize = 256;

/// Serves one interface's DHCP (port 67) and boot server discovery (port
/// 4011) until the future is dropped.
pub async fn run(
    engine: Arc<Mutex<Engine>>,
    listener: Listener,
    observer: Arc<Observer>,
) -> io::Result<()> {
    // Dropping this future drops `_stop`, and the loop sees its peer close.
    let (_stop, stopped) = UnixStream::pair()?;
    let served = tokio::task::spawn_blocking(move || serve(&engine, listener, &observer, &stopped));
    served.await.map_err(io::Error::other)?
}

/// The loop of [`run`], until `stopped` is readable (its peer closed).
fn serve(
    engine: &Mutex<Engine>,
    listener: Listener,
    observer: &Observer,
    stopped: &UnixStream,
) -> io::Result<()> {
    let Listener {
        interface,
        address,
        dhcp,
        discovery,
        kernel,
        admission,
        linger,
    } = listener;
    let mut warned = Warnings::default();
    let mut buf = vec![0u8; 4096];
    let mut burst: Vec<Received> = Vec::with_capacity(MAX_BURST);
    loop {
        let ready = match wait([dhcp.as_fd(), discovery.as_fd(), stopped.as_fd()], None)? {
            None => continue,
            Some([_, _, true]) => return Ok(()),
            Some([on_67, on_4011, false]) => [on_67, on_4011],
        };
        for (port, readable) in [(DHCP_SERVER_PORT, ready[0]), (PROXY_PORT, ready[1])] {
            if !readable {
                continue;
            }
            burst.clear();
            let receive = |buf: &mut [u8]| {
                if port == PROXY_PORT {
                    discovery.recv_from(buf)
                } else {
                    dhcp.try_recv_from(buf)
                }
            };
            let mut deadline: Option<Instant> = None;
            // Take whatever is already waiting.
            while burst.len() < MAX_BURST {
                let (len, from) = match receive(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if port == PROXY_PORT || !lingers(&burst, linger) {
                            break;
                        }
                        // Nothing more is waiting, but this burst will
                        // commit: the next requests until the deadline share it.
                        let until = *deadline.get_or_insert_with(|| Instant::now() + linger);
                        let left = until.saturating_duration_since(Instant::now());
                        match wait([dhcp.as_fd(), stopped.as_fd()], Some(left))? {
                            Some([true, false]) => continue,
                            _ => break,
                        }
                    }
                    // An ICMP error for an earlier reply (a client whose port closed,
                    // a relay that went away) surfaces on a later receive. It is
                    // about that reply, not about this socket: never a reason to stop.
                    Err(e) if is_transient(&e) => {
                        debug!(
                            port,
                            "DHCP: receive reported an error for an earlier reply: {e}"
                        );
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let SocketAddr::V4(from) = from else { continue };
                match classify(&buf[..len]) {
                    Ok(request) => burst.push(Received {
                        request,
                        arrival: Arrival {
                            port,
                            source: from,
                            server_ip: address,
                        },
                        datagram: kernel.is_some().then(|| buf[..len].to_vec()),
                    }),
                    Err(why) => {
                        debug!(client = %from, port, %interface, "DHCP: ignored: {why}")
                    }
                }
            }
            if burst.is_empty() {
                continue;
            }
            let sockets = Sockets {
                dhcp: &dhcp,
                discovery: &discovery,
            };
            decide_and_answer(
                engine,
                &burst,
                port,
                sockets,
                &kernel,
                admission.as_ref(),
                observer,
                &interface,
                &mut warned,
            );
        }
    }
}

/// A port's sockets, to answer from.
#[derive(Clone, Copy)]
struct Sockets<'a> {
    dhcp: &'a Port67,
    discovery: &'a UdpSocket,
}

/// Decides a burst (its leases committed together) and answers each request.
#[expect(
    clippy::too_many_arguments,
    reason = "one burst's whole context; a struct would only rename the arguments"
)]
fn decide_and_answer(
    engine: &Mutex<Engine>,
    burst: &[Received],
    port: u16,
    sockets: Sockets<'_>,
    kernel: &Option<(Arc<KernelAnswers>, Interface)>,
    admission: Option<&(Arc<KernelAdmission>, u32)>,
    observer: &Observer,
    interface: &str,
    warned: &mut Warnings,
) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Read before deciding: a policy change after this point makes the
    // burst's templates stale, and the kernel refuses them.
    let decided_in = kernel.as_ref().map_or(0, |(answers, _)| answers.epoch());
    let started = Instant::now();
    let (outcomes, commit) = {
        let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        let outcomes = engine.handle_batch(burst.iter().map(|r| (&r.request, r.arrival)), now);
        log_store_news(engine.take_store_news());
        (outcomes, engine.take_commit())
    };
    observer.dhcp_burst(burst.len(), started.elapsed(), commit);
    for (received, outcome) in burst.iter().zip(outcomes) {
        observer.dhcp(port, &received.request, &outcome);
        if let Some((admission, ifindex)) = admission {
            tell_admission(admission, *ifindex, &received.request, &outcome);
        }
        let kernel = kernel.as_ref().map(|(answers, iface)| KernelSide {
            answers,
            iface,
            decided_in,
        });
        answer(received, outcome, port, sockets, interface, kernel, warned);
    }
}

/// A machine offered an address held for it, or granted a lease, is known
/// from now on: its next request is admitted whatever its interface's
/// budget. A relay answered through gets a budget of its own.
fn tell_admission(admission: &KernelAdmission, ifindex: u32, request: &Request, outcome: &Outcome) {
    let Some(reply) = &outcome.reply else {
        return;
    };
    let relay = request.message.giaddr();
    if !relay.is_unspecified() {
        admission.relay_answered(ifindex, relay);
    }
    let leased = !reply.message.yiaddr().is_unspecified();
    let kind = reply.message.opts().msg_type();
    let holds = match kind {
        Some(MessageType::Offer) => leased && !outcome.unheld_offer,
        Some(MessageType::Ack) => leased,
        _ => false,
    };
    if holds {
        admission.know(request.mac);
    }
}

/// Waits until one of `fds` can be read (or has closed) or `timeout` passes
/// (`None`: no limit), and says which can be read; `None` when the time
/// passed. A signal is no reason to return (the privilege drop signals
/// every thread).
fn wait<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
) -> io::Result<Option<[bool; N]>> {
    let until = timeout.map(|t| Instant::now() + t);
    let mut polled = fds.map(|fd| PollFd::new(fd, PollFlags::POLLIN));
    loop {
        let left =
            until.map(|u| TimeSpec::from_duration(u.saturating_duration_since(Instant::now())));
        match nix::poll::ppoll(&mut polled, left, None) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                return Ok(Some(
                    polled.map(|fd| fd.revents().is_some_and(|r| !r.is_empty())),
                ))
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where a burst's repeatable answers go, and the policy epoch they were
/// decided in.
struct KernelSide<'a> {
    answers: &'a KernelAnswers,
    iface: &'a Interface,
    decided_in: u64,
}

/// Logs what the engine decided for one request, sends its reply and
/// gives the kernel what it may answer next time.
fn answer(
    received: &Received,
    outcome: Outcome,
    port: u16,
    sockets: Sockets<'_>,
    interface: &str,
    kernel: Option<KernelSide<'_>>,
    warned: &mut Warnings,
) {
    let request = &received.request;
    if let (true, Some(k)) = (outcome.forget, &kernel) {
        k.answers.forget(request.mac.0);
    }
    match &outcome.problem {
        Some(Problem::PoolExhausted { subnet }) => warned.pool_exhausted(subnet),
        Some(Problem::Taken(e)) => {
            warn!(mac = %request.mac, "DHCP: not answered: {e}; the client's next request gets another address")
        }
        // Said once when the store started failing (log_store_news).
        Some(Problem::LeaseStore(e)) => {
            debug!(mac = %request.mac, "DHCP: not answered, the lease store is failing: {e}")
        }
        None => {}
    }
    let Some(reply) = outcome.reply else {
        if outcome.changed_lease {
            info!(mac = %request.mac, %interface, "DHCP: {}", outcome.summary);
        } else {
            debug!(mac = %request.mac, %interface, "DHCP: {}", outcome.summary);
        }
        return;
    };
    info!(mac = %request.mac, %interface, "DHCP: {}", outcome.summary);
    let mut bytes = Vec::with_capacity(576);
    if let Err(e) = reply.message.encode(&mut Encoder::new(&mut bytes)) {
        warn!(mac = %request.mac, "DHCP: could not encode the reply: {e}");
        return;
    }
    let to = match reply.to {
        Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
        Destination::Unicast(addr) => addr,
    };
    // The kernel learns the answer before it leaves (the lease is already
    // committed): a client that asks again at once, or retransmits, is
    // answered by the kernel rather than racing the template.
    if let (Some(answer), Some(k), Some(datagram)) = (outcome.kernel, kernel, &received.datagram) {
        match templates::template(datagram, &bytes, &answer, port, k.iface, Clocks::now()) {
            Some((key, entry)) => k.answers.install(key, entry, k.decided_in),
            None => {
                debug!(mac = %request.mac, "DHCP: this answer stays with userspace (the kernel cannot send it)")
            }
        }
    }
    let sent = if port == PROXY_PORT {
        send_waiting(sockets.discovery.as_fd(), || {
            sockets.discovery.send_to(&bytes, to)
        })
    } else {
        sockets.dhcp.send_to(&bytes, to)
    };
    if let Err(e) = sent {
        warn!(mac = %request.mac, %to, "DHCP: sending the reply failed: {e}");
    }
}

/// Says once that the lease store started failing, or recovered.
fn log_store_news(news: Option<StoreNews>) {
    match news {
        Some(StoreNews::Failing(e)) => error!(
            "DHCP: lease store failing, requests that need a write go unanswered until it recovers: {e} \
             (said once; /api/v1/health and pxed_lease_store_healthy follow it)"
        ),
        Some(StoreNews::Recovered(Ok(leases))) => {
            info!(leases, "DHCP: lease store writable again; memory read again from it")
        }
        Some(StoreNews::Recovered(Err(e))) => warn!(
            "DHCP: lease store writable again, but reading it back failed ({e}); memory kept"
        ),
        None => {}
    }
}

/// Whether a burst waits for more: lingering is on, and the burst has a
/// request that may write a lease (one for another server writes nothing).
fn lingers(burst: &[Received], linger: Duration) -> bool {
    !linger.is_zero()
        && burst.iter().any(|r| {
            let ours = r
                .request
                .server_id
                .is_none_or(|id| id == r.arrival.server_ip);
            ours && matches!(
                r.request.msg_type,
                MessageType::Request | MessageType::Release | MessageType::Decline
            )
        })
}

/// Errors a UDP socket reports on behalf of an earlier send.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EINTR
        )
    )
}

/// Says a pool is full once a minute, not once per DISCOVER.
#[derive(Default)]
struct Warnings {
    last: std::collections::HashMap<String, Instant>,
}

impl Warnings {
    fn pool_exhausted(&mut self, subnet: &str) {
        let now = Instant::now();
        let due = self
            .last
            .get(subnet)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
        if due {
            warn!(subnet, "DHCP: address pool exhausted; new clients get no offer (repeated at most once a minute)");
            self.last.insert(subnet.to_owned(), now);
        }
    }
}
