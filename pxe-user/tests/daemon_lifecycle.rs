//! The real `pxed` binary in a throwaway namespace: it attaches, it detaches on
//! SIGTERM and SIGINT, nothing stays attached after SIGKILL, and its errors
//! say what is wrong. Needs root.

use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use pxe_lab::{Lab, Netns};

mod common;

const PXED: &str = env!("CARGO_BIN_EXE_pxed");

fn lab() -> (Lab, Netns) {
    let lab = Lab::new().expect("creating the lab");
    let pxe_lab::Pair { server, .. } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    (lab, server)
}

fn xdp_attached(ns: &Netns) -> bool {
    let out = ns.output("ip", &["link", "show", "eth0"]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn tcx_programs(ns: &Netns) -> usize {
    ns.run(|| {
        SchedClassifier::query_tcx("eth0", TcAttachType::Ingress)
            .map(|(_, p)| p.len())
            .unwrap_or(0)
    })
    .unwrap()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(50));
    }
}

fn start(lab: &Lab, ns: &Netns) -> u32 {
    let pid = lab
        .spawn(ns, PXED, &["--interface", "eth0"])
        .expect("starting pxed");
    wait_until("pxed attached XDP", || xdp_attached(ns));
    wait_until("pxed attached TC", || tcx_programs(ns) == 1);
    pid
}

fn stop_with(lab: &Lab, pid: u32, signal: Signal) -> std::process::ExitStatus {
    kill(Pid::from_raw(pid as i32), signal).expect("signalling pxed");
    let mut child = lab.take_child(pid).expect("pxed is our child");
    child.wait().expect("waiting for pxed")
}

#[test]
fn sigterm_and_sigint_detach_everything_and_exit_cleanly() {
    if !pxe_lab::privileged("sigterm_and_sigint_detach_everything_and_exit_cleanly") {
        return;
    }
    let (lab, server) = lab();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let pid = start(&lab, &server);
        let status = stop_with(&lab, pid, signal);
        assert!(status.success(), "pxed exits 0 on {signal}: {status}");
        assert!(!xdp_attached(&server), "XDP still attached after {signal}");
        assert_eq!(tcx_programs(&server), 0, "TC still attached after {signal}");
    }
}

#[test]
fn sigkill_leaves_no_program_attached() {
    if !pxe_lab::privileged("sigkill_leaves_no_program_attached") {
        return;
    }
    let (lab, server) = lab();
    let pid = start(&lab, &server);
    let status = stop_with(&lab, pid, Signal::SIGKILL);
    assert!(!status.success());
    // The links die with the last file descriptor; the kernel releases them
    // asynchronously, so give it a moment.
    wait_until("XDP is detached after SIGKILL", || !xdp_attached(&server));
    wait_until("TC is detached after SIGKILL", || {
        tcx_programs(&server) == 0
    });
    // A killed pxed cannot remove its copy of the iPXE binaries (the next
    // pxed sweeps it); this test removes what it made pxed leave.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("pxed-ipxe-{pid}")));
}

#[test]
fn a_missing_interface_is_a_clear_error() {
    if !pxe_lab::privileged("a_missing_interface_is_a_clear_error") {
        return;
    }
    let (_lab, server) = lab();
    let out = server.output(PXED, &["--interface", "eth9"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no interface named \"eth9\""), "{stderr}");
}

#[test]
fn flags_that_name_no_served_network_are_clear_errors() {
    if !pxe_lab::privileged("flags_that_name_no_served_network_are_clear_errors") {
        return;
    }
    let (_lab, server) = lab();
    let leases = tempfile::tempdir().unwrap();
    let lease_file = leases.path().join("leases.redb");
    let lease_file = lease_file.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["-i", "eth0", "-i", "eth0"],
            "--interface eth0 is given twice",
        ),
        (
            &[
                "-i",
                "eth0",
                "--dhcp",
                "full",
                "--range",
                "10.9.0.10-10.9.0.20",
                "--lease-file",
                lease_file,
            ],
            "is not inside the network of any interface served (eth0 198.18.0.0/24)",
        ),
        (
            &[
                "-i",
                "eth0",
                "--dhcp",
                "full",
                "--range",
                "198.18.0.10-198.18.0.20",
                "--router",
                "10.9.0.1",
                "--lease-file",
                lease_file,
            ],
            "--router 10.9.0.1 is not on the network of any interface served",
        ),
    ];
    for (args, needle) in cases {
        let out = server.output(PXED, args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?} should say {needle:?}: {stderr}"
        );
    }
}

#[test]
fn without_privileges_pxed_says_it_needs_root() {
    if !pxe_lab::privileged("without_privileges_pxed_says_it_needs_root") {
        return;
    }
    // setpriv (util-linux) drops to nobody with no capabilities at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .args([PXED, "--interface", "lo"])
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pxed needs root"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
}

/// `--check-config --explain` on the shipped example: each sample lands in
/// the class, profile and options the example's comments promise.
#[test]
fn check_config_explains_what_sample_requests_would_get() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/pxed.example.toml");
    let out = Command::new(PXED)
        .args(["--config", example, "--check-config"])
        .args([
            "--explain",
            "52:54:00:77:00:01,uefi-x64,vendor_class=PXEClient:Arch:00007:UNDI:003000",
            "--explain",
            "52:54:00:12:34:56,uefi-x64,relay=198.18.0.2,circuit_id=Gi1/0/7,remote_id=00:1a:2b:3c:4d:5e",
            "--explain",
            "52:54:00:12:34:56,uefi-x64,relay=198.18.0.2,circuit_id=Gi1/0/8",
            "--explain",
            "52:54:00:12:34:57,bios",
            "--explain",
            "aa:bb:cc:00:00:01,user_class=iPXE,arch=7",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        6,
        "the summary, then one line per sample:\n{text}"
    );
    let has = |line: usize, parts: &[&str]| {
        for part in parts {
            assert!(
                lines[line].contains(part),
                "line {line} lacks {part:?}:\n{}",
                lines[line]
            );
        }
    };
    has(
        1,
        &[
            "(uefi-x64, pxe)",
            "class \"lab-uefi\"",
            "profile \"rescue\"",
            "42 ntp-servers = 198.18.0.77 (if asked)",
            "252 wpad = \"http://198.18.0.1/wpad.dat\" (always)",
        ],
    );
    has(
        2,
        &[
            "class \"rack-12-port-7\"",
            "with subnet 198.18.0.0/24's",
            "119 domain-search = r12.example.net",
        ],
    );
    has(3, &["no class", "119 domain-search = lab.example"]);
    has(4, &["netboot = false: told to boot from its disk"]);
    has(
        5,
        &[
            "(uefi-x64, ipxe)",
            "profile \"default\"",
            "boot URL \"http://<pxed>",
        ],
    );

    let bad = Command::new(PXED)
        .args([
            "--config",
            example,
            "--check-config",
            "--explain",
            "52:54:00:12:34:56,relay=10.0.0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("relay \"10.0.0\" is not an IPv4 address"),
        "{stderr}"
    );
}

#[test]
fn help_explains_the_xdp_modes() {
    let out = Command::new(PXED).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in [
        "--interface",
        "--xdp-mode",
        "auto",
        "native",
        "generic",
        "off",
        "--no-tc",
    ] {
        assert!(help.contains(word), "--help mentions {word}:\n{help}");
    }
}

#[test]
fn with_only_an_interface_pxed_serves_the_ipxe_binaries_it_finds() {
    if !pxe_lab::privileged("with_only_an_interface_pxed_serves_the_ipxe_binaries_it_finds") {
        return;
    }
    let Ok(want) = std::fs::read("/usr/lib/ipxe/ipxe.efi") else {
        assert!(
            std::env::var_os(pxe_lab::REQUIRE_PRIVILEGED_TESTS).is_none(),
            "package ipxe is missing"
        );
        return;
    };
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("pxed.log");
    lab.spawn_logged(&server, PXED, &["--interface", "eth0"], &log)
        .unwrap();
    assert!(
        server.wait_for_udp_port(69, Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let dest = work.path().join("ipxe.efi");
    let out = client
        .output(
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-o",
                dest.to_str().unwrap(),
                "tftp://198.18.0.1/ipxe.efi",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&dest).unwrap() == want,
        "the system's ipxe.efi, byte-exact"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("serving the iPXE binaries found in /usr/lib/ipxe"),
        "{text}"
    );
    assert!(text.contains("mode=Proxy"), "proxy mode by default: {text}");
}

/// A system user of the test's own, removed when dropped (also on failure).
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn create() -> Self {
        let name = format!("pxedt{}", std::process::id() % 100_000);
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .expect("running useradd");
        assert!(status.success(), "useradd {name}");
        let uid = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("just created")
            .uid
            .as_raw();
        Self { name, uid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A line of /proc/PID/task/TID/status, after its label.
fn status_field<'a>(status: &'a str, label: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label} in {status}"))
}

/// `--user`: once attached and bound, every thread of pxed runs as that user
/// with exactly CAP_BPF and CAP_NET_ADMIN (effective, permitted and
/// bounding); it still leases (its lease file is the user's now) and serves
/// TFTP, reloads its config on SIGHUP, and detaches its programs on SIGTERM.
#[test]
fn as_its_own_user_pxed_keeps_two_capabilities_in_every_thread_and_still_serves() {
    if !pxe_lab::privileged(
        "as_its_own_user_pxed_keeps_two_capabilities_in_every_thread_and_still_serves",
    ) || !common::have_tool("busybox", "busybox")
        || !common::have_tool("curl", "curl")
    {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let user = TestUser::create();
    // Readable by the user, as an operator's boot root and config are.
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    for dir in [root.path(), work.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nbp = common::patterned(70_000, 3);
    std::fs::write(root.path().join("ipxe.efi"), &nbp).unwrap();
    let config = work.path().join("pxed.toml");
    std::fs::write(
        &config,
        "default_profile = \"default\"\n[[profile]]\nname = \"default\"\n",
    )
    .unwrap();
    let leases = work.path().join("leases.redb");
    let served = common::serve_tftp(
        root.path(),
        &[
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--lease-file",
            leases.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--user",
            &user.name,
        ],
    );
    served.wait_for_log("running as", Duration::from_secs(20));

    let kept = (1u64 << 39) | (1 << 12); // CAP_BPF, CAP_NET_ADMIN
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", served.pid))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tasks.len() > 2, "a multi-threaded daemon: {tasks:?}");
    for task in &tasks {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let uid = user.uid.to_string();
        assert_eq!(
            status_field(&status, "Uid:")
                .split_whitespace()
                .collect::<Vec<_>>(),
            [uid.as_str(); 4],
            "{}",
            task.display()
        );
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                u64::from_str_radix(status_field(&status, set), 16).unwrap(),
                kept,
                "{set} of {}",
                task.display()
            );
        }
        assert_eq!(status_field(&status, "CapInh:"), "0000000000000000");
    }
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&leases).unwrap());
    assert_eq!(owner, user.uid, "the lease file is the user's");

    // Still serving: a lease (written to the user's file), a boot file.
    let dir = tempfile::tempdir().unwrap();
    let (_udhcpc, out) = common::start_udhcpc(&served, dir.path());
    let ip = common::udhcpc_lease(&out);
    let fetched = dir.path().join("ipxe.efi");
    common::run_ok(
        &served.client,
        "curl",
        &[
            "-sS",
            "--max-time",
            "20",
            "-o",
            fetched.to_str().unwrap(),
            "tftp://198.18.0.1/ipxe.efi",
        ],
    );
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        nbp,
        "byte-exact from {ip}"
    );

    // SIGHUP reads the config again, as the user.
    kill(Pid::from_raw(served.pid as i32), Signal::SIGHUP).unwrap();
    served.wait_for_log("SIGHUP: config reloaded", Duration::from_secs(10));

    // SIGTERM: the programs come off the interface.
    let status = stop_with(&served.lab, served.pid, Signal::SIGTERM);
    assert!(status.success(), "{status}\n{}", served.log());
    assert!(!xdp_attached(&served.server), "{}", served.log());
    assert_eq!(tcx_programs(&served.server), 0, "{}", served.log());
    assert!(served.log().contains("programs detached; bye"));
}

/// Under systemd (`Type=notify`): pxed says READY=1 once it serves,
/// RELOADING=1 then READY=1 around a SIGHUP, and STOPPING=1 on SIGTERM, on
/// the socket `$NOTIFY_SOCKET` names.
#[test]
fn with_a_notify_socket_pxed_tells_systemd_ready_reloading_and_stopping() {
    if !pxe_lab::privileged("with_a_notify_socket_pxed_tells_systemd_ready_reloading_and_stopping")
    {
        return;
    }
    let (lab, ns) = lab();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notice within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let env = format!("NOTIFY_SOCKET={}", socket_path.display());
    let pid = lab
        .spawn(&ns, "env", &[&env, PXED, "--interface", "eth0"])
        .expect("starting pxed");
    assert_eq!(next(), "READY=1");
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    let status = stop_with(&lab, pid, Signal::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert!(status.success(), "{status}");
}
