//! The running agent: Source → Verify → Approve → Plan → Rollout → Runtime around the state
//! store, plus the local API. One task drives the source, one converges the runtime; errors
//! back off with jitter and never touch the current release.

use crate::api::{self, Shared};
use crate::config::RuntimeKind;
use crate::pipeline::{Admission, Agent, Ingested};
use crate::rollout::Converger;
use crate::runtime::docker::DockerRuntime;
use crate::source::{self, Source};
use outpost_bundle_format::{Layout, VerifiedBundle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often pending releases are re-evaluated (maintenance windows open by the clock).
const RECONSIDER_EVERY: Duration = Duration::from_secs(5);

/// Keeps the images a verified bundle carries (`--with-images`) in the images directory before it
/// is accepted, so an accepted air-gapped release always has them (container engines, and VM
/// pools whose machines fetch them from the agent).
struct KeepCarriedImages {
    dir: PathBuf,
}

impl Admission for KeepCarriedImages {
    fn check(&self) -> &'static str {
        "bundled-image"
    }

    fn admit(&self, layout: &Layout, _: &VerifiedBundle) -> Result<(), String> {
        crate::runtime::carried::keep_bundled_images(layout, &self.dir)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

impl KeepCarriedImages {
    /// Archives no release the agent may still run refers to go, after each acceptance.
    fn prune_unused(&self, agent: &Agent) {
        match agent.images_in_use() {
            Ok(in_use) => crate::runtime::carried::prune_bundled_images(&self.dir, &in_use),
            Err(e) => tracing::warn!("carried images: {e:#}"),
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(agent: Agent) -> anyhow::Result<()> {
    let starting = crate::memory::Busy::start();
    let socket = agent.config.api.socket.clone();
    let agent = Arc::new(agent);
    // Leftovers of a download interrupted by a crash.
    let tmp = agent.config.state_dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let source = source::from_config(&agent.config, *agent.limits(), agent.metrics.clone())?;
    let shared = Arc::new(Shared {
        source: source.describe(),
        ..Default::default()
    });
    agent.reconsider(crate::config::now())?;

    let server = {
        let (agent, shared, socket) = (agent.clone(), shared.clone(), socket.clone());
        tokio::spawn(async move { api::serve(agent, shared, &socket).await })
    };
    let metrics_server = agent.config.api.metrics_address.map(|address| {
        let agent = agent.clone();
        tokio::spawn(async move { api::serve_metrics(agent, address).await })
    });
    let mut converger = match agent.config.runtime {
        RuntimeKind::None => None,
        // The one place backends are built: each from the rollout context and its own section.
        RuntimeKind::Docker => {
            let runtime = DockerRuntime::new(&agent.config.docker, &agent.config.images_dir());
            let settings = crate::rollout::replicas::Settings::of(&agent.config);
            let backend = crate::rollout::Replicas::new(agent.rollout_context(), settings, runtime);
            let converger = Converger::new(agent.rollout_context(), backend);
            Some(tokio::spawn(async move { converger.run().await }))
        }
        #[cfg(feature = "kubernetes")]
        RuntimeKind::Kubernetes => {
            let settings = crate::rollout::kubernetes::render::Settings::of(&agent.config);
            let cluster =
                crate::rollout::kubernetes::Cluster::connect(agent.rollout_context(), settings)
                    .await?;
            let converger = Converger::new(agent.rollout_context(), cluster);
            Some(tokio::spawn(async move { converger.run().await }))
        }
        #[cfg(not(feature = "kubernetes"))]
        RuntimeKind::Kubernetes => anyhow::bail!(
            "runtime kubernetes: this outpost-agent was built without the kubernetes feature"
        ),
        RuntimeKind::Vm => Some(start_vm(&agent).await?),
    };
    let ticker = {
        let agent = agent.clone();
        let mut waits = agent.release_waits.subscribe();
        tokio::spawn(async move {
            // The sender lives in `agent`, held here: waiting never fails.
            while waits.wait_for(|waits| *waits).await.is_ok() {
                tokio::time::sleep(RECONSIDER_EVERY).await;
                if let Err(e) = agent.reconsider(crate::config::now()) {
                    tracing::warn!("reconsider: {e}");
                }
            }
        })
    };
    tracing::info!(
        "outpost-agent running: {}, api {}",
        shared.source,
        socket.display()
    );
    notify_ready();
    let trimmer = tokio::spawn(crate::memory::trim_when_quiet());
    drop(starting);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = drive(agent.clone(), source, shared.clone()) => result,
        result = server => result.map_err(anyhow::Error::from).and_then(|r| r),
        result = async {
            match metrics_server {
                Some(server) => server.await,
                None => std::future::pending().await,
            }
        } => result.map_err(anyhow::Error::from).and_then(|r| r),
        // The converger loops forever; if it ends (a panic), the agent exits with an error so
        // that its supervisor (systemd, the kubelet) restarts it rather than it running on
        // without a rollout.
        result = async {
            match converger.as_mut() {
                Some(converger) => converger.await,
                None => std::future::pending().await,
            }
        } => Err(match result {
            Ok(()) => anyhow::anyhow!("the rollout loop ended"),
            Err(e) => anyhow::anyhow!("the rollout loop stopped: {e}"),
        }),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    ticker.abort();
    trimmer.abort();
    if let Some(converger) = converger {
        converger.abort();
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("outpost-agent stopped");
    result
}

/// Starts the VM backend over the configured cloud provider.
async fn start_vm(agent: &Arc<Agent>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let Some(config) = agent.config.vm.clone() else {
        anyhow::bail!("runtime vm: the vm section is missing");
    };
    match config.provider {
        #[cfg(feature = "aws")]
        crate::config::CloudProvider::Aws => {
            let provider =
                crate::rollout::vm::aws::Aws::connect(&config, agent.metrics.clone()).await?;
            run_pools(agent, config, provider).await
        }
        #[cfg(not(feature = "aws"))]
        crate::config::CloudProvider::Aws => anyhow::bail!(
            "runtime vm, provider aws: this outpost-agent was built without the aws feature"
        ),
    }
}

/// Serves the node protocol and converges the pools through `provider`.
#[cfg(feature = "aws")]
async fn run_pools(
    agent: &Arc<Agent>,
    config: crate::config::VmConfig,
    provider: crate::rollout::vm::aws::Aws,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use crate::rollout::vm;
    let secret = vm::bootstrap_secret(&config.nodes.bootstrap_secret_file)?;
    let binary = std::env::current_exe()?;
    let listener = tokio::net::TcpListener::bind(config.nodes.listen)
        .await
        .map_err(|e| anyhow::anyhow!("vm.nodes.listen {}: {e}", config.nodes.listen))?;
    let nodes = vm::nodes::Nodes::new(
        secret.clone(),
        binary.clone(),
        agent.config.images_dir(),
        Duration::from_secs(config.nodes.report_timeout_seconds),
    );
    tokio::spawn(nodes.clone().serve(listener));
    let settings = vm::Settings {
        bootstrap: vm::Bootstrap {
            advertise: config.nodes.advertise.clone(),
            binary_sha256: vm::file_sha256(&binary)?,
            secret,
        },
        vm: config,
        permissions: agent.config.permissions.clone(),
    };
    let backend = vm::Pools::new(agent.rollout_context(), settings, provider, nodes);
    let converger = Converger::new(agent.rollout_context(), backend);
    Ok(tokio::spawn(async move { converger.run().await }))
}

/// Runs the node agent of a VM pool's machine until SIGTERM.
pub async fn run_node(options: crate::rollout::vm::node::NodeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.state_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", options.state_dir.display()))?;
    let context = crate::rollout::Context {
        store: Arc::new(crate::state::Store::open(&options.state_dir)?),
        status: Arc::default(),
        changed: Arc::default(),
        rollout: Default::default(),
        metrics: Arc::new(crate::metrics::Metrics::new()),
    };
    let docker = options.docker.clone();
    let images = options.state_dir.join("images");
    let node = crate::rollout::vm::node::NodeAgent::new(options, context, move || {
        DockerRuntime::new(&docker, &images)
    })?;
    tracing::info!("outpost-agent node running");
    notify_ready();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = node.run() => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("outpost-agent node stopped");
    Ok(())
}

/// The source loop: next candidate → verify and record → tell the source.
pub async fn drive(
    agent: Arc<Agent>,
    mut source: Box<dyn Source>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    // Container engines load carried images from the agent's own archive of them.
    let carried =
        matches!(agent.config.runtime, RuntimeKind::Docker | RuntimeKind::Vm).then(|| {
            Arc::new(KeepCarriedImages {
                dir: agent.config.images_dir(),
            })
        });
    let mut failures = 0u32;
    loop {
        let mut candidate = match source.next().await {
            Ok(candidate) => candidate,
            Err(e) => {
                failures += 1;
                let wait = source.retry_delay(failures);
                back_off(&agent, &shared, wait, format!("source error: {e}")).await;
                continue;
            }
        };
        failures = 0;
        let _busy = crate::memory::Busy::start();
        if let Ok(mut last) = shared.last_error.lock() {
            *last = None;
        }
        let (agent_for_task, origin) = (agent.clone(), candidate.origin.clone());
        let digest = candidate.digest;
        let admission = carried.clone();
        let started = std::time::Instant::now();
        let outcome = {
            let layout = std::mem::replace(&mut candidate.layout, Ok(Default::default()));
            tokio::task::spawn_blocking(move || match layout {
                Ok(layout) => {
                    let outcome = agent_for_task.ingest_admitting(
                        &layout,
                        &origin,
                        crate::config::now(),
                        admission.as_deref().map(|a| a as &dyn Admission),
                    );
                    // Archives the accepted release made unused go (file I/O: here, not on
                    // the loop's thread).
                    if let (Ok(Ingested::Accepted { .. }), Some(carried)) = (&outcome, &admission) {
                        carried.prune_unused(&agent_for_task);
                    }
                    outcome
                }
                Err(e) => {
                    agent_for_task.reject_unreadable(&origin, digest, &e, crate::config::now())
                }
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|result| result)
        };
        // The store failed (disk full, I/O error): report and retry later; the daemon and the
        // current release stay up. The candidate is not settled: a registry or git source looks
        // at it again on its next poll, a dropped file at the agent's next start.
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                failures += 1;
                back_off(
                    &agent,
                    &shared,
                    crate::backoff::delay(failures),
                    format!("recording {}: {e:#}", candidate.origin),
                )
                .await;
                continue;
            }
        };
        let metrics = &agent.metrics;
        metrics
            .verification_seconds
            .observe(started.elapsed().as_secs_f64());
        let origin = &candidate.origin;
        match &outcome {
            Ingested::Accepted { digest, .. } => {
                metrics.accepted.inc();
                tracing::info!(%digest, %origin, "{}", outcome.describe());
            }
            Ingested::Unchanged { digest } => {
                metrics.unchanged.inc();
                tracing::info!(%digest, %origin, "{}", outcome.describe());
            }
            Ingested::Rejected { digest, check, .. } => {
                metrics.rejection(check);
                let digest = digest.map(|d| d.to_string()).unwrap_or_default();
                tracing::warn!(%digest, %origin, "{}", outcome.describe());
            }
        }
        source.settle(candidate, &outcome).await;
    }
}

/// Counts the error, shows it in `status`, logs it and waits `wait`.
async fn back_off(agent: &Agent, shared: &Shared, wait: std::time::Duration, error: String) {
    agent.metrics.source_errors.inc();
    tracing::warn!("{error} (retry in {:.1}s)", wait.as_secs_f64());
    if let Ok(mut last) = shared.last_error.lock() {
        *last = Some(error);
    }
    tokio::time::sleep(wait).await;
}

/// systemd `Type=notify`: tell the service manager we are ready (no-op elsewhere).
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    if let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = socket.send_to(b"READY=1", &path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::testing::{signed_release, test_config};

    fn candidate(
        key: &str,
        layout: Result<outpost_bundle_format::Layout, outpost_bundle_format::layout::LayoutError>,
    ) -> source::Candidate {
        source::Candidate {
            origin: format!("fake {key}"),
            layout,
            spool: None,
            digest: None,
            key: key.into(),
            reading: None,
            file: None,
        }
    }

    /// The loop through the fake source: errors back off and are counted, outcomes reach the
    /// source in order, and nothing but the verdicts changes the store.
    #[tokio::test(start_paused = true)]
    async fn drive_settles_every_candidate_and_survives_source_errors() {
        let (_dir, config_path) = test_config("");
        let agent = Arc::new(Agent::new(Config::load(&config_path).unwrap()).unwrap());
        let (fake, sender) = source::fake::FakeSource::new();
        let settled = fake.settled.clone();
        let shared = Arc::new(Shared::default());
        let v1 = signed_release("1.0.0", 1);
        sender
            .send(Err(source::SourceError("registry down".into())))
            .unwrap();
        sender.send(Ok(candidate("v1", Ok(v1.clone())))).unwrap();
        sender.send(Ok(candidate("v1-again", Ok(v1)))).unwrap();
        let truncated = outpost_bundle_format::layout::LayoutError::Malformed {
            what: "tar".into(),
            reason: "truncated".into(),
        };
        sender
            .send(Ok(candidate("broken", Err(truncated))))
            .unwrap();
        sender
            .send(Ok(candidate("v2", Ok(signed_release("1.0.1", 2)))))
            .unwrap();
        let task = tokio::spawn(drive(agent.clone(), Box::new(fake), shared.clone()));
        while settled.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        let outcomes = settled.lock().unwrap().clone();
        let keys: Vec<&str> = outcomes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["v1", "v1-again", "broken", "v2"]);
        assert!(
            matches!(&outcomes[0].1, Ingested::Accepted { version, waiting_for: None, .. } if version == "1.0.0")
        );
        assert!(matches!(&outcomes[1].1, Ingested::Unchanged { .. }));
        assert!(matches!(&outcomes[2].1, Ingested::Rejected { check, .. } if check == "malformed"));
        assert!(matches!(&outcomes[3].1, Ingested::Accepted { version, .. } if version == "1.0.1"));
        assert!(shared.last_error.lock().unwrap().is_none());
        assert_eq!(
            agent
                .metrics
                .rejected
                .get_or_create(&crate::metrics::CheckLabel {
                    check: "malformed".into()
                })
                .get(),
            1
        );
        assert_eq!(agent.metrics.accepted.get(), 2);
        assert_eq!(agent.metrics.unchanged.get(), 1);
        let status = agent.status().unwrap();
        assert_eq!(status["current"]["sequence"], 2);
        assert_eq!(status["last_good"]["sequence"], 1);
        assert_eq!(status["last_rejection"]["check"], "malformed");
    }

    #[test]
    fn a_release_that_expires_while_waiting_is_dropped() {
        let (_dir, config_path) = test_config("approval: {mode: manual}\n");
        let agent = Agent::new(Config::load(&config_path).unwrap()).unwrap();
        // One agent per state directory.
        let second = Agent::new(Config::load(&config_path).unwrap());
        assert!(second.is_err_and(|e| e.to_string().contains("another outpost-agent is running")));
        let now = chrono::Utc::now();
        assert!(!*agent.release_waits.borrow(), "nothing waits yet");
        let outcome = agent
            .ingest(&signed_release("1.0.0", 1), "test", now)
            .unwrap();
        assert!(matches!(
            outcome,
            Ingested::Accepted {
                waiting_for: Some(_),
                ..
            }
        ));
        // The daemon's ticker re-evaluates only while a release waits.
        assert!(*agent.release_waits.borrow());
        agent.reconsider(now + chrono::Duration::days(2)).unwrap();
        assert!(
            !*agent.release_waits.borrow(),
            "the expired release waits no more"
        );
        let status = agent.status().unwrap();
        assert!(status["pending"].is_null(), "{status:#}");
        assert!(status["current"].is_null());
        assert!(
            agent
                .approve("1.0.0", None, "tester", now + chrono::Duration::days(2))
                .is_err()
        );
        let events = agent.store.history(10).unwrap();
        assert!(
            events.iter().any(|e| e.message.contains("expired")),
            "{events:?}"
        );
    }
}
