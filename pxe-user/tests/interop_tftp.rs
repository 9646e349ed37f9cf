//! Real TFTP clients (curl, tftp-hpa, atftp) download from `pxed` across a veth
//! pair; every file must arrive byte-exact. Needs root and the clients.

mod common;

use std::path::Path;

use common::{have_tool, patterned, run_ok, serve_tftp, SERVER_IP};

/// File name → contents, chosen for the edges: empty, exactly one block,
/// whole multiples of common block sizes, and odd sizes.
fn boot_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("one-block", patterned(512, 1)),
        ("blocks-512x16", patterned(512 * 16, 2)),
        ("blocks-1468x6", patterned(1468 * 6, 3)),
        ("blocks-1432x5", patterned(1432 * 5, 4)),
        ("kernel", patterned(1_048_576 + 37, 5)),
    ]
}

fn populate(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, bytes) in files {
        std::fs::write(root.join(name), bytes).unwrap();
    }
}

/// A boot root with [`boot_files`] served by pxed with `pxed_args`; the root
/// directory lives as long as the returned guard.
fn serve_boot_files(
    pxed_args: &[&str],
) -> (
    tempfile::TempDir,
    Vec<(&'static str, Vec<u8>)>,
    common::Served,
) {
    let root = tempfile::tempdir().unwrap();
    let files = boot_files();
    populate(root.path(), &files);
    let served = serve_tftp(root.path(), pxed_args);
    (root, files, served)
}

/// tftp-hpa fetches `name` into `dest`, in binary mode.
fn tftp_hpa_get(served: &common::Served, name: &str, dest: &Path) {
    let dest = dest.to_str().unwrap();
    let args = ["-m", "binary", SERVER_IP, "-c", "get", name, dest];
    run_ok(&served.client, "tftp", &args);
}

/// atftp fetches `name` into `dest` with blksize 1468 and `window` (an
/// atftp option, `windowsize N`).
fn atftp_get(served: &common::Served, name: &str, dest: &Path, window: &str) {
    let args = [
        "--get",
        "-r",
        name,
        "-l",
        dest.to_str().unwrap(),
        "--option",
        "blksize 1468",
        "--option",
        window,
        SERVER_IP,
    ];
    run_ok(&served.client, "atftp", &args);
}

fn assert_same(got: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(got).unwrap_or_else(|e| panic!("{what}: no output file: {e}"));
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got == want, "{what}: contents differ");
}

#[test]
fn curl_downloads_every_size_byte_exact_with_and_without_options() {
    if !pxe_lab::privileged("curl_downloads_every_size_byte_exact_with_and_without_options")
        || !have_tool("curl", "curl")
    {
        return;
    }
    let (_root, files, served) = serve_boot_files(&["--xdp-mode", "off", "--no-tc"]);
    let out = tempfile::tempdir().unwrap();
    // curl 7.88 cannot fetch an empty file from any TFTP server (dnsmasq
    // included: "getpeername() failed with errno 107"); tftp-hpa and atftp
    // cover the empty file.
    for (name, bytes) in files.iter().filter(|(name, _)| *name != "empty") {
        for (variant, flags) in [
            ("default", vec![]),
            ("blksize 1468", vec!["--tftp-blksize", "1468"]),
            ("blksize 1432", vec!["--tftp-blksize", "1432"]),
            ("no options", vec!["--tftp-no-options"]),
        ] {
            let dest = out
                .path()
                .join(format!("{name}-{}", variant.replace(' ', "_")));
            let url = format!("tftp://{SERVER_IP}/{name}");
            let mut args = vec!["-sS", "--max-time", "60", "-o", dest.to_str().unwrap()];
            args.extend(flags.iter().copied());
            args.push(&url);
            run_ok(&served.client, "curl", &args);
            assert_same(&dest, bytes, &format!("curl {variant} {name}"));
        }
    }
}

#[test]
fn tftp_hpa_downloads_every_size_byte_exact() {
    if !pxe_lab::privileged("tftp_hpa_downloads_every_size_byte_exact")
        || !have_tool("tftp", "tftp-hpa")
    {
        return;
    }
    let (_root, files, served) = serve_boot_files(&["--xdp-mode", "off", "--no-tc"]);
    let out = tempfile::tempdir().unwrap();
    for (name, bytes) in &files {
        let dest = out.path().join(name);
        tftp_hpa_get(&served, name, &dest);
        assert_same(&dest, bytes, &format!("tftp-hpa {name}"));
    }
}

#[test]
fn atftp_downloads_with_blksize_and_windowsize_byte_exact() {
    if !pxe_lab::privileged("atftp_downloads_with_blksize_and_windowsize_byte_exact")
        || !have_tool("atftp", "atftp")
    {
        return;
    }
    let (_root, files, served) = serve_boot_files(&["--xdp-mode", "off", "--no-tc"]);
    let out = tempfile::tempdir().unwrap();
    for (name, bytes) in &files {
        for options in [
            vec!["--option", "blksize 1428"],
            vec!["--option", "blksize 1468", "--option", "windowsize 4"],
            vec!["--option", "tsize 0", "--option", "windowsize 8"],
        ] {
            let dest = out.path().join(format!("{name}-{}", options.len()));
            let mut args = vec!["--get", "-r", name, "-l", dest.to_str().unwrap()];
            args.extend(options.iter().copied());
            args.push(SERVER_IP);
            run_ok(&served.client, "atftp", &args);
            assert_same(&dest, bytes, &format!("atftp {options:?} {name}"));
        }
    }
}

#[test]
fn files_over_65535_blocks_roll_the_block_number_over() {
    if !pxe_lab::privileged("files_over_65535_blocks_roll_the_block_number_over")
        || !have_tool("curl", "curl")
    {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // 65,536 full blocks of 512 bytes and a short one: block numbers wrap once.
    let huge = patterned(512 * 65_536 + 1000, 9);
    std::fs::write(root.path().join("huge"), &huge).unwrap();
    let served = serve_tftp(root.path(), &["--xdp-mode", "off", "--no-tc"]);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("huge");
    run_ok(
        &served.client,
        "curl",
        &[
            "-sS",
            "--max-time",
            "300",
            "-o",
            dest.to_str().unwrap(),
            &format!("tftp://{SERVER_IP}/huge"),
        ],
    );
    assert_same(&dest, &huge, "curl, 65,538 blocks of 512");
    if have_tool("tftp", "tftp-hpa") {
        let dest = out.path().join("huge-hpa");
        tftp_hpa_get(&served, "huge", &dest);
        assert_same(&dest, &huge, "tftp-hpa, 65,538 blocks of 512");
    }
}

#[test]
fn transfers_complete_byte_exact_with_five_percent_loss_each_way() {
    if !pxe_lab::privileged("transfers_complete_byte_exact_with_five_percent_loss_each_way")
        || !have_tool("curl", "curl")
        || !have_tool("nft", "nftables")
    {
        return;
    }
    let (root, files, served) = serve_boot_files(&["--xdp-mode", "off", "--no-tc"]);
    drop_five_percent_of_udp(&served, root.path());
    let out = tempfile::tempdir().unwrap();
    // curl 7.88 cannot fetch empty files over TFTP at all (see above).
    for (name, bytes) in files.iter().filter(|(name, _)| *name != "empty") {
        for blksize in ["1468", "512"] {
            let dest = out.path().join(format!("{name}-{blksize}"));
            run_ok(
                &served.client,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "120",
                    "--tftp-blksize",
                    blksize,
                    "-o",
                    dest.to_str().unwrap(),
                    &format!("tftp://{SERVER_IP}/{name}"),
                ],
            );
            assert_same(
                &dest,
                bytes,
                &format!("curl blksize {blksize} {name} under loss"),
            );
        }
    }
}

/// Drops 5% of UDP each way on the client's link. netem is not in this
/// kernel; nftables drops at the client interface's ingress and egress
/// hooks, so a lost ACK is lost before the server's XDP and TC programs
/// could answer it (they run before its own netfilter). An egress drop is
/// not reported to the sending socket, as on a real network (an output-hook
/// drop would fail its sendto() with EPERM).
fn drop_five_percent_of_udp(served: &common::Served, scratch: &Path) {
    let rules = "table netdev loss {
        chain arriving { type filter hook ingress device \"eth0\" priority 0; meta l4proto udp numgen random mod 100 < 5 drop; }
        chain leaving { type filter hook egress device \"eth0\" priority 0; meta l4proto udp numgen random mod 100 < 5 drop; }
    }";
    let rules_file = scratch.join("loss.nft");
    std::fs::write(&rules_file, rules).unwrap();
    run_ok(&served.client, "nft", &["-f", rules_file.to_str().unwrap()]);
}

/// The kernel tiers' share of a run, from pxed's log: blocks sent by XDP and
/// by TC over all completed transfers.
fn kernel_blocks(log: &str) -> (u64, u64) {
    let sum = |field| pxe_lab::sum_logged(log, "TFTP transfer completed", field);
    (sum("kernel_xdp"), sum("kernel_tc"))
}

#[test]
fn with_the_kernel_tiers_on_real_clients_get_byte_exact_files_served_by_the_kernel() {
    if !pxe_lab::privileged(
        "with_the_kernel_tiers_on_real_clients_get_byte_exact_files_served_by_the_kernel",
    ) || !have_tool("curl", "curl")
        || !have_tool("tftp", "tftp-hpa")
    {
        return;
    }
    // Default attach: XDP native on veth (no tailroom there, so TC builds the blocks).
    let (_root, files, served) = serve_boot_files(&["--dhcp", "off", "--fastpath-memory", "16"]);
    let out = tempfile::tempdir().unwrap();
    for (name, bytes) in files.iter().filter(|(name, _)| *name != "empty") {
        for blksize in ["1468", "1432", "512"] {
            let dest = out.path().join(format!("{name}-{blksize}"));
            run_ok(
                &served.client,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "60",
                    "--tftp-blksize",
                    blksize,
                    "-o",
                    dest.to_str().unwrap(),
                    &format!("tftp://{SERVER_IP}/{name}"),
                ],
            );
            assert_same(
                &dest,
                bytes,
                &format!("curl blksize {blksize} {name}, kernel tiers on"),
            );
        }
        let dest = out.path().join(format!("{name}-hpa"));
        tftp_hpa_get(&served, name, &dest);
        assert_same(&dest, bytes, &format!("tftp-hpa {name}, kernel tiers on"));
    }
    let (xdp, tc) = kernel_blocks(&served.log());
    // The 1 MiB kernel alone is ~2,000 blocks at 512; nearly all must come from the kernel.
    assert!(
        xdp + tc > 2_000,
        "blocks sent by the kernel tiers: XDP {xdp}, TC {tc}\n{}",
        served.log()
    );
}

#[test]
fn with_the_kernel_tiers_on_transfers_survive_five_percent_loss() {
    if !pxe_lab::privileged("with_the_kernel_tiers_on_transfers_survive_five_percent_loss")
        || !have_tool("curl", "curl")
        || !have_tool("nft", "nftables")
    {
        return;
    }
    let (root, files, served) = serve_boot_files(&["--dhcp", "off", "--fastpath-memory", "16"]);
    drop_five_percent_of_udp(&served, root.path());
    let out = tempfile::tempdir().unwrap();
    for (name, bytes) in files.iter().filter(|(name, _)| *name != "empty") {
        let dest = out.path().join(name);
        run_ok(
            &served.client,
            "curl",
            &[
                "-sS",
                "--max-time",
                "120",
                "--tftp-blksize",
                "1468",
                "-o",
                dest.to_str().unwrap(),
                &format!("tftp://{SERVER_IP}/{name}"),
            ],
        );
        assert_same(&dest, bytes, &format!("{name} under loss, kernel tiers on"));
    }
    let log = served.log();
    let (xdp, tc) = kernel_blocks(&log);
    assert!(xdp + tc > 0, "the kernel served blocks despite the loss");
    assert!(
        pxe_lab::sum_logged(&log, "TFTP transfer completed", "retransmits") > 0,
        "pxed repaired losses itself, the client's timeout did not have to\n{log}"
    );
}

#[test]
fn with_the_kernel_tiers_on_windowed_transfers_are_sent_by_tc_byte_exact_also_under_loss() {
    if !pxe_lab::privileged(
        "with_the_kernel_tiers_on_windowed_transfers_are_sent_by_tc_byte_exact_also_under_loss",
    ) || !have_tool("atftp", "atftp")
        || !have_tool("nft", "nftables")
    {
        return;
    }
    let (root, files, served) = serve_boot_files(&["--dhcp", "off", "--fastpath-memory", "16"]);
    let out = tempfile::tempdir().unwrap();
    let kernel = files.iter().find(|(name, _)| *name == "kernel").unwrap();
    // UEFI's request (blksize 1468, windowsize 4) and a wider window.
    for window in ["4", "8"] {
        let dest = out.path().join(format!("kernel-w{window}"));
        let window_option = format!("windowsize {window}");
        atftp_get(&served, kernel.0, &dest, &window_option);
        assert_same(
            &dest,
            &kernel.1,
            &format!("atftp window {window}, kernel tiers on"),
        );
    }
    // atftp is done once it has the last block; pxed logs the transfer when
    // the final ACK reaches it, a moment later.
    served.wait_for_log_count(
        "TFTP transfer completed",
        2,
        std::time::Duration::from_secs(10),
    );
    let (xdp, tc) = kernel_blocks(&served.log());
    // 2 × 715 blocks; all but the first and the last window of each are the kernel's, all from TC.
    assert!(
        tc > 1_300 && xdp == 0,
        "blocks sent by the kernel tiers: XDP {xdp}, TC {tc}\n{}",
        served.log()
    );

    drop_five_percent_of_udp(&served, root.path());
    let dest = out.path().join("kernel-lossy");
    let args = [
        "--get",
        "-r",
        kernel.0,
        "-l",
        dest.to_str().unwrap(),
        "--option",
        "blksize 1468",
        "--option",
        "windowsize 4",
        SERVER_IP,
    ];
    // atftp aborts ("unexpected OACK") when its ACK of the OACK is lost and
    // the server resends the OACK, instead of acknowledging it again (RFC
    // 2347 clients do): a client flaw that 5% loss hits now and then, and not
    // what this test is about. Such a run is tried again; any other failure fails.
    for attempt in 1.. {
        let out = served.client.output("atftp", &args).unwrap();
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("unexpected OACK") && attempt < 4,
            "atftp {args:?} failed ({}), attempt {attempt}:\n{stderr}",
            out.status
        );
    }
    assert_same(
        &dest,
        &kernel.1,
        "atftp window 4 under 5% loss, kernel tiers on",
    );
}

/// The client's firewall lets in only UDP from port 69, as a NAT or a
/// firewall in front of a BMC across subnets does: without
/// `--tftp-single-port` a transfer's DATA (from a fresh port) never
/// arrives; with it, curl, tftp-hpa and atftp (windowed) get every file
/// byte-exact, the kernel tiers serve the blocks, and so they do under 5%
/// loss each way.
#[test]
fn with_one_port_transfers_pass_a_firewall_that_admits_only_port_69() {
    if !pxe_lab::privileged("with_one_port_transfers_pass_a_firewall_that_admits_only_port_69")
        || !have_tool("curl", "curl")
        || !have_tool("tftp", "tftp-hpa")
        || !have_tool("atftp", "atftp")
        || !have_tool("nft", "nftables")
    {
        return;
    }
    let admit_only_port_69 = |served: &common::Served, scratch: &Path| {
        let rules = "table netdev only69 {
            chain arriving { type filter hook ingress device \"eth0\" priority -1; udp sport != 69 drop; }
        }";
        let rules_file = scratch.join("only69.nft");
        std::fs::write(&rules_file, rules).unwrap();
        run_ok(&served.client, "nft", &["-f", rules_file.to_str().unwrap()]);
    };
    let curl = |served: &common::Served, dest: &Path, name: &str, seconds: &str| {
        served
            .client
            .output(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    seconds,
                    "--tftp-blksize",
                    "1468",
                    "-o",
                    dest.to_str().unwrap(),
                    &format!("tftp://{SERVER_IP}/{name}"),
                ],
            )
            .unwrap()
    };
    let out = tempfile::tempdir().unwrap();
    {
        let (root, _files, served) = serve_boot_files(&["--dhcp", "off"]);
        admit_only_port_69(&served, root.path());
        let tried = curl(&served, &out.path().join("blocked"), "blocks-1468x6", "4");
        assert!(
            !tried.status.success(),
            "a fresh port per transfer does not pass the firewall"
        );
    }

    let (root, files, served) = serve_boot_files(&[
        "--dhcp",
        "off",
        "--fastpath-memory",
        "16",
        "--tftp-single-port",
    ]);
    admit_only_port_69(&served, root.path());
    let mut transfers = 0;
    for (name, bytes) in files.iter().filter(|(name, _)| *name != "empty") {
        let dest = out.path().join(format!("{name}-curl"));
        let got = curl(&served, &dest, name, "60");
        assert!(
            got.status.success(),
            "curl {name}: {}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert_same(&dest, bytes, &format!("curl {name}, one port"));
        let dest = out.path().join(format!("{name}-hpa"));
        tftp_hpa_get(&served, name, &dest);
        assert_same(&dest, bytes, &format!("tftp-hpa {name}, one port"));
        transfers += 2;
    }
    let kernel = files.iter().find(|(name, _)| *name == "kernel").unwrap();
    let dest = out.path().join("kernel-atftp");
    atftp_get(&served, kernel.0, &dest, "windowsize 8");
    assert_same(&dest, &kernel.1, "atftp window 8, one port");
    transfers += 1;
    served.wait_for_log_count(
        "TFTP transfer completed",
        transfers,
        std::time::Duration::from_secs(10),
    );
    let (xdp, tc) = kernel_blocks(&served.log());
    assert!(
        xdp + tc > 1_000,
        "the kernel tiers served transfers on port 69: XDP {xdp}, TC {tc}\n{}",
        served.log()
    );

    drop_five_percent_of_udp(&served, root.path());
    for attempt in ["a", "b"] {
        let dest = out.path().join(format!("kernel-lossy-{attempt}"));
        let got = curl(&served, &dest, kernel.0, "120");
        assert!(
            got.status.success(),
            "curl under loss: {}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert_same(&dest, &kernel.1, "curl under 5% loss, one port");
    }
}

/// atftp answers a resent window whose blocks it already has with one extra
/// ACK, then ignores those blocks for as long as they keep coming: it
/// acknowledges again only when its own 5 s timer fires, which every block
/// it ignores restarts. Here its ACK of a window and that one extra ACK are
/// both lost (at 5% loss each way, about one transfer in three meets this).
/// pxed's backoff must grow past the client's timer before it gives up, or
/// the transfer stalls until the stall limit with both sides waiting.
#[test]
fn a_client_that_re_acknowledges_a_resent_window_only_once_still_completes() {
    if !pxe_lab::privileged(
        "a_client_that_re_acknowledges_a_resent_window_only_once_still_completes",
    ) || !have_tool("atftp", "atftp")
        || !have_tool("nft", "nftables")
    {
        return;
    }
    let (root, files, served) = serve_boot_files(&["--dhcp", "off", "--fastpath-memory", "16"]);
    let kernel = files.iter().find(|(name, _)| *name == "kernel").unwrap();
    // ACK (opcode 4) of block 100, the end of a window of 4: the first two
    // are dropped as they leave the client, the counter says when.
    let rules = "table netdev ackloss {
        counter dropped { }
        chain leaving { type filter hook egress device \"eth0\" priority 0; meta l4proto udp @th,64,32 0x00040064 counter name \"dropped\" drop; }
    }";
    let rules_file = root.path().join("ackloss.nft");
    std::fs::write(&rules_file, rules).unwrap();
    run_ok(&served.client, "nft", &["-f", rules_file.to_str().unwrap()]);

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("kernel");
    let mut atftp = served
        .client
        .command(
            "atftp",
            &[
                "--get",
                "-r",
                kernel.0,
                "-l",
                dest.to_str().unwrap(),
                "--option",
                "blksize 1468",
                "--option",
                "windowsize 4",
                SERVER_IP,
            ],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dropped = || {
        let listed = served
            .client
            .output("nft", &["list", "counter", "netdev", "ackloss", "dropped"])
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        listed.contains("packets 2 ")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dropped() {
        assert!(
            std::time::Instant::now() < deadline,
            "atftp's two ACKs of block 100 never left it"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    run_ok(
        &served.client,
        "nft",
        &["delete", "table", "netdev", "ackloss"],
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while atftp.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            atftp.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let finished = atftp.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&finished.stderr);
    assert!(
        finished.status.success(),
        "atftp failed ({}):\n{stderr}\n{}",
        finished.status,
        served.log()
    );
    assert!(
        stderr.contains("sending extra ACK for <block: 100>")
            && stderr.contains("timeout: retrying"),
        "atftp met the case: one extra ACK, then its own timeout\n{stderr}"
    );
    assert_same(&dest, &kernel.1, "atftp after losing both ACKs of a window");
}

/// A Raspberry Pi asks for its files under its serial number: a Pi whose
/// directory holds the file gets that one, any other Pi the root's (curl,
/// byte exact, kernel tiers on).
#[test]
fn a_pi_gets_its_own_files_under_its_serial_or_else_the_roots() {
    if !pxe_lab::privileged("a_pi_gets_its_own_files_under_its_serial_or_else_the_roots")
        || !have_tool("curl", "curl")
    {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let shared: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let own = b"config for one Pi\n".to_vec();
    std::fs::write(root.path().join("start4.elf"), &shared).unwrap();
    std::fs::write(root.path().join("config.txt"), b"shared config\n").unwrap();
    std::fs::create_dir(root.path().join("dca63201")).unwrap();
    std::fs::write(root.path().join("dca63201/config.txt"), &own).unwrap();
    let served = serve_tftp(root.path(), &[]);
    let out = tempfile::tempdir().unwrap();
    for (path, want) in [
        ("dca63201/config.txt", &own),
        ("dca63201/start4.elf", &shared),
        ("1a2b3c4d/start4.elf", &shared),
    ] {
        let dest = out.path().join(path.replace('/', "-"));
        let url = format!("tftp://{SERVER_IP}/{path}");
        run_ok(
            &served.client,
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-o",
                dest.to_str().unwrap(),
                &url,
            ],
        );
        assert_same(&dest, want, path);
    }
}
