//! HTTP boot against the real `pxed` with curl: whole and ranged downloads are
//! byte-exact, validators work, per-machine iPXE scripts say what the config
//! says, and nothing outside the boot root is served. Needs root and curl.

mod common;

use std::{os::unix::fs::symlink, time::Duration};

use common::{have_tool, patterned, serve_tftp, Served, SERVER_IP};

const CONFIG: &str = r#"
default_profile = "default"

[[profile]]
name = "default"
cmdline = "console=ttyS0"

[[profile]]
name = "rescue"
kernel = "rescue/vmlinuz"
ipxe_script = """
#!ipxe
echo rescue for {{hostname}} {{mac}} {{arch}} uuid={{uuid}}
kernel {{http}}/{{kernel}} BOOTIF=${net0/mac}
boot
"""

[[machine]]
mac = "52:54:00:00:00:01"
profile = "rescue"
hostname = "node1"

[[machine]]
mac = "52:54:00:00:00:02"
netboot = false
"#;

fn kernel() -> Vec<u8> {
    patterned(1_048_576 + 37, 11)
}

fn start() -> Option<(tempfile::TempDir, Served)> {
    if !pxe_lab::privileged("interop_http") || !have_tool("curl", "curl") {
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("vmlinuz"), kernel()).unwrap();
    std::fs::create_dir(root.path().join("rescue")).unwrap();
    std::fs::write(root.path().join("rescue/vmlinuz"), b"rescue kernel").unwrap();
    symlink("/etc/passwd", root.path().join("passwd-link")).unwrap();
    let config = root.path().join("pxed.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let served = serve_tftp(
        root.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--xdp-mode",
            "off",
            "--no-tc",
        ],
    );
    assert!(
        served.server.wait_for_tcp_port(80, Duration::from_secs(20)),
        "HTTP did not come up"
    );
    Some((root, served))
}

/// Runs curl in the client namespace; returns (HTTP status, body, headers).
fn curl(served: &Served, args: &[&str]) -> (u16, Vec<u8>, String) {
    let out = tempfile::tempdir().unwrap();
    let body = out.path().join("body");
    let headers = out.path().join("headers");
    let mut full = vec![
        "-sS",
        "--max-time",
        "30",
        "-o",
        body.to_str().unwrap(),
        "-D",
        headers.to_str().unwrap(),
        "-w",
        "%{http_code}",
    ];
    full.extend_from_slice(args);
    let run = served.client.output("curl", &full).unwrap();
    assert!(
        run.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let status = String::from_utf8_lossy(&run.stdout).trim().parse().unwrap();
    (
        status,
        std::fs::read(body).unwrap_or_default(),
        std::fs::read_to_string(headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}

fn url(path: &str) -> String {
    format!("http://{SERVER_IP}{path}")
}

fn header<'h>(headers: &'h str, name: &str) -> Option<&'h str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[test]
fn whole_ranged_and_conditional_downloads_are_byte_exact() {
    let Some((_root, served)) = start() else {
        return;
    };
    let k = kernel();

    let (status, body, headers) = curl(&served, &[&url("/vmlinuz")]);
    assert_eq!(status, 200);
    assert!(body == k, "whole file byte-exact");
    assert_eq!(
        header(&headers, "content-length"),
        Some(k.len().to_string().as_str())
    );
    assert_eq!(header(&headers, "accept-ranges"), Some("bytes"));
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    assert!(header(&headers, "last-modified").is_some());

    // curl -I writes the headers where the body would go.
    let (status, _, headers) = curl(&served, &["-I", &url("/vmlinuz")]);
    assert_eq!(status, 200, "HEAD");
    assert_eq!(
        header(&headers, "content-length"),
        Some(k.len().to_string().as_str())
    );

    for (range, want) in [
        ("100-1099", &k[100..1100]),
        ("0-0", &k[..1]),
        ("1048000-", &k[1_048_000..]),
    ] {
        let (status, body, headers) = curl(&served, &["-r", range, &url("/vmlinuz")]);
        assert_eq!(status, 206, "range {range}");
        assert!(body == want, "range {range} byte-exact");
        assert!(header(&headers, "content-range")
            .is_some_and(|v| v.ends_with(&format!("/{}", k.len()))));
    }
    let (status, body, _) = curl(&served, &["-H", "Range: bytes=-500", &url("/vmlinuz")]);
    assert_eq!(
        (status, body.as_slice()),
        (206, &k[k.len() - 500..]),
        "suffix range"
    );
    let (status, _, headers) = curl(&served, &["-r", "99999999-", &url("/vmlinuz")]);
    assert_eq!(status, 416);
    assert_eq!(
        header(&headers, "content-range"),
        Some(format!("bytes */{}", k.len()).as_str())
    );

    let (status, body, _) = curl(
        &served,
        &["-H", &format!("If-None-Match: {etag}"), &url("/vmlinuz")],
    );
    assert_eq!((status, body.len()), (304, 0));
    let (status, body, _) = curl(
        &served,
        &["-H", "If-Range: \"stale\"", "-r", "0-9", &url("/vmlinuz")],
    );
    assert_eq!(status, 200, "a stale If-Range gets the whole file");
    assert!(body == k);
}

#[test]
fn ipxe_scripts_follow_the_config_per_machine() {
    let Some((_root, served)) = start() else {
        return;
    };
    let (status, body, headers) = curl(
        &served,
        &[&url(
            "/boot.ipxe?mac=52:54:00:00:00:01&arch=uefi-x64&uuid=abcd",
        )],
    );
    let script = String::from_utf8(body).unwrap();
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").is_some_and(|v| v.starts_with("text/plain")));
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(
        script.contains("echo rescue for node1 52:54:00:00:00:01 uefi-x64 uuid=abcd"),
        "{script}"
    );
    assert!(
        script.contains(&format!(
            "kernel http://{SERVER_IP}/rescue/vmlinuz BOOTIF=${{net0/mac}}"
        )),
        "{script}"
    );

    let (status, body, _) = curl(
        &served,
        &[&url("/boot.ipxe?mac=52-54-00-00-00-09&arch=bios")],
    );
    let script = String::from_utf8(body).unwrap();
    assert_eq!(status, 200);
    assert!(
        script.contains(&format!(
            "kernel http://{SERVER_IP}/vmlinuz?mac=52:54:00:00:00:09 initrd=initrd.img console=ttyS0"
        )),
        "{script}"
    );
    assert!(
        script.contains("52:54:00:00:00:09 (bios) boots profile default"),
        "{script}"
    );

    let (status, body, _) = curl(
        &served,
        &[&url("/boot.ipxe?mac=52:54:00:00:00:02&arch=uefi-x64")],
    );
    let script = String::from_utf8(body).unwrap();
    assert_eq!(status, 200);
    assert!(
        script.contains("exit") && !script.contains("kernel"),
        "a provisioned machine boots locally: {script}"
    );

    let (status, _, _) = curl(&served, &[&url("/boot.ipxe?mac=nonsense")]);
    assert_eq!(status, 400);
}

#[test]
fn nothing_outside_the_boot_root_is_served() {
    let Some((_root, served)) = start() else {
        return;
    };
    for (path, want) in [
        ("/../../etc/passwd", 403),
        ("/%2e%2e/%2e%2e/etc/passwd", 403),
        ("/rescue/..%2f..%2f..%2fetc/passwd", 403),
        ("/..%5c..%5cetc%5cpasswd", 403),
        ("/passwd-link", 403),
        ("/etc/passwd", 404),
        ("/rescue", 403),
        ("/a%00b", 403),
    ] {
        let (status, body, _) = curl(&served, &["--path-as-is", &url(path)]);
        assert_eq!(status, want, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(
            !String::from_utf8_lossy(&body).contains("root:"),
            "{path} leaked /etc/passwd"
        );
    }
    let (status, _, headers) = curl(&served, &["-X", "POST", &url("/vmlinuz")]);
    assert_eq!(status, 405);
    assert_eq!(header(&headers, "allow"), Some("get, head"));
}

#[test]
fn sighup_reloads_a_good_config_and_keeps_serving_on_a_bad_one() {
    let Some((root, served)) = start() else {
        return;
    };
    let config = root.path().join("pxed.toml");
    let script = |served: &Served| {
        let (status, body, _) = curl(
            served,
            &[&url("/boot.ipxe?mac=52:54:00:00:00:07&arch=bios")],
        );
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    };
    assert!(script(&served).contains("boots profile default"));

    let updated = format!("{CONFIG}\n[[machine]]\nmac = \"52:54:00:00:00:07\"\nprofile = \"rescue\"\nhostname = \"node7\"\n");
    std::fs::write(&config, updated).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    served.wait_for_log("SIGHUP: config reloaded", Duration::from_secs(10));
    assert!(
        script(&served).contains("echo rescue for node7"),
        "the new machine entry is in force"
    );

    std::fs::write(&config, "[[machine]]\nmac = \"not a mac\"\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    served.wait_for_log(
        "the new config is refused, the old one keeps serving",
        Duration::from_secs(10),
    );
    assert!(
        served.log().contains("pxed.toml:2:7: machine mac"),
        "the refusal names file, line and key:\n{}",
        served.log()
    );
    assert!(
        script(&served).contains("echo rescue for node7"),
        "the old config still serves"
    );
}
