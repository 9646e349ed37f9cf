//! The real `pxed` against a scripted TFTP client, for what no packaged client
//! can do: hostile requests (each gets the RFC's error, nothing outside the
//! boot root is served, everyone else keeps being served), duplicate and stale
//! ACKs, reordering, strangers, and files replaced mid-transfer. Needs root.

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    os::unix::fs::symlink,
    time::Duration,
};

use common::{have_tool, patterned, run_ok, serve_tftp, tftp_client, SERVER_IP};
use pxe_user::wire::tftp::{ErrorCode, Repr};
use tftp_client::{error_code, fetch, first_reply, rrq};

fn server() -> SocketAddr {
    format!("{SERVER_IP}:69").parse().unwrap()
}

fn boot_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ipxe.efi"), patterned(100 * 512 + 3, 7)).unwrap();
    std::fs::create_dir(root.path().join("efi")).unwrap();
    std::fs::write(root.path().join("efi/grubx64.efi"), b"grub").unwrap();
    symlink("/etc/passwd", root.path().join("passwd-link")).unwrap();
    symlink("../../../../etc", root.path().join("efi/etc-link")).unwrap();
    root
}

#[test]
fn hostile_requests_get_the_rfc_error_and_nothing_outside_the_root() {
    if !pxe_lab::privileged("hostile_requests_get_the_rfc_error_and_nothing_outside_the_root") {
        return;
    }
    let root = boot_root();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "dot-dot",
            rrq("../../../../etc/passwd", &[]),
            ErrorCode::AccessViolation,
        ),
        (
            "dot-dot after a directory",
            rrq("efi/../../etc/passwd", &[]),
            ErrorCode::AccessViolation,
        ),
        (
            "backslash dot-dot",
            rrq("..\\..\\etc\\passwd", &[]),
            ErrorCode::AccessViolation,
        ),
        (
            "mixed separators",
            rrq("efi\\..//../etc/passwd", &[]),
            ErrorCode::AccessViolation,
        ),
        (
            "absolute path stays inside the root",
            rrq("/etc/passwd", &[]),
            ErrorCode::FileNotFound,
        ),
        (
            "symlink to a file outside",
            rrq("passwd-link", &[]),
            ErrorCode::AccessViolation,
        ),
        (
            "symlinked directory outside",
            rrq("efi/etc-link/passwd", &[]),
            ErrorCode::AccessViolation,
        ),
        ("a directory", rrq("efi", &[]), ErrorCode::AccessViolation),
        (
            "missing file",
            rrq("nope.efi", &[]),
            ErrorCode::FileNotFound,
        ),
        (
            "write request",
            Repr::WriteRequest {
                filename: "ipxe.efi",
            }
            .to_vec(),
            ErrorCode::IllegalOperation,
        ),
        (
            "unknown opcode",
            vec![0, 9, b'x', 0],
            ErrorCode::IllegalOperation,
        ),
        (
            "mail mode (obsolete, RFC 1350), for a file that exists",
            b"\0\x01ipxe.efi\0mail\0".to_vec(),
            ErrorCode::IllegalOperation,
        ),
        (
            "DATA to the request port",
            Repr::Data {
                block: 1,
                payload: b"x",
            }
            .to_vec(),
            ErrorCode::IllegalOperation,
        ),
        (
            "blksize 0",
            rrq("ipxe.efi", &[("blksize", "0")]),
            ErrorCode::OptionsRefused,
        ),
        (
            "blksize 7",
            rrq("ipxe.efi", &[("blksize", "7")]),
            ErrorCode::OptionsRefused,
        ),
        (
            "blksize not a number",
            rrq("ipxe.efi", &[("blksize", "lots")]),
            ErrorCode::OptionsRefused,
        ),
        (
            "windowsize 0",
            rrq("ipxe.efi", &[("windowsize", "0")]),
            ErrorCode::OptionsRefused,
        ),
        (
            "timeout 999",
            rrq("ipxe.efi", &[("timeout", "999")]),
            ErrorCode::OptionsRefused,
        ),
        (
            "huge tsize",
            rrq("ipxe.efi", &[("tsize", "99999999999999999999999")]),
            ErrorCode::OptionsRefused,
        ),
    ];
    served
        .client
        .run(|| {
            for (what, packet, want) in &cases {
                let reply =
                    first_reply(server(), packet).unwrap_or_else(|| panic!("{what}: no reply"));
                assert_eq!(
                    error_code(&reply),
                    Some(*want),
                    "{what}: reply {:?}",
                    Repr::parse(&reply)
                );
            }
            // Still serving, byte-exact, after all that.
            let got = fetch(server(), "ipxe.efi", &[("blksize", "1468")], 1).unwrap();
            assert_eq!(got.data, patterned(100 * 512 + 3, 7));
        })
        .unwrap();
}

#[test]
fn duplicate_acks_never_make_the_server_resend() {
    if !pxe_lab::privileged("duplicate_acks_never_make_the_server_resend") {
        return;
    }
    let root = boot_root();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    served
        .client
        .run(|| {
            // Every block acknowledged twice: a server with the Sorcerer's
            // Apprentice bug would send every block twice from then on.
            let got = fetch(server(), "ipxe.efi", &[], 2).unwrap();
            assert_eq!(got.data, patterned(100 * 512 + 3, 7));
            assert_eq!(
                got.duplicate_data, 0,
                "no block may arrive twice on a lossless link"
            );
            assert_eq!(got.data_packets, 101);
        })
        .unwrap();
}

#[test]
fn a_packet_from_a_stranger_gets_error_5_and_the_transfer_goes_on() {
    if !pxe_lab::privileged("a_packet_from_a_stranger_gets_error_5_and_the_transfer_goes_on") {
        return;
    }
    let root = boot_root();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    served
        .client
        .run(|| {
            let client = UdpSocket::bind("0.0.0.0:0").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            client.send_to(&rrq("ipxe.efi", &[]), server()).unwrap();
            let mut buf = [0u8; 1024];
            let (_, transfer) = client.recv_from(&mut buf).unwrap();
            assert_eq!(
                Repr::parse(&buf[..4 + 512]).unwrap(),
                Repr::Data {
                    block: 1,
                    payload: &buf[4..516]
                }
            );

            let stranger = UdpSocket::bind("0.0.0.0:0").unwrap();
            stranger
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            stranger
                .send_to(&Repr::Ack { block: 1 }.to_vec(), transfer)
                .unwrap();
            let (len, _) = stranger.recv_from(&mut buf).unwrap();
            assert_eq!(error_code(&buf[..len]), Some(ErrorCode::UnknownTransferId));

            client
                .send_to(&Repr::Ack { block: 1 }.to_vec(), transfer)
                .unwrap();
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, transfer);
            assert!(
                matches!(Repr::parse(&buf[..len]), Ok(Repr::Data { block: 2, .. })),
                "the stranger changed nothing"
            );
        })
        .unwrap();
}

#[test]
fn a_flood_of_requests_from_one_host_does_not_stop_service_to_others() {
    if !pxe_lab::privileged("a_flood_of_requests_from_one_host_does_not_stop_service_to_others")
        || !have_tool("curl", "curl")
    {
        return;
    }
    let root = boot_root();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    served
        .client
        .ip(["addr", "add", "198.18.0.3/24", "dev", "eth0"])
        .unwrap();
    served
        .client
        .run(|| {
            // 2,000 requests from 2,000 ports of one host that never acknowledge.
            let sockets: Vec<UdpSocket> = (0..2_000)
                .map(|_| UdpSocket::bind("198.18.0.3:0").unwrap())
                .collect();
            for (i, socket) in sockets.iter().enumerate() {
                let file = if i % 2 == 0 {
                    "ipxe.efi"
                } else {
                    "../../etc/shadow"
                };
                socket
                    .send_to(&rrq(file, &[("blksize", "1468")]), server())
                    .unwrap();
            }
        })
        .unwrap();
    // Another machine still boots, byte-exact.
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("ipxe.efi");
    run_ok(
        &served.client,
        "curl",
        &[
            "-sS",
            "--max-time",
            "30",
            "--interface",
            "198.18.0.2",
            "-o",
            dest.to_str().unwrap(),
            &format!("tftp://{SERVER_IP}/ipxe.efi"),
        ],
    );
    assert_eq!(std::fs::read(dest).unwrap(), patterned(100 * 512 + 3, 7));
}

#[test]
fn windowed_transfers_survive_reordering_loss_and_stale_acks() {
    if !pxe_lab::privileged("windowed_transfers_survive_reordering_loss_and_stale_acks") {
        return;
    }
    let root = boot_root();
    let want = patterned(300 * 1468 + 11, 21);
    std::fs::write(root.path().join("kernel"), &want).unwrap();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    served
        .client
        .run(|| {
            for (window, seed) in [(4, 1), (8, 2), (1, 3), (16, 4)] {
                let got =
                    tftp_client::fetch_disordered(server(), "kernel", 1468, window, 10, 5, seed)
                        .unwrap_or_else(|e| panic!("window {window}: {e}"));
                assert!(
                    got == want,
                    "window {window}: {} bytes, want {}",
                    got.len(),
                    want.len()
                );
            }
        })
        .unwrap();
}

#[test]
fn a_file_replaced_mid_transfer_reaches_new_clients_while_running_ones_finish_the_old() {
    if pxe_lab::privileged(
        "a_file_replaced_mid_transfer_reaches_new_clients_while_running_ones_finish_the_old",
    ) {
        replaced_mid_transfer(&["--xdp-mode", "off", "--no-tc"]);
    }
}

#[test]
fn with_the_kernel_tiers_a_replaced_file_is_served_old_to_running_and_new_to_new_transfers() {
    if pxe_lab::privileged(
        "with_the_kernel_tiers_a_replaced_file_is_served_old_to_running_and_new_to_new_transfers",
    ) {
        let served_log = replaced_mid_transfer(&["--fastpath-memory", "8"]);
        let kernel_tc = completed_transfers_field(&served_log, "kernel_tc");
        assert!(
            kernel_tc.len() == 2 && kernel_tc.iter().all(|&blocks| blocks > 0),
            "the kernel served blocks of both transfers ({kernel_tc:?}):\n{served_log}"
        );
    }
}

/// Starts a transfer, replaces its file by rename, checks a new transfer gets
/// the new version and the running one finishes on the old; returns pxed's log.
fn replaced_mid_transfer(pxed_args: &[&str]) -> String {
    let root = boot_root();
    let (old, new) = (patterned(50 * 512 + 5, 31), patterned(70 * 512 + 9, 32));
    std::fs::write(root.path().join("image"), &old).unwrap();
    let served = serve_tftp(root.path(), pxed_args);
    let root_path = root.path().to_owned();
    served
        .client
        .run(|| {
            // A running transfer: block 1 received, not yet acknowledged.
            let running = UdpSocket::bind("0.0.0.0:0").unwrap();
            running
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            running.send_to(&rrq("image", &[]), server()).unwrap();
            let mut buf = [0u8; 1024];
            let (len, transfer) = running.recv_from(&mut buf).unwrap();
            let mut got = match Repr::parse(&buf[..len]).unwrap() {
                Repr::Data { block: 1, payload } => payload.to_vec(),
                other => panic!("{other:?}"),
            };

            // The operator replaces the image the right way: write, then rename.
            let tmp = root_path.join(".image.new");
            std::fs::write(&tmp, &new).unwrap();
            std::fs::rename(&tmp, root_path.join("image")).unwrap();
            let fresh = fetch(server(), "image", &[], 1).unwrap();
            assert!(fresh.data == new, "a new transfer gets the new image");

            // The running transfer finishes on the version it started with.
            let mut block = 1u16;
            loop {
                running
                    .send_to(&Repr::Ack { block }.to_vec(), transfer)
                    .unwrap();
                let (len, _) = running.recv_from(&mut buf).unwrap();
                let Ok(Repr::Data { block: b, payload }) = Repr::parse(&buf[..len]) else {
                    panic!("not DATA")
                };
                if b != block.wrapping_add(1) {
                    continue;
                }
                got.extend_from_slice(payload);
                block = b;
                if payload.len() < 512 {
                    running
                        .send_to(&Repr::Ack { block }.to_vec(), transfer)
                        .unwrap();
                    break;
                }
            }
            assert!(
                got == old,
                "the running transfer is byte-exact on the old image"
            );
        })
        .unwrap();
    // Both transfers are logged once pxed has seen their last ACK.
    served.wait_for_log_count(TRANSFER_COMPLETED, 2, Duration::from_secs(10));
    served.log()
}

const TRANSFER_COMPLETED: &str = "TFTP transfer completed";

/// The numeric field `name` (`name=N`) of every completed transfer in `log`.
fn completed_transfers_field(log: &str, name: &str) -> Vec<u64> {
    let key = format!("{name}=");
    log.lines()
        .filter(|line| line.contains(TRANSFER_COMPLETED))
        .map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix(&key))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no number {key}N in {line:?}"))
        })
        .collect()
}

#[test]
fn on_a_jumbo_frame_network_the_kernel_tiers_cap_the_granted_blksize() {
    if !pxe_lab::privileged("on_a_jumbo_frame_network_the_kernel_tiers_cap_the_granted_blksize") {
        return;
    }
    let root = boot_root();
    let granted = |pxed_args: &[&str]| -> String {
        let lab = pxe_lab::Lab::new().unwrap();
        let pxe_lab::Pair {
            server: server_ns,
            client,
        } = lab
            .pair()
            .client_addr(pxe_lab::CLIENT_CIDR)
            .mtu(9000)
            .build()
            .unwrap();
        let mut args = vec![
            "--interface",
            "eth0",
            "--boot-root",
            root.path().to_str().unwrap(),
            "--dhcp",
            "off",
            "--http-port",
            "0",
        ];
        args.extend_from_slice(pxed_args);
        lab.spawn(&server_ns, common::PXED, &args).unwrap();
        assert!(server_ns.wait_for_udp_port(69, Duration::from_secs(20)));
        let reply = client
            .run(|| first_reply(server(), &rrq("ipxe.efi", &[("blksize", "8000")])))
            .unwrap()
            .expect("an OACK");
        let Ok(Repr::OptionAck { options }) = Repr::parse(&reply) else {
            panic!("not an OACK: {reply:?}")
        };
        options
            .iter()
            .find(|o| o.name == "blksize")
            .map(|o| o.value.to_owned())
            .expect("blksize granted")
    };
    assert_eq!(
        granted(&["--fastpath-memory", "16"]),
        "1468",
        "the largest block the kernel tiers build"
    );
    assert_eq!(
        granted(&["--xdp-mode", "off", "--no-tc"]),
        "8000",
        "userspace alone: up to the MTU"
    );
    assert_eq!(
        granted(&["--fastpath-memory", "16", "--tftp-max-blksize", "4096"]),
        "4096",
        "configurable"
    );
}
