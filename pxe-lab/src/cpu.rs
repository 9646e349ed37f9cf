//! Who used the CPU during a lab run: the whole machine, the load generator
//! (the harness itself, or a load tool it ran as a child), and the
//! difference, which is the server's when it runs on this machine and nothing
//! else does.
//!
//! Machine-wide busy time is the honest measure of a server whose work runs
//! in softirq (XDP/TC) or in forked children (tftpd-hpa): no single process
//! is charged for it. On veth, though, the receive path of a packet the
//! harness sends can run in the harness's own context and be charged to it,
//! so part of such a server's work is subtracted with the harness's: the
//! server figure is then a floor, and goodput the number to trust.
//!
//! The harness's time is split in two. Its user time is its own code: bytes
//! per harness user-CPU-second is its ceiling. Its system time is kernel
//! work done in its threads: its system calls, and on a veth lab the
//! delivery of packets to both ends (a packet sent runs the receiver's
//! ingress, the server's XDP/TC programs included, in the sender's context),
//! which a real client on another machine would not carry.

use std::time::Instant;

/// Whose CPU time is the load generator's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadGenerator {
    /// This process, all its threads.
    ThisProcess,
    /// The children this process has waited for (a load tool run to completion).
    WaitedChildren,
}

/// CPU seconds spent during one run.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CpuUsage {
    pub seconds: f64,
    pub cores: usize,
    /// Busy (not idle, not iowait) time of every CPU.
    pub machine_busy_s: f64,
    /// The load generator: user and system time.
    pub harness_s: f64,
    /// The load generator's user time: its own code.
    pub harness_user_s: f64,
    /// `machine_busy_s - harness_s`.
    pub server_s: f64,
}

impl CpuUsage {
    /// Fraction of the machine the harness kept busy (1.0: every core).
    pub fn harness_share(&self) -> f64 {
        self.harness_s / (self.seconds * self.cores as f64).max(1e-9)
    }

    /// Kernel work done in the load generator's threads.
    pub fn harness_system_s(&self) -> f64 {
        (self.harness_s - self.harness_user_s).max(0.0)
    }

    /// One line for the report; `bytes` were moved during the run.
    pub fn describe(&self, bytes: u64) -> String {
        let mb = bytes as f64 / 1e6;
        let per = |cpu: f64| {
            if cpu > 0.01 {
                format!("{:.0}", mb / cpu)
            } else {
                "-".to_owned()
            }
        };
        let mut line = format!(
            "cpu: server {:.2} s ({} MB per server CPU-s), harness threads {:.2} s ({:.0}% of {} cores): its own code {:.2} s ({} MB per harness CPU-s), kernel work {:.2} s",
            self.server_s,
            per(self.server_s),
            self.harness_s,
            self.harness_share() * 100.0,
            self.cores,
            self.harness_user_s,
            per(self.harness_user_s),
            self.harness_system_s(),
        );
        if self.harness_share() > 0.45 {
            if self.harness_user_s < 0.25 * self.harness_s {
                line.push_str("; the harness's threads used half the machine or more, mostly in the kernel (on a veth lab, packet delivery for both ends runs in the sender's context)");
            } else {
                line.push_str(
                    "; the harness used half the machine or more: it may be the bottleneck",
                );
            }
        }
        line
    }
}

/// Started at the beginning of a run.
pub struct CpuMeter {
    started: Instant,
    load: LoadGenerator,
    /// Idle and iowait seconds of every CPU at the start.
    idle: f64,
    own: (f64, f64),
}

impl CpuMeter {
    pub fn start(load: LoadGenerator) -> Self {
        Self {
            started: Instant::now(),
            load,
            idle: machine_idle_seconds(),
            own: cpu_seconds(load),
        }
    }

    pub fn stop(&self) -> CpuUsage {
        let idle = machine_idle_seconds() - self.idle;
        let seconds = self.started.elapsed().as_secs_f64();
        let machine_busy_s = (seconds * cpus() as f64 - idle).max(0.0);
        let (user, system) = cpu_seconds(self.load);
        let harness_user_s = user - self.own.0;
        let harness_s = harness_user_s + system - self.own.1;
        CpuUsage {
            seconds,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            machine_busy_s,
            harness_s,
            harness_user_s,
            server_s: (machine_busy_s - harness_s).max(0.0),
        }
    }
}

/// Idle and iowait time of every CPU since boot, from /proc/stat's first
/// line (user nice system idle iowait ...).
///
/// The machine's busy time is the CPUs' wall time less this, not the sum
/// of /proc/stat's busy columns: with tick-based accounting (this kernel)
/// those are sampled at each tick, and work in bursts shorter than a tick
/// on a CPU that then idles (NOHZ stops its tick) is mostly missed, while
/// idle time is measured exactly. A load of 0.3 ms bursts every 0.8 ms read
/// 13% low from the busy columns, and exact from idle; a DHCP server
/// answering perfdhcp read below perfdhcp's own CPU time.
fn machine_idle_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines().next().map(idle_ticks).unwrap_or(0.0) / ticks_per_second()
}

fn idle_ticks(cpu_line: &str) -> f64 {
    cpu_line
        .split_whitespace()
        .skip(4)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum()
}

/// CPUs of the machine (the `cpuN` lines of /proc/stat), whatever this
/// process's affinity.
fn cpus() -> usize {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
        .max(1)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// User and system CPU seconds of the load generator so far.
fn cpu_seconds(whose: LoadGenerator) -> (f64, f64) {
    let who = match whose {
        LoadGenerator::ThisProcess => libc::RUSAGE_SELF,
        LoadGenerator::WaitedChildren => libc::RUSAGE_CHILDREN,
    };
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// utime + stime of a running process, in seconds (`/proc/PID/stat`).
pub fn process_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::other(format!("an unreadable /proc/{pid}/stat"));
    // The command name is in parentheses and may hold spaces: count after it.
    let (_, after) = stat.rsplit_once(')').ok_or_else(bad)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5); `after` starts at field 3.
    let ticks = |n: usize| -> std::io::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(bad)
    };
    Ok((ticks(14)? + ticks(15)?) / ticks_per_second())
}

/// Summed [`process_seconds`] of every process whose command name is
/// `comm` (e.g. every backend of a PostgreSQL); processes that end between
/// the listing and the read count as 0.
pub fn processes_named_seconds(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter_map(|pid| process_seconds(pid).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_is_the_idle_and_iowait_columns() {
        //          user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  100  5    50     9000 300    7   8       2     40    1";
        assert_eq!(idle_ticks(line), 9000.0 + 300.0);
    }

    #[test]
    fn a_load_in_bursts_shorter_than_a_tick_is_counted_busy() {
        let meter = CpuMeter::start(LoadGenerator::ThisProcess);
        let until = Instant::now() + std::time::Duration::from_secs(2);
        while Instant::now() < until {
            let burst = Instant::now();
            while burst.elapsed() < std::time::Duration::from_micros(300) {
                std::hint::black_box(0u64);
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        let usage = meter.stop();
        // Whatever else runs here adds to the machine, never takes away;
        // one 10 ms idle tick per CPU is the reading's resolution.
        let resolution = 0.01 * cpus() as f64;
        assert!(
            usage.machine_busy_s >= usage.harness_s - resolution,
            "{usage:?}"
        );
    }

    #[test]
    fn the_harness_is_charged_for_its_own_work() {
        let meter = CpuMeter::start(LoadGenerator::ThisProcess);
        let mut x = 0u64;
        let give_up = Instant::now();
        while cpu_seconds(LoadGenerator::ThisProcess).0 - meter.own.0 < 0.2
            && give_up.elapsed().as_secs() < 20
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let usage = meter.stop();
        assert!(usage.harness_s >= 0.2, "{usage:?}");
        // Arithmetic is user time: its own code, not kernel work.
        assert!(
            usage.harness_user_s >= 0.2 && usage.harness_user_s <= usage.harness_s,
            "{usage:?}"
        );
        // The machine was busy at least while we were (less one clock tick).
        assert!(usage.machine_busy_s >= usage.harness_s - 0.02, "{usage:?}");
    }
}
