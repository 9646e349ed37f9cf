//! The TFTP driver: a listener on port 69 and one task per transfer, each on a
//! fresh server port (its transfer ID, RFC 1350 §4), or with `single_port`
//! on port 69 too: a socket connected to the client, beside the listener
//! (SO_REUSEPORT), gets that client's packets, as the kernel delivers a
//! datagram to the socket connected to its sender before an unconnected one.
//! The tasks only move bytes between sockets and the sans-IO [`Transfer`];
//! every decision is made there or in [`negotiate`].

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::{
    negotiate::{negotiate, Limits, Negotiated},
    transfer::{KernelProgress, Outcome, Outgoing, TimerConfig, Transfer},
};
use crate::{
    bootroot::{BootFile, BootRoot, OpenError},
    observe::{Observer, TftpEnd, TftpFile},
    policy::FileGate,
    wire::tftp::{emit_data_header, ErrorCode, Mode, Repr, TftpOption, DATA_HEADER_LEN},
};

/// Everything the TFTP service can be tuned by.
#[derive(Clone, Copy, Debug)]
pub struct TftpConfig {
    pub limits: Limits,
    pub timer: TimerConfig,
    /// Transfers running at once; requests beyond it are dropped (the client
    /// retries) rather than answered with an error that ends its boot.
    pub max_transfers: usize,
    /// Transfers one client address may run at once: a machine needs one,
    /// a load generator sharing an address needs more.
    pub max_transfers_per_client: usize,
    /// Send a window of DATA with one UDP GSO system call (falls back to one
    /// send per packet where the kernel refuses).
    pub gso: bool,
    /// Answer every transfer from the request port (firewalls, NAT).
    pub single_port: bool,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            timer: TimerConfig::default(),
            max_transfers: 16_384,
            max_transfers_per_client: 128,
            gso: true,
            single_port: false,
        }
    }
}

/// The seam to the kernel fast path: told when a transfer opens and closes
/// its server port, offered each transfer once its DATA flows, and asked how
/// far the kernel got.
pub trait TransferHooks: Send + Sync + 'static {
    fn opened(&self, _server_port: u16) {}
    fn closed(&self, _server_port: u16) {}
    /// Hands the transfer's ACK→DATA loop to the kernel tiers; true if taken.
    fn offload(&self, _transfer: &Offload<'_>) -> bool {
        false
    }
    /// How far the kernel tiers got with an offloaded transfer.
    fn kernel_progress(&self, _transfer: &Offload<'_>) -> Option<KernelProgress> {
        None
    }
    /// Takes an offloaded transfer back (it ended, one way or another).
    fn end_offload(&self, _transfer: &Offload<'_>) {}
}

/// A transfer as the kernel tiers would serve it.
pub struct Offload<'a> {
    pub client: SocketAddr,
    pub server_port: u16,
    pub file: &'a Arc<BootFile>,
    pub blksize: u16,
    /// RFC 7440 windowsize (1: lockstep).
    pub windowsize: u16,
    pub blocks: u64,
    /// Highest block the client acknowledged to userspace.
    pub acked: u64,
    /// Highest block userspace has sent.
    pub last_sent: u64,
}

/// Hooks that do nothing: userspace serves everything.
pub struct NoHooks;
impl TransferHooks for NoHooks {}

/// A running transfer as the listener knows it: enough to recognise a
/// retransmitted request.
struct Active {
    request: Vec<u8>,
}

pub struct TftpServer {
    listener: UdpSocket,
    local_ip: IpAddr,
    root: Arc<BootRoot>,
    config: TftpConfig,
    hooks: Arc<dyn TransferHooks>,
    active: Arc<Mutex<HashMap<SocketAddr, Active>>>,
    gate: Option<Arc<dyn FileGate>>,
    observer: Arc<Observer>,
}

impl TftpServer {
    /// Binds the listener. `addr` must be a concrete address: each transfer
    /// answers from it, so clients see replies from the address they asked.
    pub async fn bind(
        addr: SocketAddr,
        root: Arc<BootRoot>,
        config: TftpConfig,
        hooks: Arc<dyn TransferHooks>,
    ) -> io::Result<Self> {
        let listener = bind_udp(addr, config.single_port, None)
            .map_err(|e| io::Error::new(e.kind(), format!("binding TFTP to {addr}: {e}")))?;
        if config.single_port {
            // Port 69 the kernel tiers know; another one (a test's) is
            // registered once, for the life of the server.
            if addr.port() != 69 {
                hooks.opened(addr.port());
            }
        }
        // A boot storm sends thousands of RRQs at once; don't drop them at the door.
        crate::netif::grow_receive_buffer(&listener, 16 << 20);
        Ok(Self {
            local_ip: addr.ip(),
            listener,
            root,
            config,
            hooks,
            active: Arc::new(Mutex::new(HashMap::new())),
            gate: None,
            observer: Arc::new(Observer::off()),
        })
    }

    /// Reports every transfer and refusal to `observer`.
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Refuses files to the machines `gate` says boot from their disk.
    pub fn with_gate(mut self, gate: Arc<dyn FileGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests until the future is dropped; transfers already running
    /// finish on their own tasks.
    pub async fn run(self) -> io::Result<()> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (len, peer) = match self.listener.recv_from(&mut buf).await {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here; they are not ours to stop on.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => return Err(e),
            };
            self.handle_request(&buf[..len], peer).await;
        }
    }

    async fn handle_request(&self, datagram: &[u8], peer: SocketAddr) {
        let packet = match Repr::parse(datagram) {
            Ok(p) => p,
            Err(e) => {
                debug!(client = %peer, "TFTP: ignoring malformed request: {e}");
                if let crate::wire::tftp::WireError::UnknownOpcode(op) = e {
                    self.refuse(
                        peer,
                        ErrorCode::IllegalOperation,
                        &format!("unknown opcode {op}"),
                    )
                    .await;
                }
                return;
            }
        };
        match packet {
            // RFC 1350 calls mail mode obsolete; it names a recipient, not a
            // file, and a read-only boot server has nothing to send for it.
            Repr::ReadRequest {
                filename,
                mode: Mode::Mail,
                ..
            } => {
                info!(client = %peer, file = filename, "TFTP: read request in mail mode refused (obsolete, RFC 1350)");
                self.refuse(
                    peer,
                    ErrorCode::IllegalOperation,
                    "mail mode is obsolete (RFC 1350); ask in octet mode",
                )
                .await;
            }
            Repr::ReadRequest {
                filename, options, ..
            } => self.start_read(datagram, peer, filename, &options).await,
            Repr::WriteRequest { filename } => {
                info!(client = %peer, file = filename, "TFTP: write request refused (read-only server)");
                self.refuse(
                    peer,
                    ErrorCode::IllegalOperation,
                    "this server is read-only",
                )
                .await;
            }
            Repr::Ack { .. } | Repr::Error { .. } if self.config.single_port => {
                // A late packet of a transfer that has ended (its socket is
                // gone): on one port it arrives here, and needs no answer.
                debug!(client = %peer, "TFTP: {packet:?} after its transfer ended");
            }
            other => {
                debug!(client = %peer, "TFTP: {other:?} sent to the request port");
                self.refuse(
                    peer,
                    ErrorCode::IllegalOperation,
                    "only read requests go to port 69",
                )
                .await;
            }
        }
    }

    async fn start_read(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        filename: &str,
        options: &[TftpOption<'_>],
    ) {
        {
            let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if active.get(&peer).is_some_and(|a| a.request == datagram) {
                // The client resent its request because our first packet was
                // lost; the running transfer's timer resends it.
                debug!(client = %peer, file = filename, "TFTP: duplicate request ignored");
                return;
            }
            if active.len() >= self.config.max_transfers {
                warn!(client = %peer, limit = self.config.max_transfers, "TFTP: transfer limit reached; request dropped, the client will retry");
                return;
            }
            let from_client = active.keys().filter(|a| a.ip() == peer.ip()).count();
            if from_client >= self.config.max_transfers_per_client {
                warn!(client = %peer, limit = self.config.max_transfers_per_client, "TFTP: per-client transfer limit reached; request dropped");
                return;
            }
        }
        if let (Some(gate), IpAddr::V4(client)) = (&self.gate, peer.ip()) {
            if let Some(mac) = gate.refuses(client) {
                info!(client = %peer, %mac, file = filename, "TFTP: refused: the machine is marked not to netboot");
                self.refused(
                    peer,
                    filename,
                    "refused: the machine is marked not to netboot",
                );
                return self
                    .refuse(
                        peer,
                        ErrorCode::AccessViolation,
                        "this machine boots from its disk",
                    )
                    .await;
            }
        }
        let file = match self.open_for_tftp(filename).await {
            Ok(f) => f,
            Err(OpenError::NotFound) => {
                info!(client = %peer, file = filename, "TFTP: file not found");
                self.refused(peer, filename, "file not found");
                return self
                    .refuse(peer, ErrorCode::FileNotFound, "file not found")
                    .await;
            }
            Err(OpenError::Denied(why)) => {
                warn!(client = %peer, file = filename, "TFTP: access refused: {why}");
                self.refused(peer, filename, &format!("access refused: {why}"));
                return self.refuse(peer, ErrorCode::AccessViolation, why).await;
            }
            Err(OpenError::Io(e)) => {
                warn!(client = %peer, file = filename, "TFTP: reading failed: {e}");
                self.refused(peer, filename, &format!("reading failed: {e}"));
                return self
                    .refuse(
                        peer,
                        ErrorCode::NotDefined,
                        "the server could not read the file",
                    )
                    .await;
            }
        };
        let agreed = match negotiate(options, file.len(), &self.config.limits) {
            Ok(a) => a,
            Err(refused) => {
                info!(client = %peer, file = filename, "TFTP: options refused: {}", refused.0);
                self.refused(peer, filename, &format!("options refused: {}", refused.0));
                return self
                    .refuse(peer, ErrorCode::OptionsRefused, &refused.0)
                    .await;
            }
        };
        let socket = match self.transfer_socket(peer) {
            Ok(s) => s,
            Err(e) => {
                warn!(client = %peer, "TFTP: no transfer socket: {e}");
                return self
                    .refuse(peer, ErrorCode::NotDefined, "server out of sockets")
                    .await;
            }
        };
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer,
                Active {
                    request: datagram.to_vec(),
                },
            );
        let active = Arc::clone(&self.active);
        let hooks = Arc::clone(&self.hooks);
        let observer = Arc::clone(&self.observer);
        let (timer, gso) = (self.config.timer, self.config.gso);
        // On one port, the port is the listener's: registered with it.
        let own_port = !self.config.single_port;
        tokio::spawn(async move {
            let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
            if own_port {
                hooks.opened(port);
            }
            let in_flight = observer.tftp_started();
            let served = run_transfer(socket, peer, file, agreed, timer, gso, hooks.as_ref()).await;
            drop(in_flight);
            if let IpAddr::V4(client) = peer.ip() {
                observer.tftp(client, served);
            }
            if own_port {
                hooks.closed(port);
            }
            active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&peer);
        });
    }

    /// The socket a transfer with `peer` runs on: a fresh port, or with
    /// `single_port` the listener's, connected to `peer`.
    fn transfer_socket(&self, peer: SocketAddr) -> io::Result<UdpSocket> {
        if self.config.single_port {
            let here = self.listener.local_addr()?;
            bind_udp(here, true, Some(peer))
        } else {
            bind_udp(SocketAddr::new(self.local_ip, 0), false, None)
        }
    }

    /// Tells the observer a request was refused before any transfer.
    fn refused(&self, peer: SocketAddr, filename: &str, why: &str) {
        let IpAddr::V4(client) = peer.ip() else {
            return;
        };
        let file = TftpFile {
            path: crate::observe::timeline::capped(filename).into(),
            size: 0,
            blksize: 0,
            windowsize: 0,
            ms: 0,
            retransmits: 0,
            user_blocks: 0,
            xdp_blocks: 0,
            tc_blocks: 0,
            end: TftpEnd::Refused {
                why: why.to_owned(),
            },
        };
        self.observer.tftp(client, file);
    }

    /// The file `filename` names, or, for a Raspberry Pi asking under its
    /// serial number (`1a2b3c4d/start4.elf`) where the root has no such
    /// directory or file, the root's own: one set of files serves every Pi,
    /// and a directory named after a Pi's serial gives that Pi its own.
    async fn open_for_tftp(&self, filename: &str) -> Result<Arc<BootFile>, OpenError> {
        match self.root.open_file(filename).await {
            Err(OpenError::NotFound) => match without_pi_serial(filename) {
                Some(shared) => {
                    let file = self.root.open_file(shared).await;
                    if file.is_ok() {
                        debug!(file = filename, "TFTP: no such file under the Pi's serial; the root's {shared} serves it");
                    }
                    file
                }
                None => Err(OpenError::NotFound),
            },
            other => other,
        }
    }

    async fn refuse(&self, peer: SocketAddr, code: ErrorCode, message: &str) {
        let packet = Repr::Error { code, message }.to_vec();
        if let Err(e) = self.listener.send_to(&packet, peer).await {
            debug!(client = %peer, "TFTP: could not send error: {e}");
        }
    }
}

/// Drives one transfer to its end; says how it was served.
/// A UDP socket bound to `addr`; with `shared`, beside others on the same
/// port (SO_REUSEPORT), and connected to `peer` when given.
fn bind_udp(addr: SocketAddr, shared: bool, peer: Option<SocketAddr>) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    if let Some(peer) = peer {
        socket.connect(&peer.into())?;
    }
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

async fn run_transfer(
    socket: UdpSocket,
    peer: SocketAddr,
    file: Arc<BootFile>,
    agreed: Negotiated,
    timer: TimerConfig,
    gso: bool,
    hooks: &dyn TransferHooks,
) -> TftpFile {
    let started = Instant::now();
    let server_port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut offloaded = false;
    let mut kernel = KernelProgress::default();
    let mut retransmits_handed_over = 0;
    let mut transfer = Transfer::new(&agreed, file.len(), timer, started);
    info!(
        client = %peer, file = %file.path, size = file.len(), blksize = agreed.blksize,
        windowsize = agreed.windowsize, "TFTP transfer started"
    );
    let oack: Vec<TftpOption<'_>> = agreed
        .oack
        .iter()
        .map(|(name, value)| TftpOption { name, value })
        .collect();
    let oack = Repr::OptionAck { options: oack }.to_vec();
    let segment = DATA_HEADER_LEN + usize::from(agreed.blksize);
    let mut batch = Batch::with_capacity(segment, usize::from(agreed.windowsize), gso);
    let mut inbound = vec![0u8; 2048];

    loop {
        batch.clear();
        while let Some(next) = transfer.poll_transmit(Instant::now()) {
            match next {
                Outgoing::OptionAck => batch.push(&oack),
                Outgoing::Data { index } => {
                    let payload = &file.bytes()[transfer.block_range(index)];
                    batch.push_data(Transfer::wire_block(index), payload);
                }
            }
        }
        // Once DATA flows with windows to spare, the kernel tiers answer the
        // ACKs; userspace keeps the timer and the last window. The kernel must
        // know of every block before it leaves, or it would take the client's
        // ACK of it for a stale one.
        let worth_offloading =
            !offloaded && transfer.last_sent() + transfer.window() + 1 < transfer.blocks();
        let ahead_of_kernel = offloaded && transfer.last_sent() > kernel.last_sent;
        // A resend is published as a new hand-over before it leaves, so the
        // kernel does not time the round trip from its own lost send (Karn).
        let resending = offloaded && transfer.stats().retransmits > retransmits_handed_over;
        if transfer.is_streaming_data() && (worth_offloading || ahead_of_kernel || resending) {
            let offer = offload_of(peer, server_port, &file, &agreed, &transfer);
            if hooks.offload(&offer) {
                offloaded = true;
                kernel.last_sent = transfer.last_sent();
                retransmits_handed_over = transfer.stats().retransmits;
            }
        }
        if let Err(e) = batch.send(&socket, peer).await {
            // A full socket buffer or a transient route error: the timer resends.
            debug!(client = %peer, "TFTP: send failed: {e}");
        }
        if transfer.outcome().is_some() {
            break;
        }
        let Some(deadline) = transfer.poll_timeout() else {
            break;
        };
        tokio::select! {
            received = socket.recv_from(&mut inbound) => {
                let Ok((len, from)) = received else { continue };
                if offloaded {
                    let offer = offload_of(peer, server_port, &file, &agreed, &transfer);
                    if let Some(p) = catch_up(hooks, &offer, &mut kernel) {
                        transfer.handle_kernel_progress(&p, Instant::now());
                    }
                }
                if from != peer {
                    // RFC 1350 §4: a packet from a stranger gets ERROR 5 and changes nothing.
                    let error = Repr::Error { code: ErrorCode::UnknownTransferId, message: "unknown transfer ID" }.to_vec();
                    let _ = socket.send_to(&error, from).await;
                    continue;
                }
                match Repr::parse(&inbound[..len]) {
                    Ok(Repr::Ack { block }) => transfer.handle_ack(block, Instant::now()),
                    Ok(Repr::Error { code, message }) => transfer.handle_error(code.code(), message),
                    Ok(other) => debug!(client = %peer, "TFTP: unexpected {other:?} during a transfer"),
                    Err(e) => debug!(client = %peer, "TFTP: malformed packet during a transfer: {e}"),
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                // An offloaded transfer that moved on in the kernel is late
                // only if the kernel's last send is a timeout old too (the
                // timer then counts from that send).
                if offloaded {
                    let offer = offload_of(peer, server_port, &file, &agreed, &transfer);
                    if let Some(p) = catch_up(hooks, &offer, &mut kernel) {
                        transfer.handle_kernel_progress(&p, Instant::now());
                    }
                }
                transfer.handle_timeout(Instant::now());
            }
        }
    }
    if offloaded {
        let offer = offload_of(peer, server_port, &file, &agreed, &transfer);
        if let Some(p) = hooks.kernel_progress(&offer) {
            kernel = p;
        }
        hooks.end_offload(&offer);
    }

    let elapsed = started.elapsed();
    let stats = transfer.stats();
    match transfer.outcome() {
        Some(Outcome::Completed) => {
            let mbps = file.len() as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
            info!(
                client = %peer, file = %file.path, bytes = file.len(), ms = elapsed.as_millis() as u64,
                mb_per_s = format!("{mbps:.1}"), retransmits = stats.retransmits, duplicate_acks = stats.duplicate_acks, spurious_resends = stats.spurious_resends,
                kernel_xdp = kernel.xdp_sent, kernel_tc = kernel.tc_sent, "TFTP transfer completed"
            );
        }
        Some(Outcome::ClientError { code, message }) => info!(
            client = %peer, file = %file.path, code, message = %message, acked_blocks = transfer.acked_blocks(),
            "TFTP transfer ended by the client"
        ),
        Some(Outcome::TimedOut { acked_blocks }) => warn!(
            client = %peer, file = %file.path, acked_blocks, retransmits = stats.retransmits,
            "TFTP transfer abandoned: the client went silent"
        ),
        None => warn!(client = %peer, file = %file.path, "TFTP transfer stopped"),
    }
    TftpFile {
        path: file.path.as_str().into(),
        size: file.len(),
        blksize: agreed.blksize,
        windowsize: agreed.windowsize,
        ms: elapsed.as_millis() as u64,
        retransmits: stats.retransmits,
        user_blocks: stats.data_sent,
        xdp_blocks: kernel.xdp_sent,
        tc_blocks: kernel.tc_sent,
        end: match transfer.outcome() {
            Some(Outcome::Completed) => TftpEnd::Completed,
            Some(Outcome::ClientError { code, message }) => TftpEnd::ClientError {
                code: *code,
                message: message.clone(),
            },
            Some(Outcome::TimedOut { acked_blocks }) => TftpEnd::TimedOut {
                acked_blocks: *acked_blocks,
            },
            None => TftpEnd::TimedOut {
                acked_blocks: transfer.acked_blocks(),
            },
        },
    }
}

fn offload_of<'a>(
    peer: SocketAddr,
    server_port: u16,
    file: &'a Arc<BootFile>,
    agreed: &Negotiated,
    transfer: &Transfer,
) -> Offload<'a> {
    Offload {
        client: peer,
        server_port,
        file,
        blksize: agreed.blksize,
        windowsize: agreed.windowsize.max(1),
        blocks: transfer.blocks(),
        acked: transfer.acked_blocks(),
        last_sent: transfer.last_sent(),
    }
}

/// What the kernel tiers did with an offloaded transfer, remembered in `kernel`.
fn catch_up(
    hooks: &dyn TransferHooks,
    offer: &Offload<'_>,
    kernel: &mut KernelProgress,
) -> Option<KernelProgress> {
    let progress = hooks.kernel_progress(offer)?;
    *kernel = progress;
    Some(progress)
}

/// The packets one poll produced (a window of DATA, or an OACK), laid out
/// back to back so a window leaves in one system call.
struct Batch {
    bytes: Vec<u8>,
    /// End offset of each packet in `bytes`.
    ends: Vec<usize>,
    segment: usize,
    gso: bool,
}

impl Batch {
    fn with_capacity(segment: usize, packets: usize, gso: bool) -> Self {
        Self {
            bytes: Vec::with_capacity(segment * packets),
            ends: Vec::with_capacity(packets),
            segment,
            gso,
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn push(&mut self, packet: &[u8]) {
        self.bytes.extend_from_slice(packet);
        self.ends.push(self.bytes.len());
    }

    fn push_data(&mut self, block: u16, payload: &[u8]) {
        let start = self.bytes.len();
        self.bytes.resize(start + DATA_HEADER_LEN, 0);
        emit_data_header(block, &mut self.bytes[start..]);
        self.bytes.extend_from_slice(payload);
        self.ends.push(self.bytes.len());
    }

    /// Sends every packet: one UDP GSO send when all but the last are one
    /// segment long (a window of full blocks), else one send each.
    async fn send(&self, socket: &UdpSocket, peer: SocketAddr) -> io::Result<()> {
        if self.gso && self.ends.len() > 1 && self.uniform() {
            match send_gso(socket, peer, &self.bytes, self.segment).await {
                Ok(()) => return Ok(()),
                // No GSO on this path (old kernel, odd device): plain sends below.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let mut start = 0;
        for &end in &self.ends {
            socket.send_to(&self.bytes[start..end], peer).await?;
            start = end;
        }
        Ok(())
    }

    fn uniform(&self) -> bool {
        let mut start = 0;
        for (i, &end) in self.ends.iter().enumerate() {
            let len = end - start;
            let last = i + 1 == self.ends.len();
            if len > self.segment || (!last && len != self.segment) {
                return false;
            }
            start = end;
        }
        true
    }
}

/// One sendmsg with UDP_SEGMENT: the kernel cuts `bytes` into datagrams of
/// `segment` bytes (the last may be shorter), saving a system call per block.
async fn send_gso(
    socket: &UdpSocket,
    peer: SocketAddr,
    bytes: &[u8],
    segment: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};

    let SocketAddr::V4(peer) = peer else {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    };
    let to = SockaddrIn::from(peer);
    let segment = segment as u16;
    socket
        .async_io(tokio::io::Interest::WRITABLE, || {
            let iov = [io::IoSlice::new(bytes)];
            let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::empty(),
                Some(&to),
            )
            .map(|_| ())
            .map_err(io::Error::from)
        })
        .await
}

/// `rest` of `SERIAL/rest`, where SERIAL is eight hex digits: how a
/// Raspberry Pi 4 or 5 boot ROM names its files (its TFTP_PREFIX default).
fn without_pi_serial(filename: &str) -> Option<&str> {
    let (dir, rest) = filename.trim_start_matches('/').split_once('/')?;
    (dir.len() == 8 && dir.bytes().all(|b| b.is_ascii_hexdigit()) && !rest.is_empty())
        .then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_window_sent_with_gso_arrives_as_separate_datagrams() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = Batch::with_capacity(4 + 8, 3, true);
        batch.push_data(1, b"AAAAAAAA");
        batch.push_data(2, b"BBBBBBBB");
        batch.push_data(3, b"CC");
        assert!(batch.uniform());
        send_gso(
            &sender,
            receiver.local_addr().unwrap(),
            &batch.bytes,
            batch.segment,
        )
        .await
        .expect("UDP GSO on loopback");
        let mut buf = [0u8; 64];
        for want in [
            &b"\x00\x03\x00\x01AAAAAAAA"[..],
            b"\x00\x03\x00\x02BBBBBBBB",
            b"\x00\x03\x00\x03CC",
        ] {
            let (len, _) = receiver.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], want);
        }
    }

    #[test]
    fn only_full_segments_before_the_last_packet_can_be_cut_by_gso() {
        let mut batch = Batch::with_capacity(12, 3, true);
        batch.push_data(1, b"AAAAAAAA");
        batch.push_data(2, b"BB");
        assert!(batch.uniform(), "a short last packet is fine");
        batch.push_data(3, b"CCCCCCCC");
        assert!(!batch.uniform(), "a short packet in the middle is not");
        let mut oack = Batch::with_capacity(12, 1, true);
        oack.push(&[0; 20]);
        assert!(!oack.uniform(), "a packet longer than a segment is not");
    }

    #[test]
    fn a_pi_serial_directory_is_recognised_and_nothing_else() {
        assert_eq!(without_pi_serial("1a2b3c4d/start4.elf"), Some("start4.elf"));
        assert_eq!(
            without_pi_serial("/DCA63201/overlays/x.dtbo"),
            Some("overlays/x.dtbo")
        );
        for other in [
            "start4.elf",
            "1a2b3c4/start4.elf",
            "1a2b3c4g/x",
            "1a2b3c4d/",
            "efi/boot/x",
        ] {
            assert_eq!(without_pi_serial(other), None, "{other}");
        }
    }
}
