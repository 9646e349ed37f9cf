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
