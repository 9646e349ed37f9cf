//! Other servers the tests and benchmarks run beside or instead of pxed,
//! started the one way that keeps them inside a lab: dnsmasq, and Prometheus
//! as the scraper of pxed's metrics.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Lab, Netns};

/// A dnsmasq command line. [`Dnsmasq::new`] is what every run needs: in the
/// foreground (the lab stops it), no DNS, no system config or PID file, as
/// root (namespaces and raw sockets). The rest says what it serves.
#[derive(Clone, Debug)]
pub struct Dnsmasq {
    args: Vec<String>,
}

impl Default for Dnsmasq {
    fn default() -> Self {
        Self::new()
    }
}

impl Dnsmasq {
    pub fn new() -> Self {
        let base = [
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
        ];
        Self {
            args: base.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Serves only `ifname`, bound to it: another server may hold port 67
    /// on the namespace's other interfaces, or share this one.
    pub fn interface(self, ifname: &str) -> Self {
        self.arg(format!("--interface={ifname}"))
            .arg("--bind-interfaces")
    }

    /// Hands out addresses from `range` (dnsmasq's `--dhcp-range` syntax).
    pub fn dhcp_range(self, range: &str) -> Self {
        self.arg(format!("--dhcp-range={range}"))
    }

    /// Offers without pinging the address first: quicker under load, and a
    /// lab link has nobody else on it to answer.
    pub fn no_ping(self) -> Self {
        self.arg("--no-ping")
    }

    /// Keeps its leases in `path` (a test's own directory), not the system's.
    pub fn lease_file(self, path: &Path) -> Self {
        self.arg(format!("--dhcp-leasefile={}", path.display()))
    }

    /// Logs to stderr, the lab's log file, rather than syslog.
    pub fn log_to_stderr(self) -> Self {
        self.arg("--log-facility=-")
    }

    /// Any other option.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The options, without the program.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Starts it in `ns`, its output appended to `log`; returns its PID.
    pub fn spawn(&self, lab: &Lab, ns: &Netns, log: &Path) -> io::Result<u32> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        lab.spawn_logged(ns, "dnsmasq", &args, log)
    }
}

/// A Prometheus server scraping one target, run inside a lab namespace (never
/// the system's service: Debian's `prometheus` package brings the binaries).
/// Its web API listens on [`Prometheus::WEB`] inside that namespace only;
/// every query reaches it from there. Dropping it kills the process.
pub struct Prometheus {
    ns: Netns,
    child: Child,
    log: PathBuf,
}

/// One scrape target as `/api/v1/targets` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScrapeTarget {
    pub scrape_url: String,
    /// `up`, `down`, or `unknown` before the first scrape.
    pub health: String,
    /// Why the last scrape failed; empty when it did not.
    pub last_error: String,
}

impl ScrapeTarget {
    pub fn is_up(&self) -> bool {
        self.health == "up"
    }
}

impl Prometheus {
    /// Where the web API listens, in the server's namespace. Loopback: each
    /// namespace has its own, so every lab can use the same port.
    pub const WEB: &'static str = "127.0.0.1:9090";
    /// The `job` label of the one target.
    pub const JOB: &'static str = "lab";
    const READY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Starts Prometheus in `ns` scraping `http://{target}{metrics_path}`
    /// every second, with `bearer_token` as the `Authorization` header when
    /// given. Config, token, database and log go in `dir`. Returns once the
    /// server says it is ready.
    pub fn start(
        lab: &Lab,
        ns: &Netns,
        dir: &Path,
        target: SocketAddr,
        metrics_path: &str,
        bearer_token: Option<&str>,
    ) -> io::Result<Self> {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            scrape_config(dir, target, metrics_path, bearer_token)?,
        )?;
        let log = dir.join("prometheus.log");
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={}", Self::WEB),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = lab.spawn_logged(ns, "prometheus", &args, &log)?;
        // Ours, not the lab's: dropping the server stops it.
        let child = lab
            .take_child(pid)
            .ok_or_else(|| io::Error::other("the lab lost the prometheus it started"))?;
        let mut server = Self {
            ns: ns.clone(),
            child,
            log,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Self::READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("prometheus exited ({status})")));
            }
            if self.get("/-/ready", &[]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "prometheus was not ready within {:?}",
                    Self::READY_TIMEOUT
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query: each sample's labels and value.
    pub fn query(&self, promql: &str) -> io::Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self.api("/api/v1/query", &[("query", promql)])?;
        let result = &data["result"];
        match data["resultType"].as_str() {
            Some("vector") => result
                .as_array()
                .into_iter()
                .flatten()
                .map(|sample| {
                    let labels = sample["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect();
                    Ok((labels, sample_value(&sample["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), sample_value(result)?)]),
            other => Err(io::Error::other(format!(
                "{promql}: result type {other:?}, not a vector or scalar"
            ))),
        }
    }

    /// Polls `promql`, which must return at most one sample, until `holds`
    /// says yes to its value; returns that value. On timeout the error says
    /// the last value seen and what the scrape target's health was.
    pub fn wait_for(
        &self,
        promql: &str,
        holds: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> io::Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql)?.as_slice() {
                [] => "no sample".to_owned(),
                [(_, value)] if holds(*value) => return Ok(*value),
                [(_, value)] => value.to_string(),
                many => {
                    return Err(io::Error::other(format!(
                        "{promql} returned {} samples, not one",
                        many.len()
                    )))
                }
            };
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "after {timeout:?}, {promql} was {last}; targets: {:?}",
                    self.targets()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The scrape targets and their health (`/api/v1/targets`).
    pub fn targets(&self) -> io::Result<Vec<ScrapeTarget>> {
        let data = self.api("/api/v1/targets", &[])?;
        let text = |t: &Value, key: &str| t[key].as_str().unwrap_or_default().to_owned();
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| ScrapeTarget {
                scrape_url: text(t, "scrapeUrl"),
                health: text(t, "health"),
                last_error: text(t, "lastError"),
            })
            .collect())
    }

    /// The `data` of an API answer whose `status` is `success`.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> io::Result<Value> {
        let body = self.get(path, params)?;
        let mut answer: Value = serde_json::from_slice(&body).map_err(|e| {
            io::Error::other(format!(
                "{path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        if answer["status"] != "success" {
            return Err(io::Error::other(format!(
                "{path} {params:?}: {} {}",
                answer["errorType"], answer["error"]
            )));
        }
        Ok(answer["data"].take())
    }

    /// GETs `path` with `params` URL-encoded, with curl run in the server's
    /// namespace: the only place its address means this server. The body,
    /// also of an error status (the API explains errors in JSON).
    fn get(&self, path: &str, params: &[(&str, &str)]) -> io::Result<Vec<u8>> {
        let url = format!("http://{}{path}", Self::WEB);
        let mut args = vec!["-sS", "--max-time", "5", "-G", url.as_str()];
        let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for param in &params {
            args.extend(["--data-urlencode", param.as_str()]);
        }
        let out = self.ns.output("curl", &args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "curl {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    fn failure(&self, what: &str) -> io::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        io::Error::other(format!(
            "{what}; the end of {}:\n{tail}",
            self.log.display()
        ))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Its own child, by PID; the data directory is the caller's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// prometheus.yml for one target. Written as JSON, which is YAML too, so
/// that paths and the target are quoted correctly whatever they hold.
fn scrape_config(
    dir: &Path,
    target: SocketAddr,
    metrics_path: &str,
    bearer_token: Option<&str>,
) -> io::Result<String> {
    let mut job = serde_json::json!({
        "job_name": Prometheus::JOB,
        "metrics_path": metrics_path,
        "static_configs": [{ "targets": [target.to_string()] }],
    });
    if let Some(token) = bearer_token {
        // A file, not `credentials`: the token stays out of the config,
        // which Prometheus shows at /api/v1/status/config.
        let file = dir.join("bearer_token");
        std::fs::write(&file, token)?;
        job["authorization"] = serde_json::json!({
            "type": "Bearer",
            "credentials_file": file,
        });
    }
    let config = serde_json::json!({
        "global": { "scrape_interval": "1s", "scrape_timeout": "1s" },
        "scrape_configs": [job],
    });
    Ok(serde_json::to_string_pretty(&config).expect("a JSON value serializes"))
}

/// An API sample, `[time, "value"]`: the value (Prometheus sends it as text
/// so that NaN and ±Inf survive JSON).
fn sample_value(sample: &Value) -> io::Result<f64> {
    sample[1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not a sample: {sample}")))
}

/// Runs `promtool check metrics` on an exposition (the text a `/metrics`
/// endpoint serves): an error with promtool's findings if it rejects it,
/// lint problems (a missing HELP, a counter without `_total`) included.
pub fn promtool_check_metrics(exposition: &str) -> io::Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running promtool (package prometheus): {e}"),
            )
        })?;
    // Written from another thread: promtool may answer before reading it all.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let text = exposition.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "promtool check metrics ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// A PostgreSQL server of the test's own: `initdb` in a directory of the
/// test's, listening only on a Unix socket there (never on a network, never
/// the system's service), run as the `postgres` user, trusted locally.
/// Stopped (immediately) when dropped.
pub struct Postgres {
    data: PathBuf,
    socket_dir: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

impl Postgres {
    const PORT: u16 = 5432;

    /// Creates a cluster in `dir` and starts it.
    pub fn start(dir: &Path) -> io::Result<Self> {
        let bin = postgres_bin()?;
        let data = dir.join("data");
        let socket_dir = dir.join("socket");
        std::fs::create_dir_all(&socket_dir)?;
        let postgres = user_ids("postgres")?;
        // The server runs as postgres: it must reach and own its directories.
        for path in [dir, &socket_dir] {
            std::os::unix::fs::chown(path, Some(postgres.0), Some(postgres.1))?;
        }
        let server = Self {
            data,
            socket_dir,
            bin,
            log: dir.join("postgres.log"),
        };
        server.as_postgres(
            "initdb",
            &[
                "-D",
                server.data.to_str().unwrap_or_default(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        )?;
        server.start_again()?;
        Ok(server)
    }

    /// Starts the server (after [`Self::stop`]); returns once it accepts connections.
    pub fn start_again(&self) -> io::Result<()> {
        let options = format!(
            "-c listen_addresses='' -k {} -p {}",
            self.socket_dir.display(),
            Self::PORT
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-l",
                self.log.to_str().unwrap_or_default(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
        .map(drop)
    }

    /// Stops the server (`fast`: connections are cut, nothing is lost).
    pub fn stop(&self) -> io::Result<()> {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
        .map(drop)
    }

    /// The URL of `database` as the `postgres` crate takes it (the socket
    /// directory as the host, percent-encoded).
    pub fn url(&self, database: &str) -> String {
        let host: String = self
            .socket_dir
            .to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgres://postgres@{host}:{}/{database}", Self::PORT)
    }

    /// The directory of its Unix socket (libpq's `host` for it) and its port.
    pub fn socket(&self) -> (&Path, u16) {
        (&self.socket_dir, Self::PORT)
    }

    /// Runs `sql` with psql; its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        self.psql_with(database, &["-c", sql])
    }

    /// Runs the SQL script at `path` (readable by `postgres`) with psql.
    pub fn psql_file(&self, database: &str, path: &Path) -> io::Result<String> {
        self.psql_with(database, &["-f", path.to_str().unwrap_or_default()])
    }

    fn psql_with(&self, database: &str, what: &[&str]) -> io::Result<String> {
        let socket = self.socket_dir.to_string_lossy().into_owned();
        let port = Self::PORT.to_string();
        let mut args = vec![
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &socket,
            "-p",
            &port,
            "-d",
            database,
        ];
        args.extend_from_slice(what);
        self.as_postgres("psql", &args)
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir("/")
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{program} {}: {}{}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

/// Debian's PostgreSQL programs (`/usr/lib/postgresql/VERSION/bin`), the newest.
fn postgres_bin() -> io::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| io::Error::other("no PostgreSQL server programs (Debian's postgresql)"))
}

/// The uid and gid of `user`.
fn user_ids(user: &str) -> io::Result<(u32, u32)> {
    nix::unistd::User::from_name(user)
        .map_err(io::Error::from)?
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        .ok_or_else(|| io::Error::other(format!("no user {user} (Debian's postgresql creates it)")))
}
