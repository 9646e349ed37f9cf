//! The XDP in-place tier end to end. veth gives XDP no tailroom, so a live
//! ACK on veth goes to the TC tier; this test instead runs the real XDP
//! program with BPF_PROG_TEST_RUN in live-frames mode on the server's veth:
//! the ACK is processed as if it had arrived there, the program grows it into
//! a DATA frame and returns XDP_TX, and the frame really leaves the interface
//! and reaches a UDP socket in the client's namespace. Needs root.

mod common;

use std::{net::UdpSocket, time::Duration};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use common::frames::internet_checksum;
use pxe_common::maps::{SessionConfig, SessionKey};
use pxe_lab::Lab;
use pxe_user::fastpath::{FastPath, XdpModeChoice, XDP_PROGRAM};

const SERVER_PORT: u16 = 40_002;

fn mac_of(ns: &pxe_lab::Netns, ifname: &str) -> [u8; 6] {
    let out = ns
        .output("cat", &[&format!("/sys/class/net/{ifname}/address")])
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn ifindex_of(ns: &pxe_lab::Netns, ifname: &str) -> u32 {
    let out = ns
        .output("cat", &[&format!("/sys/class/net/{ifname}/ifindex")])
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An ACK from the client to the server as it would arrive on the server's veth.
fn ack_frame(client_mac: [u8; 6], server_mac: [u8; 6], client_port: u16, block: u16) -> Vec<u8> {
    let (client_ip, server_ip) = ([198, 18, 0, 2], [198, 18, 0, 1]);
    let mut f = Vec::new();
    f.extend_from_slice(&server_mac);
    f.extend_from_slice(&client_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&client_ip);
    ip.extend_from_slice(&server_ip);
    let c = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::new();
    udp.extend_from_slice(&client_port.to_be_bytes());
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&12u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0, 0, 4]);
    udp.extend_from_slice(&block.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

#[test]
fn xdp_tx_frames_built_in_place_reach_a_real_client() {
    if !pxe_lab::privileged("xdp_tx_frames_built_in_place_reach_a_real_client") {
        return;
    }
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    let (server_mac, client_mac) = (mac_of(&server, "eth0"), mac_of(&client, "eth0"));
    let ifindex = ifindex_of(&server, "eth0");

    // veth delivers XDP_TX frames to its peer only when the peer runs XDP
    // (its NAPI is then on): give the client's end a program that passes all.
    let _client_xdp = client
        .run(|| {
            let mut fp = FastPath::load().unwrap();
            fp.attach_xdp("eth0", XdpModeChoice::Native).unwrap();
            fp
        })
        .unwrap();

    let socket = client
        .run(|| UdpSocket::bind("198.18.0.2:0").unwrap())
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let client_port = socket.local_addr().unwrap().port();

    let file: Vec<u8> = (0..1468 * 20).map(|i: usize| (i * 31 + 7) as u8).collect();
    let (action, received) = server
        .run(|| {
            let mut fp = FastPath::load().unwrap();
            fp.register_transfer_port(SERVER_PORT).unwrap();
            fp.load_image(0, &file).unwrap();
            let key = SessionKey {
                client_ip: [198, 18, 0, 2],
                client_port: client_port.to_be_bytes(),
                server_port: SERVER_PORT.to_be_bytes(),
            };
            let mut entry: SessionConfig = bytemuck::Zeroable::zeroed();
            entry.blksize = 1468;
            entry.blocks = 21;
            entry.handover_sent = 1;
            entry.window = 1;
            fp.insert_session(key, entry).unwrap();

            let frame = ack_frame(client_mac, server_mac, client_port, 1);
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            let program: &mut Xdp = fp
                .ebpf_mut()
                .program_mut(XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx),
                    repeat: 1,
                    attrs: TestRunAttrs::new().xdp_live_frames(1),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN in live-frames mode");
            (result.return_value, fp.session(&key).unwrap().unwrap())
        })
        .unwrap();
    // In live-frames mode the run reports success; the session shows what the program did.
    assert_eq!(action, 0, "the live-frames run itself succeeds");
    assert_eq!(
        (received.last_sent, received.xdp_sent),
        (2, 1),
        "XDP built block 2 and sent it"
    );

    let mut buf = [0u8; 2048];
    let (len, from) = socket
        .recv_from(&mut buf)
        .expect("the DATA frame reached the client's socket");
    assert_eq!(from.to_string(), format!("198.18.0.1:{SERVER_PORT}"));
    assert_eq!(&buf[..4], &[0, 3, 0, 2], "DATA block 2");
    assert!(
        buf[4..len] == file[1468..2 * 1468],
        "byte-exact block, and the kernel accepted its checksums"
    );
}
