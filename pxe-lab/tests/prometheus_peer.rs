//! The Prometheus peer against a tiny exporter in a lab: a scrape that needs
//! a bearer token lands in queries, one without the token is reported down,
//! and promtool tells a valid exposition from an invalid one.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use pxe_lab::{
    peers::{promtool_check_metrics, Prometheus},
    Lab, CLIENT_CIDR,
};

const TOKEN: &str = "lab-token-1";

const EXPOSITION: &str = "\
# HELP lab_requests_total Requests the exporter counted.
# TYPE lab_requests_total counter
lab_requests_total{kind=\"dhcp\"} 42
# HELP lab_temperature_celsius A gauge.
# TYPE lab_temperature_celsius gauge
lab_temperature_celsius 21.5
";

/// Serves [`EXPOSITION`] on `/metrics` to requests carrying [`TOKEN`], 401
/// to the rest, until dropped.
struct Exporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// `listener` was bound inside a namespace; the socket stays there
    /// whichever thread serves it.
    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    let mut authorized = false;
    let _ = reader.read_line(&mut request_line);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            authorized |= name.eq_ignore_ascii_case("authorization")
                && value.trim() == format!("Bearer {TOKEN}");
        }
    }
    let (status, body) = match (request_line.starts_with("GET /metrics "), authorized) {
        (true, true) => ("200 OK", EXPOSITION),
        (true, false) => ("401 Unauthorized", "no token\n"),
        (false, _) => ("404 Not Found", "no such page\n"),
    };
    let _ = write!(
        &stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn prometheus_scrapes_a_lab_exporter_with_a_bearer_token() {
    if !pxe_lab::privileged("prometheus_scrapes_a_lab_exporter_with_a_bearer_token")
        || !pxe_lab::have_file("/usr/bin/prometheus", "prometheus")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let pair = lab.pair().client_addr(CLIENT_CIDR).build().unwrap();
    let listener = pair
        .server
        .run(|| TcpListener::bind("198.18.0.1:0"))
        .unwrap()
        .unwrap();
    let exporter = Exporter::serve(listener);

    // The scraper with the token across the link, one without it beside
    // the exporter.
    let with_token = tempfile::tempdir().unwrap();
    let without_token = tempfile::tempdir().unwrap();
    let scraper = Prometheus::start(
        &lab,
        &pair.client,
        with_token.path(),
        exporter.addr,
        "/metrics",
        Some(TOKEN),
    )
    .unwrap();
    let refused = Prometheus::start(
        &lab,
        &pair.server,
        without_token.path(),
        exporter.addr,
        "/metrics",
        None,
    )
    .unwrap();

    let timeout = Duration::from_secs(10);
    let up = format!("up{{job=\"{}\"}}", Prometheus::JOB);
    scraper.wait_for(&up, |v| v == 1.0, timeout).unwrap();
    let samples = scraper.query("lab_requests_total").unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    let (labels, value) = &samples[0];
    assert_eq!(value, &42.0);
    assert_eq!(labels["kind"], "dhcp");
    assert_eq!(labels["instance"], exporter.addr.to_string());
    let gauge = scraper.wait_for("lab_temperature_celsius", |_| true, timeout);
    assert_eq!(gauge.unwrap(), 21.5);
    let targets = scraper.targets().unwrap();
    assert!(targets.len() == 1 && targets[0].is_up(), "{targets:?}");

    refused.wait_for(&up, |v| v == 0.0, timeout).unwrap();
    let targets = refused.targets().unwrap();
    assert!(
        targets.len() == 1 && !targets[0].is_up() && targets[0].last_error.contains("401"),
        "{targets:?}"
    );
}

#[test]
fn promtool_accepts_a_valid_exposition_and_rejects_invalid_ones() {
    if !pxe_lab::have_file("/usr/bin/promtool", "prometheus") {
        return;
    }
    promtool_check_metrics(EXPOSITION).unwrap();
    let bad_value = "# HELP lab_x_total X.\n# TYPE lab_x_total counter\nlab_x_total forty-two\n";
    let duplicate_help =
        "# HELP lab_y_total Y.\n# HELP lab_y_total Y again.\n# TYPE lab_y_total counter\nlab_y_total 1\n";
    for (invalid, why) in [
        (bad_value, "expected float"),
        (duplicate_help, "second HELP"),
    ] {
        let err = promtool_check_metrics(invalid).unwrap_err().to_string();
        assert!(err.contains(why), "{invalid}: {err}");
    }
}
