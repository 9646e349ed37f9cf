//! `bench tftp --io packet`: the DATA and OACKs of every simulated transfer
//! come from one packet socket on the client interface, many per system
//! call (`recvmmsg`), on one thread, instead of one socket and one wakeup
//! per packet. Each transfer still owns a UDP socket: it holds the
//! transfer's port (the TID the server sends to) and sends the request and
//! the ACKs, but receives nothing: a socket filter drops what reaches it, so
//! the stack neither queues it nor answers with ICMP port unreachable.
//!
//! One thread per core, each with its share of the clients and its own
//! packet socket in a fanout group that hands it exactly its transfers'
//! packets (see [`run`]). The protocol is `pxe_lab::client::tftp::Download`, the same
//! as the socket path's.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use pxe_user::wire::udp;

use pxe_lab::client::{
    tftp::{Download, Step},
    TftpProfile,
};

/// Frames taken per `recvmmsg`.
const BATCH: usize = 64;
/// Largest packet taken whole: a UDP GSO super-packet (a server's whole
/// window, sent as one; the packet socket sees it before it is split),
/// after its virtio-net header.
const FRAME: usize = VNET_HDR + 65_536;
/// `struct virtio_net_hdr`, which `PACKET_VNET_HDR` puts before each packet:
/// it carries the segment size of a GSO super-packet.
const VNET_HDR: usize = 10;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: a UDP GSO super-packet.
const GSO_UDP_L4: u8 = 5;
/// How often retransmit deadlines are checked.
const SWEEP: Duration = Duration::from_millis(10);

/// What one simulated client's downloads came to: how long each took and
/// its result (retransmits and bytes, or why it failed).
pub type Results = Vec<(Duration, Result<(u64, u64), String>)>;

/// The work: `clients` clients at once, each downloading `file` `rounds`
/// times in a row, every byte compared with `expected`.
pub struct Plan<'a> {
    pub interface: &'a str,
    pub server: SocketAddrV4,
    pub file: &'a str,
    /// What each request asks for, and the retransmission timeout.
    pub ask: TftpProfile,
    pub deadline: Instant,
    pub expected: &'a [u8],
    pub clients: usize,
    pub rounds: usize,
}

struct Active<'e> {
    socket: UdpSocket,
    peer: SocketAddrV4,
    tid_known: bool,
    download: Download<'e>,
    started: Instant,
    due: Instant,
    client: usize,
}

/// Runs the plan to the end on one thread per core; one result per download.
///
/// The threads' packet sockets form a fanout group whose classic BPF
/// program sends each packet to the socket of index `destination port mod
/// threads`; each thread opens its transfers on ports of its own residue,
/// so every transfer's packets reach the thread that runs it.
pub fn run(plan: &Plan<'_>) -> io::Result<Results> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(plan.clients)
        .max(1);
    // Joined in order, before any packet flows: socket i is index i.
    let group = (std::process::id() & 0xffff) as u16;
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads {
        let socket = PacketSocket::open(plan.interface)?;
        socket.join_fanout(group, threads as u32, sockets.is_empty())?;
        sockets.push(socket);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(index, rx)| scope.spawn(move || serve(plan, rx, Share { index, of: threads })))
            .collect();
        let mut results = Results::new();
        for worker in workers {
            results.extend(
                worker
                    .join()
                    .map_err(|_| io::Error::other("a harness thread panicked"))??,
            );
        }
        Ok(results)
    })
}

/// Which part of the work a thread has: clients `index`, `index + of`, …,
/// on ports whose residue mod `of` is `index`.
#[derive(Clone, Copy)]
struct Share {
    index: usize,
    of: usize,
}

/// One thread's loop: its clients' downloads, its packets.
fn serve(plan: &Plan<'_>, rx: PacketSocket, share: Share) -> io::Result<Results> {
    let mut engine = Engine {
        plan,
        share,
        active: HashMap::new(),
        rounds_left: vec![plan.rounds; plan.clients],
        results: Vec::new(),
    };
    for client in (share.index..plan.clients).step_by(share.of) {
        engine.start(client)?;
    }
    let mut batch = Batch::new();
    let mut next_sweep = Instant::now() + SWEEP;
    while !engine.active.is_empty() {
        rx.wait(SWEEP)?;
        loop {
            let n = rx.receive(&mut batch)?;
            for i in 0..n {
                engine.on_packet(batch.frame(i))?;
            }
            if n < BATCH {
                break;
            }
        }
        let now = Instant::now();
        if now >= next_sweep {
            engine.sweep(now)?;
            next_sweep = now + SWEEP;
        }
    }
    Ok(engine.results)
}

struct Engine<'p, 'e> {
    plan: &'p Plan<'e>,
    share: Share,
    /// By local port: where the server's packets for the transfer arrive.
    active: HashMap<u16, Active<'e>>,
    rounds_left: Vec<usize>,
    results: Results,
}

impl<'e> Engine<'_, 'e> {
    /// Starts the client's next download, if it has one left.
    fn start(&mut self, client: usize) -> io::Result<()> {
        if self.rounds_left[client] == 0 {
            return Ok(());
        }
        self.rounds_left[client] -= 1;
        let (socket, port) = self.bind_own_port()?;
        drop_everything_received(&socket)?;
        let (download, request) =
            Download::start(self.plan.file, &self.plan.ask, Some(self.plan.expected));
        socket.send_to(&request, self.plan.server)?;
        let now = Instant::now();
        let active = Active {
            socket,
            peer: self.plan.server,
            tid_known: false,
            download,
            started: now,
            due: now + self.plan.ask.timeout,
            client,
        };
        self.active.insert(port, active);
        Ok(())
    }

    /// One packet as the packet socket gives it: its virtio-net header, the
    /// Ethernet header, then IPv4. A GSO super-packet is split into the
    /// datagrams it stands for.
    /// A UDP socket on a port this thread's packet socket receives for.
    fn bind_own_port(&self) -> io::Result<(UdpSocket, u16)> {
        loop {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            let port = socket.local_addr()?.port();
            if usize::from(port) % self.share.of == self.share.index {
                return Ok((socket, port));
            }
        }
    }

    fn on_packet(&mut self, packet: &[u8]) -> io::Result<()> {
        let Some((vnet, frame)) = packet.split_at_checked(VNET_HDR) else {
            return Ok(());
        };
        let Some(ip) = ipv4_of(frame) else {
            return Ok(());
        };
        let gso_size = usize::from(u16::from_le_bytes([vnet[4], vnet[5]]));
        if vnet[1] & !0x80 != GSO_UDP_L4 || gso_size == 0 {
            return match udp::parse(ip) {
                Some(d) => self.on_datagram(d.src, d.src_port, d.dst_port, d.payload),
                None => Ok(()),
            };
        }
        let Some((src, src_port, dst_port, payload)) = gso_udp(ip) else {
            return Ok(());
        };
        for segment in payload.chunks(gso_size) {
            self.on_datagram(src, src_port, dst_port, segment)?;
        }
        Ok(())
    }

    fn on_datagram(
        &mut self,
        src: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> io::Result<()> {
        if src != *self.plan.server.ip() {
            return Ok(());
        }
        let Some(a) = self.active.get_mut(&dst_port) else {
            return Ok(());
        };
        let from = SocketAddrV4::new(src, src_port);
        // The server's first reply names its transfer port (TID).
        if !a.tid_known {
            if !Download::is_first_reply(payload) {
                return Ok(());
            }
            (a.peer, a.tid_known) = (from, true);
        } else if from != a.peer {
            return Ok(());
        }
        a.due = Instant::now() + self.plan.ask.timeout;
        let step = a.download.on_datagram(payload);
        self.act(dst_port, step)
    }

    /// Retransmits (or gives up) for every transfer whose timeout passed.
    fn sweep(&mut self, now: Instant) -> io::Result<()> {
        let over = now > self.plan.deadline;
        let due: Vec<u16> = self
            .active
            .iter()
            .filter(|(_, a)| over || a.due <= now)
            .map(|(port, _)| *port)
            .collect();
        for port in due {
            let Some(a) = self.active.get_mut(&port) else {
                continue;
            };
            let step = if over {
                a.download.abandon("run time limit reached")
            } else {
                a.download.on_timeout()
            };
            a.due = now + self.plan.ask.timeout;
            self.act(port, step)?;
        }
        Ok(())
    }

    fn act(&mut self, port: u16, step: Step) -> io::Result<()> {
        let Some(a) = self.active.get_mut(&port) else {
            return Ok(());
        };
        let result = match step {
            Step::Wait => return Ok(()),
            Step::Send(bytes) => {
                a.socket.send_to(&bytes, a.peer)?;
                return Ok(());
            }
            Step::Done { retransmits, bytes } => {
                let _ = a.socket.send_to(a.download.final_ack(), a.peer);
                Ok((retransmits, bytes))
            }
            Step::Fail { why, error } => {
                if let Some(error) = error {
                    let _ = a.socket.send_to(&error, a.peer);
                }
                Err(why)
            }
        };
        let a = self.active.remove(&port).expect("present above");
        self.results.push((a.started.elapsed(), result));
        self.start(a.client)
    }
}

/// The IPv4 packet in an Ethernet frame (untagged or with one 802.1Q tag).
fn ipv4_of(frame: &[u8]) -> Option<&[u8]> {
    match frame.get(12..14)? {
        [0x08, 0x00] => frame.get(14..),
        [0x81, 0x00] if frame.get(16..18)? == [0x08, 0x00] => frame.get(18..),
        _ => None,
    }
}

/// Source, ports and payload of a UDP GSO super-packet (its IPv4 and UDP
/// length fields are the whole packet's or a segment's, depending on where
/// it was seen: the bytes are what count).
fn gso_udp(ip: &[u8]) -> Option<(Ipv4Addr, u16, u16, &[u8])> {
    let header = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || header < 20 || ip.get(9) != Some(&17) || ip.len() < header + 8 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let udp = &ip[header..];
    Some((
        src,
        u16::from_be_bytes([udp[0], udp[1]]),
        u16::from_be_bytes([udp[2], udp[3]]),
        &udp[8..],
    ))
}

/// A socket filter that accepts nothing: the port stays ours, nothing queues.
fn drop_everything_received(socket: &UdpSocket) -> io::Result<()> {
    let mut reject = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }]; // BPF_RET | BPF_K, 0 bytes
    let program = libc::sock_fprog {
        len: 1,
        filter: reject.as_mut_ptr(),
    };
    // The program's instruction outlives the call, which copies both.
    set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program)
}

/// An AF_PACKET socket receiving the IPv4 frames that arrive on one
/// interface (raw: `PACKET_VNET_HDR`, which GSO needs, is refused otherwise).
struct PacketSocket {
    fd: OwnedFd,
}

/// `PACKET_IGNORE_OUTGOING` (Linux 4.20): our own ACKs are not copied back to us.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Fanout mode in which a classic BPF program picks the socket.
const PACKET_FANOUT_CBPF: i32 = 6;
/// Sets a fanout group's program.
const PACKET_FANOUT_DATA: libc::c_int = 22;
/// Classic BPF: loads relative to the network header (`SKF_NET_OFF`).
const SKF_NET_OFF: i32 = -0x100000;
/// `PACKET_VNET_HDR`: each packet comes with its `virtio_net_hdr`.
const PACKET_VNET_HDR: libc::c_int = 15;

impl PacketSocket {
    fn open(interface: &str) -> io::Result<Self> {
        let protocol = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket calls; the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just created and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name =
            std::ffi::CString::new(interface).map_err(|_| io::Error::other("interface name"))?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::other(format!("no interface {interface} here")));
        }
        // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex as i32;
        // SAFETY: the address is a valid sockaddr_ll of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        set_option(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1_i32)?;
        set_option(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &1_i32)?;
        // A deep queue: a window of thousands of transfers arrives at once.
        set_option(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &(256_i32 << 20),
        )?;
        Ok(Self { fd })
    }

    /// Joins fanout group `group`, whose program picks the socket of index
    /// `UDP destination port mod members`; `first` sets the program.
    fn join_fanout(&self, group: u16, members: u32, first: bool) -> io::Result<()> {
        set_option(
            &self.fd,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            &(i32::from(group) | (PACKET_FANOUT_CBPF << 16)),
        )?;
        if !first {
            return Ok(());
        }
        // ldh [net + 22] (the UDP destination port behind a 20-byte IPv4
        // header); a = a mod members; return a.
        let mut program = [
            libc::sock_filter {
                code: 0x28,
                jt: 0,
                jf: 0,
                k: (SKF_NET_OFF + 22) as u32,
            },
            libc::sock_filter {
                code: 0x94,
                jt: 0,
                jf: 0,
                k: members,
            },
            libc::sock_filter {
                code: 0x16,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ];
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        // The program outlives the call, which copies it.
        set_option(&self.fd, libc::SOL_PACKET, PACKET_FANOUT_DATA, &fprog)
    }

    /// Waits until a packet is queued or `timeout` passes.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes up to `BATCH` queued packets; 0 when none is waiting.
    fn receive(&self, batch: &mut Batch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: the headers point at the batch's buffers, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }
}

/// `setsockopt` with a value of type `T` (an int, a filter program).
fn set_option<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a valid `T` of the size given; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Buffers and headers for one `recvmmsg`.
struct Batch {
    buffers: Vec<Vec<u8>>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Self {
        Self {
            buffers: (0..BATCH).map(|_| vec![0u8; FRAME]).collect(),
            // SAFETY: all-zero iovec and mmsghdr are valid; `prepare` points them at the buffers.
            iovecs: vec![unsafe { std::mem::zeroed() }; BATCH],
            headers: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    fn prepare(&mut self) {
        for i in 0..BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i].as_mut_ptr().cast(),
                iov_len: FRAME,
            };
            // SAFETY: as in `new`.
            self.headers[i] = unsafe { std::mem::zeroed() };
            self.headers[i].msg_hdr.msg_iov = &mut self.iovecs[i];
            self.headers[i].msg_hdr.msg_iovlen = 1;
        }
    }

    /// The `i`-th packet the last `receive` took.
    fn frame(&self, i: usize) -> &[u8] {
        &self.buffers[i][..(self.headers[i].msg_len as usize).min(FRAME)]
    }
}
