//! The Prometheus metrics: counters and histograms the servers update as
//! they go, and values read at scrape time (leases per pool, the programs'
//! per-CPU counters, kernel image memory, machines per boot stage).
//! docs/OBSERVABILITY.md says what each means.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};

use super::timeline::{Stage, Timelines};
use crate::{dhcp::engine::Engine, fastpath::FastPath};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DhcpLabels {
    pub port: u16,
    pub message: &'static str,
    /// offered, acked, naked, proxy, ignored.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// userspace, xdp, tc.
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Everything updated as it happens.
pub struct Metrics {
    pub dhcp_requests: Family<DhcpLabels, Counter>,
    pub dhcp_kernel_answers: Family<PortLabel, Counter>,
    pub dhcp_decision_seconds: Histogram,
    pub lease_commit_seconds: Histogram,
    pub lease_commit_burst: Histogram,
    pub lease_commit_failures: Counter,
    pub tftp_started: Counter,
    pub tftp_completed: Counter,
    pub tftp_failed: Family<ReasonLabel, Counter>,
    pub tftp_in_flight: Gauge,
    pub tftp_blocks: Family<TierLabel, Counter>,
    pub tftp_bytes: Family<TierLabel, Counter>,
    pub tftp_retransmits: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_bytes: Family<HttpLabels, Counter>,
    pub boot_stage_seconds: Histograms<StageLabel>,
    pub boot_failures: Family<ReasonLabel, Counter>,
    pub unjoined: Family<ReasonLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn stage_histogram() -> Histogram {
    // 0.25 s to about 17 min: a storm's slowest machines take minutes.
    Histogram::new(exponential_buckets(0.25, 2.0, 13))
}

impl Default for Exposition {
    fn default() -> Self {
        let metrics = Arc::new(Metrics::default());
        let live = Arc::new(Live::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        registry.register_collector(Box::new(Arc::clone(&live)));
        Self {
            registry,
            metrics,
            live,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            dhcp_requests: Family::default(),
            dhcp_kernel_answers: Family::default(),
            dhcp_decision_seconds: latency_histogram(),
            lease_commit_seconds: latency_histogram(),
            lease_commit_burst: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            lease_commit_failures: Counter::default(),
            tftp_started: Counter::default(),
            tftp_completed: Counter::default(),
            tftp_failed: Family::default(),
            tftp_in_flight: Gauge::default(),
            tftp_blocks: Family::default(),
            tftp_bytes: Family::default(),
            tftp_retransmits: Counter::default(),
            http_requests: Family::default(),
            http_bytes: Family::default(),
            boot_stage_seconds: Family::new_with_constructor(stage_histogram),
            boot_failures: Family::default(),
            unjoined: Family::default(),
        }
    }
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "pxed_dhcp_requests",
            "DHCP requests by port, message type and what was answered",
            self.dhcp_requests.clone(),
        );
        r.register(
            "pxed_dhcp_kernel_answers",
            "DHCP repeats answered by the kernel from templates, by port",
            self.dhcp_kernel_answers.clone(),
        );
        r.register(
            "pxed_dhcp_decision_seconds",
            "Time from a request's burst being read to its reply decided and its lease committed",
            self.dhcp_decision_seconds.clone(),
        );
        r.register(
            "pxed_lease_commit_seconds",
            "Time of one lease-store commit (one disk flush per burst)",
            self.lease_commit_seconds.clone(),
        );
        r.register(
            "pxed_lease_commit_burst_size",
            "Leases written per commit",
            self.lease_commit_burst.clone(),
        );
        r.register(
            "pxed_lease_commit_failures",
            "Lease-store commits that failed (the burst's replies were withdrawn)",
            self.lease_commit_failures.clone(),
        );
        r.register(
            "pxed_tftp_transfers_started",
            "TFTP transfers begun",
            self.tftp_started.clone(),
        );
        r.register(
            "pxed_tftp_transfers_completed",
            "TFTP transfers whose every block was acknowledged",
            self.tftp_completed.clone(),
        );
        r.register(
            "pxed_tftp_transfers_failed",
            "TFTP requests and transfers that failed, by reason",
            self.tftp_failed.clone(),
        );
        r.register(
            "pxed_tftp_transfers_in_flight",
            "TFTP transfers running now",
            self.tftp_in_flight.clone(),
        );
        r.register(
            "pxed_tftp_blocks",
            "TFTP DATA blocks sent, by tier (userspace, xdp, tc)",
            self.tftp_blocks.clone(),
        );
        r.register(
            "pxed_tftp_bytes",
            "TFTP payload bytes sent, by tier",
            self.tftp_bytes.clone(),
        );
        r.register(
            "pxed_tftp_retransmits",
            "TFTP blocks userspace sent again after a timeout",
            self.tftp_retransmits.clone(),
        );
        r.register(
            "pxed_http_requests",
            "HTTP requests on the boot listener, by route and status",
            self.http_requests.clone(),
        );
        r.register(
            "pxed_http_bytes",
            "HTTP body bytes sent, by route and status",
            self.http_bytes.clone(),
        );
        r.register(
            "pxed_boot_stage_seconds",
            "Seconds from a machine's first DISCOVER to each boot stage it reached",
            self.boot_stage_seconds.clone(),
        );
        r.register(
            "pxed_boot_failures",
            "Boots that hit a problem, by kind",
            self.boot_failures.clone(),
        );
        r.register(
            "pxed_timeline_unjoined",
            "File requests from an address no DHCP exchange named, so on no machine's timeline",
            self.unjoined.clone(),
        );
    }
}

/// What only a scrape reads: the sources are set as the services start.
#[derive(Default)]
pub struct Live {
    pub engine: OnceLock<Arc<Mutex<Engine>>>,
    pub fastpath: OnceLock<Arc<Mutex<FastPath>>>,
    pub timelines: OnceLock<Arc<Mutex<Timelines>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    subnet: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    program: &'static str,
    counter: &'static str,
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(engine) = self.engine.get() {
            let (pools, failing) = {
                let engine = engine.lock().unwrap_or_else(|e| e.into_inner());
                (
                    engine.pool_usage(now_secs()),
                    engine.store_failing().is_some(),
                )
            };
            let rows = pools.iter().flat_map(|pool| {
                [("in_use", pool.in_use), ("free", pool.free)].map(|(state, n)| {
                    let labels = PoolLabels {
                        subnet: pool.subnet.clone(),
                        state,
                    };
                    (labels, n as i64)
                })
            });
            gauge_family(
                &mut encoder,
                "pxed_dhcp_pool_addresses",
                "Addresses of each subnet's pool, in use (held or offered) or free",
                rows,
            )?;
            gauge(
                &mut encoder,
                "pxed_lease_store_healthy",
                "1 while the lease store's last commit succeeded",
                i64::from(!failing),
            )?;
        }
        if let Some(fastpath) = self.fastpath.get() {
            let (counters, (used, reserved)) = {
                let fastpath = fastpath.lock().unwrap_or_else(|e| e.into_inner());
                (fastpath.counters().ok(), fastpath.image_memory())
            };
            if let Some(counters) = counters {
                let mut family = encoder.encode_descriptor(
                    "pxed_kernel_verdicts",
                    "The XDP and TC programs' per-CPU verdict counters, summed",
                    None,
                    MetricType::Counter,
                )?;
                for (program, snapshot) in [("xdp", &counters.xdp), ("tc", &counters.tc)] {
                    for (counter, name) in pxe_common::counter::Counter::ALL {
                        let labels = VerdictLabels {
                            program,
                            counter: name,
                        };
                        let value = ConstCounter::new(snapshot.get(*counter));
                        value.encode(family.encode_family(&labels)?)?;
                    }
                }
            }
            gauge(
                &mut encoder,
                "pxed_kernel_image_memory_used_bytes",
                "Kernel memory holding TFTP file images for the kernel tiers",
                used as i64,
            )?;
            gauge(
                &mut encoder,
                "pxed_kernel_image_memory_bytes",
                "Kernel memory reserved for TFTP file images (--fastpath-memory)",
                reserved as i64,
            )?;
        }
        if let Some(timelines) = self.timelines.get() {
            self.encode_timelines(&mut encoder, timelines)?;
        }
        Ok(())
    }
}

impl Live {
    fn encode_timelines(
        &self,
        encoder: &mut DescriptorEncoder,
        timelines: &Mutex<Timelines>,
    ) -> Result<(), std::fmt::Error> {
        let summary = timelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .summary(now_secs() * 1000);
        let rows = Stage::ALL.into_iter().map(|stage| {
            let labels = StageLabel {
                stage: stage.name(),
            };
            (labels, summary.by_stage[stage as usize] as i64)
        });
        gauge_family(
            encoder,
            "pxed_machines_in_stage",
            "Machines by the furthest stage of their latest boot",
            rows,
        )?;
        gauge(
            encoder,
            "pxed_machines_failed",
            "Machines whose latest boot is stuck on a problem",
            summary.failed as i64,
        )?;
        gauge(
            encoder,
            "pxed_timeline_machines",
            "Machines with a boot timeline kept",
            summary.machines as i64,
        )?;
        gauge(
            encoder,
            "pxed_timeline_memory_bytes",
            "Memory the boot timelines take, roughly",
            summary.bytes as i64,
        )
    }
}

/// One gauge read at scrape time.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// A family of gauges read at scrape time, one per label set.
fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The registry and what feeds it.
pub struct Exposition {
    registry: Registry,
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
}

impl Exposition {
    /// The OpenMetrics text exposition (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// OpenMetrics text as Prometheus's older text format (0.0.4), for clients
/// that do not ask for OpenMetrics (curl, `promtool check metrics`): a
/// counter's HELP and TYPE name its `_total` samples, and there is no
/// `# EOF` or `# UNIT`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# HELP ") {
            if let Some(previous) = help.replace(line) {
                out.push_str(previous);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {name}{suffix}{text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_older_format() {
        let openmetrics = "# HELP pxed_x Things.\n# TYPE pxed_x counter\npxed_x_total 3\n\
                           # HELP pxed_y Now.\n# TYPE pxed_y gauge\npxed_y 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP pxed_x_total Things.\n# TYPE pxed_x_total counter\npxed_x_total 3\n\
             # HELP pxed_y Now.\n# TYPE pxed_y gauge\npxed_y 1\n"
        );
    }
}
