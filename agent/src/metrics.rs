//! `/metrics`, on the Prometheus project's client library: labelled counters (rejections by
//! check, source polls by result, rollout steps by backend and result, rollbacks by reason, drift
//! repairs by resource), histograms (verification, poll, acceptance to converged) and gauges set
//! when scraped (sequences, time since the last good poll, replicas desired and ready per
//! resource, build info).
//!
//! Served in the Prometheus text format (0.0.4) that `promtool check metrics` and every scraper
//! read; a scraper asking for OpenMetrics (`Accept: application/openmetrics-text`) gets the
//! library's own encoding.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub backend: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MachineLabels {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MachineLabel {
    pool: String,
    machine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

/// Every metric the agent exports. Counters and histograms are recorded where things happen;
/// the gauges are set from the agent's state by [`Metrics::encode`].
pub struct Metrics {
    registry: Registry,
    pub source_polls: Family<ResultLabel, Counter>,
    /// Source errors, each followed by a backoff (kept from the first exposition).
    pub source_errors: Counter,
    pub poll_seconds: Histogram,
    pub accepted: Counter,
    pub rejected: Family<CheckLabel, Counter>,
    pub unchanged: Counter,
    pub verification_seconds: Histogram,
    pub rollouts: Counter,
    pub rollout_steps: Family<StepLabels, Counter>,
    pub rollbacks: Family<ReasonLabel, Counter>,
    pub drift_repairs: Family<ResourceLabel, Counter>,
    pub accepted_to_converged_seconds: Histogram,
    current_sequence: Gauge,
    pending_sequence: Gauge,
    pending_release: Gauge,
    highest_sequence: Gauge,
    last_poll_timestamp: Gauge,
    seconds_since_last_poll: Gauge<f64, AtomicU64>,
    replicas_desired: Family<ResourceLabel, Gauge>,
    vm_machines: Family<MachineLabels, Gauge>,
    cloud_calls: Family<CallLabels, Counter>,
    vm_machines_desired: Family<PoolLabel, Gauge>,
    vm_machine_replicas: Family<MachineLabel, Gauge>,
    vm_volumes: Family<StateLabel, Gauge>,
    vm_load_balancer_targets: Family<EndpointLabel, Gauge>,
    replicas_ready: Family<ResourceLabel, Gauge>,
    /// Unix time of the last poll that reached the source (0: none yet).
    last_poll_unix: AtomicU64,
    /// The download in progress, if any (`status` shows it).
    download: std::sync::Mutex<Option<Download>>,
    download_bytes: Gauge,
    download_total_bytes: Gauge,
}

/// A bundle or carried image being fetched or read: how far along it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Download {
    pub what: String,
    pub bytes: u64,
    pub total: u64,
}

/// What the gauges show, read from the agent's state when scraped.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub current_sequence: Option<u64>,
    pub pending_sequence: Option<u64>,
    pub highest_sequence: Option<u64>,
    /// Per resource: (desired, ready) replicas.
    pub replicas: Vec<(String, u64, u64)>,
    /// Per VM pool: the desired size, and machines by state.
    pub pools: Vec<(String, u64, BTreeMap<String, u64>)>,
    /// Per machine of a VM pool: (pool, machine, replicas handed to it).
    pub machine_replicas: Vec<(String, String, u64)>,
    /// VM volumes by state.
    pub volumes: BTreeMap<String, u64>,
    /// Per public endpoint's load balancer: its targets.
    pub load_balancer_targets: Vec<(String, u64)>,
    pub now_unix: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outpost");
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let metrics = Metrics {
            source_polls: Family::default(),
            source_errors: Counter::default(),
            poll_seconds: seconds(),
            accepted: Counter::default(),
            rejected: Family::default(),
            unchanged: Counter::default(),
            verification_seconds: seconds(),
            rollouts: Counter::default(),
            rollout_steps: Family::default(),
            rollbacks: Family::default(),
            drift_repairs: Family::default(),
            accepted_to_converged_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            current_sequence: Gauge::default(),
            pending_sequence: Gauge::default(),
            pending_release: Gauge::default(),
            highest_sequence: Gauge::default(),
            last_poll_timestamp: Gauge::default(),
            seconds_since_last_poll: Gauge::default(),
            replicas_desired: Family::default(),
            vm_machines: Family::default(),
            cloud_calls: Family::default(),
            vm_machines_desired: Family::default(),
            vm_machine_replicas: Family::default(),
            vm_volumes: Family::default(),
            vm_load_balancer_targets: Family::default(),
            replicas_ready: Family::default(),
            last_poll_unix: AtomicU64::new(0),
            download: std::sync::Mutex::new(None),
            download_bytes: Gauge::default(),
            download_total_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "source_polls",
            "Polls of the source (a registry HEAD, a git fetch, a dropped file read) by result",
            m.source_polls.clone(),
        );
        registry.register(
            "source_errors",
            "Source errors (each followed by a backoff)",
            m.source_errors.clone(),
        );
        registry.register(
            "source_poll_seconds",
            "How long one poll of the source took, fetch included",
            m.poll_seconds.clone(),
        );
        registry.register(
            "bundles_accepted",
            "Bundles that passed verification",
            m.accepted.clone(),
        );
        registry.register(
            "bundles_rejected",
            "Bundles refused, by the name of the check that refused them",
            m.rejected.clone(),
        );
        registry.register(
            "bundles_unchanged",
            "Candidates that were the current or pending release again",
            m.unchanged.clone(),
        );
        registry.register(
            "verification_seconds",
            "How long verifying and recording one candidate took",
            m.verification_seconds.clone(),
        );
        registry.register(
            "rollouts",
            "Rollouts of a new current release started",
            m.rollouts.clone(),
        );
        registry.register(
            "rollout_steps",
            "Rollout steps carried out, by backend and result",
            m.rollout_steps.clone(),
        );
        registry.register(
            "rollbacks",
            "Releases rolled back, by reason (failed: automatic; manual: the customer's)",
            m.rollbacks.clone(),
        );
        registry.register(
            "drift_repairs",
            "Steps taken to repair what was changed behind the agent's back, by resource",
            m.drift_repairs.clone(),
        );
        registry.register(
            "accepted_to_converged_seconds",
            "Time from a release's acceptance to its rollout converging healthy",
            m.accepted_to_converged_seconds.clone(),
        );
        registry.register(
            "current_sequence",
            "Sequence of the current release (0: none)",
            m.current_sequence.clone(),
        );
        registry.register(
            "pending_sequence",
            "Sequence of the release waiting (approval, permissions, window, pin; 0: none)",
            m.pending_sequence.clone(),
        );
        registry.register(
            "pending_release",
            "1 while a release waits (approval, permissions, window, pin)",
            m.pending_release.clone(),
        );
        registry.register(
            "highest_accepted_sequence",
            "Rollback floor: the highest sequence ever accepted",
            m.highest_sequence.clone(),
        );
        registry.register(
            "last_poll_timestamp_seconds",
            "Unix time of the last poll that reached the source (0: none yet)",
            m.last_poll_timestamp.clone(),
        );
        registry.register(
            "seconds_since_last_poll",
            "Seconds since the last poll that reached the source",
            m.seconds_since_last_poll.clone(),
        );
        registry.register(
            "replicas_desired",
            "Replicas the current release wants, by resource",
            m.replicas_desired.clone(),
        );
        registry.register(
            "vm_machines",
            "Machines of each VM pool, by state (booting, joined, healthy, unhealthy, silent, leaving)",
            m.vm_machines.clone(),
        );
        registry.register(
            "cloud_calls",
            "Calls to the cloud's APIs (runtime vm), by operation and result (ok, error)",
            m.cloud_calls.clone(),
        );
        registry.register(
            "vm_machines_desired",
            "The size each VM pool's group is asked for",
            m.vm_machines_desired.clone(),
        );
        registry.register(
            "vm_machine_replicas",
            "Replicas handed to each machine of a VM pool",
            m.vm_machine_replicas.clone(),
        );
        registry.register(
            "vm_volumes",
            "Volumes of stateful replicas on VM pools, by state (attached, available, moving, being made, unusable)",
            m.vm_volumes.clone(),
        );
        registry.register(
            "vm_load_balancer_targets",
            "Machines each public endpoint's load balancer sends to (runtime vm)",
            m.vm_load_balancer_targets.clone(),
        );
        registry.register(
            "replicas_ready",
            "Replicas running healthy, by resource",
            m.replicas_ready.clone(),
        );
        registry.register(
            "download_bytes",
            "Bytes of the bundle being fetched or read so far (0: none in progress)",
            m.download_bytes.clone(),
        );
        registry.register(
            "download_total_bytes",
            "Size of the bundle being fetched or read (0: none in progress)",
            m.download_total_bytes.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                commit: option_env!("OUTPOST_COMMIT").unwrap_or("unknown").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The agent's version and the commit it was built from (always 1)",
            build,
        );
        // Series that exist from the start, at 0, as they did before labels (a dashboard's
        // `rate()` then has a first sample). Per-resource and per-check series appear with
        // their first event.
        for result in ["ok", "error"] {
            let _ = metrics.source_polls.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        for reason in ["failed", "manual"] {
            let _ = metrics.rollbacks.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// A poll of the source that began at `started`: `ok` (it answered) or not.
    pub fn poll(&self, ok: bool, started: std::time::Instant) {
        let now = crate::config::now().timestamp().max(0) as u64;
        self.record_poll(ok, started.elapsed().as_secs_f64(), now);
    }

    fn record_poll(&self, ok: bool, seconds: f64, now_unix: u64) {
        let result = if ok { "ok" } else { "error" };
        self.source_polls
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        self.poll_seconds.observe(seconds);
        if ok {
            self.last_poll_unix.store(now_unix, Ordering::Relaxed);
        }
    }

    /// A download of `total` bytes starts (replacing any other).
    pub fn download_started(&self, what: &str, total: u64) {
        if let Ok(mut download) = self.download.lock() {
            *download = Some(Download {
                what: what.to_string(),
                bytes: 0,
                total,
            });
        }
    }

    pub fn download_advanced(&self, bytes: u64) {
        if let Ok(mut download) = self.download.lock()
            && let Some(download) = download.as_mut()
        {
            download.bytes = download.bytes.saturating_add(bytes);
        }
    }

    pub fn download_finished(&self) {
        if let Ok(mut download) = self.download.lock() {
            *download = None;
        }
    }

    pub fn download(&self) -> Option<Download> {
        self.download.lock().ok().and_then(|d| d.clone())
    }

    pub fn polls(&self, result: &str) -> u64 {
        self.source_polls
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .get()
    }

    pub fn last_poll_unix(&self) -> u64 {
        self.last_poll_unix.load(Ordering::Relaxed)
    }

    pub fn rejection(&self, check: &str) {
        self.rejected
            .get_or_create(&CheckLabel {
                check: check.into(),
            })
            .inc();
    }

    pub fn step(&self, backend: &str, ok: bool) {
        self.rollout_steps
            .get_or_create(&StepLabels {
                backend: backend.into(),
                result: if ok { "done" } else { "failed" }.into(),
            })
            .inc();
    }

    pub fn cloud_call(&self, call: &str, ok: bool) {
        self.cloud_calls
            .get_or_create(&CallLabels {
                call: call.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    pub fn rollback(&self, reason: &str) {
        self.rollbacks
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn drift_repair(&self, resource: &str) {
        self.drift_repairs
            .get_or_create(&ResourceLabel {
                resource: resource.into(),
            })
            .inc();
    }

    /// The gauges set from `snapshot`, then everything in the Prometheus text format (or, with
    /// `openmetrics`, the library's OpenMetrics encoding).
    pub fn encode(&self, snapshot: &Snapshot, openmetrics: bool) -> String {
        let gauge = |value: Option<u64>| i64::try_from(value.unwrap_or(0)).unwrap_or(i64::MAX);
        self.current_sequence.set(gauge(snapshot.current_sequence));
        self.pending_sequence.set(gauge(snapshot.pending_sequence));
        self.pending_release
            .set(i64::from(snapshot.pending_sequence.is_some()));
        self.highest_sequence.set(gauge(snapshot.highest_sequence));
        let download = self.download();
        self.download_bytes
            .set(gauge(download.as_ref().map(|d| d.bytes)));
        self.download_total_bytes
            .set(gauge(download.as_ref().map(|d| d.total)));
        let last = self.last_poll_unix();
        self.last_poll_timestamp.set(gauge(Some(last)));
        self.seconds_since_last_poll.set(if last == 0 {
            0.0
        } else {
            (snapshot.now_unix - last as f64).max(0.0)
        });
        // Resources the release no longer has go, rather than keep their last value.
        self.replicas_desired.clear();
        self.replicas_ready.clear();
        for (resource, desired, ready) in &snapshot.replicas {
            let label = ResourceLabel {
                resource: resource.clone(),
            };
            self.replicas_desired
                .get_or_create(&label)
                .set(gauge(Some(*desired)));
            self.replicas_ready
                .get_or_create(&label)
                .set(gauge(Some(*ready)));
        }
        self.vm_machines.clear();
        self.vm_machines_desired.clear();
        for (pool, desired, states) in &snapshot.pools {
            self.vm_machines_desired
                .get_or_create(&PoolLabel { pool: pool.clone() })
                .set(gauge(Some(*desired)));
            for (state, count) in states {
                let labels = MachineLabels {
                    pool: pool.clone(),
                    state: state.clone(),
                };
                self.vm_machines
                    .get_or_create(&labels)
                    .set(gauge(Some(*count)));
            }
        }
        self.vm_machine_replicas.clear();
        for (pool, machine, replicas) in &snapshot.machine_replicas {
            let labels = MachineLabel {
                pool: pool.clone(),
                machine: machine.clone(),
            };
            self.vm_machine_replicas
                .get_or_create(&labels)
                .set(gauge(Some(*replicas)));
        }
        self.vm_volumes.clear();
        for (state, count) in &snapshot.volumes {
            let label = StateLabel {
                state: state.clone(),
            };
            self.vm_volumes
                .get_or_create(&label)
                .set(gauge(Some(*count)));
        }
        self.vm_load_balancer_targets.clear();
        for (endpoint, targets) in &snapshot.load_balancer_targets {
            let label = EndpointLabel {
                endpoint: endpoint.clone(),
            };
            self.vm_load_balancer_targets
                .get_or_create(&label)
                .set(gauge(Some(*targets)));
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return String::new();
        }
        if openmetrics {
            text
        } else {
            prometheus_text(&text)
        }
    }
}

/// The Prometheus text format from OpenMetrics text: a counter family's HELP and TYPE name its
/// `_total` samples, and there is no `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_and_the_classic_text_format() {
        let metrics = Metrics::new();
        metrics.rejection("rollback");
        metrics.rejection("rollback");
        metrics.rejection("digest-mismatch");
        metrics.step("replicas", true);
        metrics.rollback("failed");
        metrics.record_poll(true, 0.2, 100);
        let snapshot = Snapshot {
            current_sequence: Some(3),
            replicas: vec![("web".into(), 2, 1)],
            pools: vec![(
                "default".into(),
                3,
                BTreeMap::from([("healthy".into(), 2), ("booting".into(), 1)]),
            )],
            machine_replicas: vec![("default".into(), "i-1".into(), 2)],
            volumes: BTreeMap::from([("attached".into(), 1)]),
            load_balancer_targets: vec![("web.web".into(), 2)],
            now_unix: 130.0,
            ..Default::default()
        };
        let text = metrics.encode(&snapshot, false);
        for line in [
            "# TYPE outpost_bundles_rejected_total counter",
            "outpost_bundles_rejected_total{check=\"rollback\"} 2",
            "outpost_bundles_rejected_total{check=\"digest-mismatch\"} 1",
            "outpost_rollout_steps_total{backend=\"replicas\",result=\"done\"} 1",
            "outpost_rollbacks_total{reason=\"failed\"} 1",
            "outpost_source_polls_total{result=\"ok\"} 1",
            "outpost_current_sequence 3",
            "outpost_seconds_since_last_poll 30.0",
            "outpost_replicas_desired{resource=\"web\"} 2",
            "outpost_replicas_ready{resource=\"web\"} 1",
            "outpost_vm_machines_desired{pool=\"default\"} 3",
            "outpost_vm_machines{pool=\"default\",state=\"healthy\"} 2",
            "outpost_vm_machines{pool=\"default\",state=\"booting\"} 1",
            "outpost_vm_machine_replicas{pool=\"default\",machine=\"i-1\"} 2",
            "outpost_vm_volumes{state=\"attached\"} 1",
            "outpost_vm_load_balancer_targets{endpoint=\"web.web\"} 2",
            "# TYPE outpost_verification_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(text.contains("outpost_build_info{version=\""), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(metrics.encode(&snapshot, true).ends_with("# EOF\n"));
    }
}
