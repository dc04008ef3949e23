//! The running agent: Source → Verify → Approve (→ Plan → Rollout → Runtime with the runtime
//! issues) around the state store, plus the local API. One task drives the source; errors back
//! off with jitter and never touch the current release.

use crate::api::{self, Shared};
use crate::config::{Config, SourceConfig};
use crate::pipeline::{Agent, Ingested};
use crate::source::{self, Source};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often pending releases are re-evaluated (maintenance windows open by the clock).
const RECONSIDER_EVERY: Duration = Duration::from_secs(30);

pub fn log(message: impl std::fmt::Display) {
    eprintln!(
        "{} {message}",
        outpost_bundle_format::release::rfc3339::format(&crate::config::now())
    );
}

/// Exponential backoff from 1 s to 5 min, with ±50% jitter so fleets do not poll in step.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << failures.saturating_sub(1).min(9));
    let capped = base.min(Duration::from_secs(300));
    capped.mul_f64(0.5 + fastrand::f64())
}

pub fn make_source(config: &Config, agent: &Agent) -> anyhow::Result<Box<dyn Source>> {
    let spool = config.state_dir.join("tmp");
    std::fs::create_dir_all(&spool)?;
    Ok(match &config.source {
        SourceConfig::Dir { path } => {
            Box::new(source::dir::DirSource::new(path, *agent.limits(), spool)?)
        }
        SourceConfig::Oci(oci) => Box::new(source::oci::OciSource::new(oci, *agent.limits())?),
        SourceConfig::Git(git) => Box::new(source::git::GitSource::new(
            git,
            &config.state_dir,
            *agent.limits(),
        )?),
    })
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(agent: Agent) -> anyhow::Result<()> {
    let socket = agent.config.api.socket.clone();
    let agent = Arc::new(agent);
    // Leftovers of a download interrupted by a crash.
    let tmp = agent.config.state_dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let source = make_source(&agent.config, &agent)?;
    let shared = Arc::new(Shared {
        source: source.describe(),
        ..Default::default()
    });
    agent.reconsider(crate::config::now())?;

    let server = {
        let (agent, shared, socket) = (agent.clone(), shared.clone(), socket.clone());
        tokio::spawn(async move { api::serve(agent, shared, &socket).await })
    };
    let ticker = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECONSIDER_EVERY).await;
                if let Err(e) = agent.reconsider(crate::config::now()) {
                    log(format!("reconsider: {e}"));
                }
            }
        })
    };
    log(format!(
        "outpost-agent running: {}, api {}",
        shared.source,
        socket.display()
    ));
    notify_ready();

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = drive(agent.clone(), source, shared.clone()) => result,
        result = server => result.map_err(anyhow::Error::from).and_then(|r| r),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    ticker.abort();
    let _ = std::fs::remove_file(&socket);
    log("outpost-agent stopped");
    result
}

/// The source loop: next candidate → verify and record → tell the source.
pub async fn drive(
    agent: Arc<Agent>,
    mut source: Box<dyn Source>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let mut failures = 0u32;
    loop {
        let mut candidate = match source.next().await {
            Ok(candidate) => candidate,
            Err(e) => {
                failures += 1;
                shared.poll_errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = shared.last_error.lock() {
                    *last = Some(e.to_string());
                }
                let wait = backoff(failures);
                log(format!(
                    "source error (retry in {:.1}s): {e}",
                    wait.as_secs_f64()
                ));
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        failures = 0;
        shared.polls.fetch_add(1, Ordering::Relaxed);
        shared.last_poll_unix.store(
            crate::config::now().timestamp().max(0) as u64,
            Ordering::Relaxed,
        );
        if let Ok(mut last) = shared.last_error.lock() {
            *last = None;
        }
        let (agent_for_task, origin) = (agent.clone(), candidate.origin.clone());
        let digest = candidate.digest.map(|d| d.to_string());
        let outcome = {
            let layout = std::mem::replace(&mut candidate.layout, Ok(Default::default()));
            tokio::task::spawn_blocking(move || match layout {
                Ok(layout) => agent_for_task.ingest(&layout, &origin, crate::config::now()),
                Err(e) => {
                    agent_for_task.reject_unreadable(&origin, digest, &e, crate::config::now())
                }
            })
            .await??
        };
        match &outcome {
            Ingested::Accepted { .. } => shared.accepted.fetch_add(1, Ordering::Relaxed),
            Ingested::Rejected { .. } => shared.rejected.fetch_add(1, Ordering::Relaxed),
            Ingested::Unchanged { .. } => shared.unchanged.fetch_add(1, Ordering::Relaxed),
        };
        log(format!("{}: {}", candidate.origin, outcome.describe()));
        source.settle(candidate, &outcome).await;
    }
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

    #[test]
    fn backoff_grows_caps_and_jitters() {
        for failures in 1..20 {
            let d = backoff(failures);
            assert!(d <= Duration::from_secs(450), "{failures}: {d:?}");
            assert!(d >= Duration::from_millis(500));
        }
        assert!(backoff(10) > Duration::from_secs(100));
    }
}
