//! A decision webhook: for machines the inventory does not know (or for
//! every machine), pxed asks `GET URL/v1/boot/{mac}?arch=NAME` the way
//! pixiecore's API mode does, so an existing pixiecore API server works
//! unchanged. Its answer, `{"kernel": URL, "initrd": [URL...], "cmdline":
//! "...", "message": "..."}`, becomes the machine's iPXE script (iPXE fetches
//! the kernel and initrds itself; a relative path means pxed's own HTTP
//! boot); pxed's own field `"profile"` boots one of pxed's profiles instead.
//! Any status but 200 means "do not boot this machine".
//!
//! The DHCP path never waits on the webhook: a machine whose answer is not
//! cached gets no reply while a lookup starts in the background (bounded by
//! `timeout`), and the firmware's retransmission finds the cached answer (EDK2
//! resends after 4 s, iPXE after 1 s). A webhook that fails or times out
//! gives the configured policy's answer (the default profile), cached for a
//! shorter time so that the webhook is asked again soon. Replies decided by
//! the webhook (or by the fallback) are answered from userspace only: the
//! kernel repeats what stands until the policy changes, and a cached webhook
//! answer expires on its own.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tracing::{info, warn};

use super::{
    options::OptionSet, r#static::StaticPolicy, BootPolicy, BootSpec, Decision, Mac, Machine,
    ServerUrls, Verdict,
};

/// Which machines the webhook decides for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Ask {
    /// Machines neither the config file nor the API names.
    Unknown,
    /// Every machine (the inventory's entries still say `netboot = false`).
    All,
}

/// The webhook's answer, as pixiecore's API defines it, plus `profile`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Vec<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// pxed's: boot this profile of pxed's instead.
    #[serde(default)]
    pub profile: Option<String>,
}

/// What the webhook said about one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Said {
    Boot(Answer),
    /// A non-200 answer: do not boot it.
    NoBoot,
    /// Unreachable, slow or unreadable: the configured policy decides.
    Failed,
}

struct Cached {
    said: Said,
    until: Instant,
}

/// The webhook's client and cache, shared by every policy snapshot.
pub struct Webhook {
    url: String,
    ask: Ask,
    timeout: Duration,
    ttl: Duration,
    cache: Mutex<HashMap<Mac, Cached>>,
    asking: Mutex<HashSet<Mac>>,
    runtime: tokio::runtime::Handle,
    agent: ureq::Agent,
}

/// Failures are cached this long: the webhook is asked again soon.
const FAILED_TTL: Duration = Duration::from_secs(5);

/// Lookups running at once, at most. Each holds a blocking thread for up to
/// the timeout; a storm of strangers must not turn into a thousand threads
/// that take the CPU from the machines pxed knows. A stranger over the
/// bound is asked about on a later retransmission.
const MAX_LOOKUPS: usize = 16;

impl Webhook {
    /// A webhook at `url` (its `/v1/boot/{mac}` is asked); lookups run on
    /// `runtime`'s blocking threads.
    pub fn new(
        url: &str,
        ask: Ask,
        timeout: Duration,
        ttl: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("pxed/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self {
            url: url.trim_end_matches('/').to_owned(),
            ask,
            timeout,
            ttl,
            cache: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashSet::new()),
            runtime,
            agent,
        }
    }

    /// What the webhook said of `mac`, if it is cached and fresh; otherwise
    /// starts asking (once per machine at a time) and returns `None`.
    fn said(self: &Arc<Self>, machine: &Machine) -> Option<Said> {
        let now = Instant::now();
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&machine.mac)
        {
            if c.until > now {
                return Some(c.said.clone());
            }
        }
        let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        if asking.len() < MAX_LOOKUPS && asking.insert(machine.mac) {
            drop(asking);
            let hook = Arc::clone(self);
            let (mac, arch) = (machine.mac, machine.arch.name());
            self.runtime.spawn_blocking(move || hook.look_up(mac, arch));
        }
        None
    }

    /// Asks the webhook (blocking, bounded by the timeout) and caches what it said.
    fn look_up(&self, mac: Mac, arch: &str) {
        let url = format!("{}/v1/boot/{mac}?arch={arch}", self.url);
        let said = self.ask_once(&url);
        match &said {
            Said::Boot(a) => info!(%mac, kernel = ?a.kernel, profile = ?a.profile, "webhook: boot"),
            Said::NoBoot => info!(%mac, "webhook: do not boot"),
            Said::Failed => {}
        }
        let ttl = if said == Said::Failed {
            FAILED_TTL
        } else {
            self.ttl
        };
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            mac,
            Cached {
                said,
                until: Instant::now() + ttl,
            },
        );
        self.asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&mac);
    }

    fn ask_once(&self, url: &str) -> Said {
        let mut response = match self.agent.get(url).call() {
            Ok(r) => r,
            Err(e) => {
                warn!(
                    url,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "webhook: no answer, the configured policy decides: {e}"
                );
                return Said::Failed;
            }
        };
        if response.status().as_u16() != 200 {
            return Said::NoBoot;
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string();
        let answer = text
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Answer>(&t).map_err(|e| e.to_string()));
        match answer {
            Ok(answer) if answer.kernel.is_some() || answer.profile.is_some() => Said::Boot(answer),
            Ok(_) => {
                warn!(url, "webhook: the answer names neither a kernel nor a profile; the configured policy decides");
                Said::Failed
            }
            Err(e) => {
                warn!(url, "webhook: the answer is not the JSON it should be; the configured policy decides: {e}");
                Said::Failed
            }
        }
    }
}

/// The configured policy with a webhook in front of it.
pub struct WebhookPolicy {
    pub base: StaticPolicy,
    pub hook: Arc<Webhook>,
}

impl BootPolicy for WebhookPolicy {
    fn decide(&self, machine: &Machine, urls: &ServerUrls) -> Verdict {
        let known = self.base.machines.contains_key(&machine.mac);
        let base = || self.base.decide(machine, urls);
        if !self.base.may_netboot(machine.mac) || (known && self.hook.ask == Ask::Unknown) {
            return base();
        }
        let said = match self.hook.said(machine) {
            Some(said) => said,
            // Not yet known: silent now, answered on the retransmission.
            None => {
                return Verdict {
                    client: machine.client,
                    decision: Decision::Ignore,
                    repeatable: false,
                }
            }
        };
        match said {
            Said::Failed => Verdict {
                repeatable: false,
                ..base()
            },
            Said::NoBoot => Verdict {
                client: machine.client,
                decision: Decision::Ignore,
                repeatable: false,
            },
            Said::Boot(Answer {
                profile: Some(profile),
                ..
            }) => Verdict {
                repeatable: false,
                ..self.base.decide_with_profile(machine, urls, &profile)
            },
            Said::Boot(answer) => {
                let verdict = base();
                let (boot_file, tftp_server, class) = match &verdict.decision {
                    Decision::Boot(spec) => {
                        (spec.boot_file.clone(), spec.tftp_server, spec.class.clone())
                    }
                    _ => (None, None, None),
                };
                Verdict {
                    client: verdict.client,
                    decision: Decision::Boot(BootSpec {
                        profile: "webhook".into(),
                        boot_file,
                        ipxe_script: script(&answer, urls),
                        hostname: self.base.hostname(machine.mac),
                        tftp_server,
                        class,
                    }),
                    repeatable: false,
                }
            }
        }
    }

    fn hostname(&self, mac: Mac) -> Option<String> {
        self.base.hostname(mac)
    }

    fn options(&self, machine: &Machine) -> OptionSet {
        self.base.options(machine)
    }

    fn knows(&self, mac: Mac) -> bool {
        self.base.knows(mac)
    }

    fn known_macs(&self) -> Vec<Mac> {
        self.base.known_macs()
    }

    fn class_name(&self, machine: &Machine) -> Option<String> {
        self.base.class_name(machine)
    }

    fn may_netboot(&self, mac: Mac) -> bool {
        self.base.may_netboot(mac)
    }
}

/// The iPXE script of a webhook answer: its kernel with its command line,
/// then its initrds; a path without a scheme is one of pxed's HTTP files.
fn script(answer: &Answer, urls: &ServerUrls) -> String {
    let url = |path: &str| {
        if path.contains("://") {
            path.to_owned()
        } else {
            format!("{}/{}", urls.http, path.trim_start_matches('/'))
        }
    };
    let mut s = String::from("#!ipxe\n");
    if let Some(message) = &answer.message {
        s.push_str(&format!("echo {}\n", message.replace('\n', " ")));
    }
    let names: Vec<String> = (0..answer.initrd.len())
        .map(|i| format!("initrd{i}"))
        .collect();
    let initrd_args: String = names.iter().map(|n| format!(" initrd={n}")).collect();
    s.push_str(&format!(
        "kernel {}{initrd_args} {}\n",
        url(answer.kernel.as_deref().unwrap_or_default()),
        answer.cmdline.as_deref().unwrap_or_default()
    ));
    for (path, name) in answer.initrd.iter().zip(&names) {
        s.push_str(&format!("initrd --name {name} {}\n", url(path)));
    }
    s.push_str("boot\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pixiecore_answer_becomes_an_ipxe_script() {
        let urls = ServerUrls::new(std::net::Ipv4Addr::new(198, 18, 0, 1), 80);
        let answer: Answer = serde_json::from_str(
            r#"{"kernel": "http://cdn/vmlinuz", "initrd": ["installer/initrd.img", "http://cdn/extra"], "cmdline": "console=ttyS0", "message": "hello\nrack"}"#,
        )
        .unwrap();
        assert_eq!(
            script(&answer, &urls),
            "#!ipxe\necho hello rack\n\
             kernel http://cdn/vmlinuz initrd=initrd0 initrd=initrd1 console=ttyS0\n\
             initrd --name initrd0 http://198.18.0.1/installer/initrd.img\n\
             initrd --name initrd1 http://cdn/extra\nboot\n"
        );
    }
}
