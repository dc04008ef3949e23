//! The node agent (`outpost-agent node`): runs on each machine of a VM pool. It joins the agent
//! once with the bootstrap secret, then fetches its assignment (long-polled), runs the replicas
//! assigned to this machine with the container-engine backend ([`Replicas`]: health checks,
//! surge, stop-first for stateful replicas) and reports what runs. When the agent cannot be
//! reached it keeps running its last assignment, which it keeps on disk across restarts. A
//! stateful replica's `/data` is the volume the agent attached to the machine for it
//! ([`Disks`]).

use super::disk::Disks;
use super::nodes::{Assignment, JoinAnswer, JoinRequest, Report, ReportedReplica};
use crate::config::{DockerConfig, Permissions};
use crate::rollout::replicas::{Replicas, Settings};
use crate::rollout::snapshots::Snapshots;
use crate::rollout::{Context, RolloutError};
use crate::runtime::{Health, Runtime, Slot};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use outpost_bundle_format::stack::{Stack, StackFile};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The longest answer the node reads from the agent (an assignment carries a stack).
const MAX_ANSWER: usize = 8 << 20;
/// Between attempts to reach an agent that does not answer.
const RETRY: Duration = Duration::from_secs(3);

/// Who this node is and where its agent is.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The agent's node URL (`http://10.0.1.5:7480`).
    pub agent: String,
    pub instance_id: String,
    /// The machine settings its user data was made for.
    pub settings: String,
    pub bootstrap_secret: String,
    /// Where the last assignment is kept.
    pub state_dir: PathBuf,
    /// The engine and where public endpoints listen on the machine.
    pub docker: DockerConfig,
    /// Where the machine's attached volumes appear.
    pub disks: Disks,
}

/// Why a call to the agent failed.
enum CallError {
    /// The credential is not (or no longer) accepted: join again.
    Unauthorized(String),
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unauthorized(m) | CallError::Failed(m) => f.write_str(m),
        }
    }
}

/// One machine's node agent over a container engine `R`.
pub struct NodeAgent<R: Runtime, F: Fn() -> R> {
    options: NodeOptions,
    context: Context,
    runtime: F,
    authority: String,
}

impl<R: Runtime, F: Fn() -> R> NodeAgent<R, F> {
    /// `runtime` makes the engine client (again when the customer's grants change).
    pub fn new(options: NodeOptions, context: Context, runtime: F) -> anyhow::Result<Self> {
        let authority = options
            .agent
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
            .ok_or_else(|| {
                anyhow::anyhow!("--agent {}: an http:// URL is expected", options.agent)
            })?;
        Ok(NodeAgent {
            options,
            context,
            runtime,
            authority,
        })
    }

    fn assignment_file(&self) -> PathBuf {
        self.options.state_dir.join("assignment.json")
    }

    /// Runs until the process ends.
    pub async fn run(&self) {
        let mut assignment: Assignment = std::fs::read(self.assignment_file())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let mut token: Option<String> = None;
        let mut backend: Option<(Assignment, Replicas<R>)> = None;
        // The outcome of carrying out the current assignment, once tried.
        let mut outcome: Option<Result<(), String>> = None;
        // The generation the next long poll waits past (0 after joining: any assignment).
        let mut after = 0;
        loop {
            if token.is_none() {
                match self.join().await {
                    Ok(answer) => {
                        token = Some(answer.token);
                        after = 0;
                    }
                    Err(e) => {
                        tracing::warn!("joining {}: {e}", self.options.agent);
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            if let Some(credential) = &token {
                match self.fetch(credential, after).await {
                    Ok(next) => {
                        if next != assignment {
                            assignment = next;
                            self.keep(&assignment);
                            outcome = None;
                        }
                        after = assignment.generation;
                    }
                    Err(CallError::Unauthorized(e)) => {
                        tracing::warn!("{e}");
                        token = None;
                    }
                    Err(CallError::Failed(e)) => {
                        tracing::warn!(
                            "reaching {}: {e} (running the last assignment)",
                            self.options.agent
                        );
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            if assignment.release.is_none() {
                continue;
            }
            let rebuild = backend.as_ref().is_none_or(|(built, _)| {
                built.grants != assignment.grants
                    || built.pools != assignment.pools
                    || built.gpus != assignment.gpus
                    || built.rollout != assignment.rollout
            });
            if rebuild {
                backend = Some((assignment.clone(), self.backend(&assignment)));
            }
            let Some((_, replicas)) = &backend else {
                continue;
            };
            // An assignment that failed is not tried again: the agent decides (it rolls back).
            // One carried out is kept converged by drift passes.
            if !matches!(outcome, Some(Err(_))) {
                let fresh = outcome.is_none();
                let result = self.converge(replicas, &assignment, fresh).await;
                if let Err(e) = &result {
                    tracing::warn!("assignment {}: {e}", assignment.generation);
                }
                if fresh || result.is_ok() {
                    outcome = Some(result);
                }
            }
            let Some(credential) = &token else { continue };
            let report = self.report(replicas, &assignment, &outcome).await;
            if let Err(CallError::Unauthorized(_)) = self.send_report(credential, &report).await {
                token = None;
            }
        }
    }

    fn backend(&self, assignment: &Assignment) -> Replicas<R> {
        let mut docker = self.options.docker.clone();
        docker.gpus = assignment.gpus.clone();
        let grants = assignment
            .grants
            .iter()
            .map(|(profile, environment)| {
                (
                    profile.clone(),
                    serde_json::json!({ "environment": environment }),
                )
            })
            .collect();
        let settings = Settings {
            docker,
            pools: assignment.pools.clone(),
            permissions: Permissions(grants),
            snapshots: Snapshots::off(&self.options.state_dir),
        };
        let mut context = self.context.clone();
        context.rollout = assignment.rollout.clone();
        Replicas::new(context, settings, (self.runtime)())
    }

    async fn converge(
        &self,
        replicas: &Replicas<R>,
        assignment: &Assignment,
        fresh: bool,
    ) -> Result<(), String> {
        let Some(release) = &assignment.release else {
            return Ok(());
        };
        let stack = assigned_stack(&release.stack).map_err(|e| e.message)?;
        // Each stateful replica's /data is the volume attached for it.
        for volume in &assignment.volumes {
            let device = self.options.disks.prepare(volume).await?;
            replicas
                .runtime()
                .use_device(&stack.name, &volume.replica, &device)
                .await
                .map_err(|e| e.message)?;
        }
        let only: BTreeSet<_> = assignment.replicas.iter().cloned().collect();
        replicas
            .run(release.digest, &stack, fresh, Some(only))
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }

    async fn report(
        &self,
        replicas: &Replicas<R>,
        assignment: &Assignment,
        outcome: &Option<Result<(), String>>,
    ) -> Report {
        let mut report = Report {
            generation: assignment.generation,
            ..Report::default()
        };
        match outcome {
            Some(Ok(())) => report.converged = assignment.release.as_ref().map(|r| r.digest),
            Some(Err(e)) => report.error = Some(e.clone()),
            None => {}
        }
        let Some(stack) = assignment
            .release
            .as_ref()
            .and_then(|r| assigned_stack(&r.stack).ok())
        else {
            return report;
        };
        let runtime = replicas.runtime();
        match runtime.observe(&stack.name).await {
            Ok(instances) => {
                for instance in instances.iter().filter(|i| i.slot == Slot::Primary) {
                    let check = stack
                        .resource(&instance.replica.id.resource)
                        .and_then(|r| r.container.health_check.as_ref());
                    let health = runtime.probe(instance, check).await;
                    report.replicas.push(ReportedReplica {
                        replica: instance.replica.id.clone(),
                        config_hash: instance.replica.config_hash.clone(),
                        healthy: health == Health::Healthy,
                        health: match health {
                            Health::Healthy => "healthy".into(),
                            Health::Starting(why) => format!("starting: {why}"),
                            Health::Unhealthy(why) => format!("unhealthy: {why}"),
                            Health::Down(why) => format!("down: {why}"),
                        },
                    });
                }
            }
            Err(e) => {
                report.error.get_or_insert(format!("engine: {}", e.message));
            }
        }
        report
    }

    /// Keeps the assignment on disk (atomically) for a restart without the agent.
    fn keep(&self, assignment: &Assignment) {
        let write = serde_json::to_vec(assignment)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                outpost_bundle_format::layout::write_atomic(&self.assignment_file(), &bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = write {
            tracing::warn!("{}: {e}", self.assignment_file().display());
        }
    }

    async fn join(&self) -> Result<JoinAnswer, String> {
        let request = JoinRequest {
            instance_id: self.options.instance_id.clone(),
            bootstrap_secret: self.options.bootstrap_secret.clone(),
            settings: self.options.settings.clone(),
        };
        let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let answer = self
            .call(
                Method::POST,
                "/v1/join",
                None,
                Some(body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&answer).map_err(|e| format!("join answer: {e}"))
    }

    async fn fetch(&self, token: &str, after: u64) -> Result<Assignment, CallError> {
        let answer = self
            .call(
                Method::GET,
                &format!("/v1/assignment?after={after}"),
                Some(token),
                None,
                Duration::from_secs(40),
            )
            .await?;
        serde_json::from_slice(&answer).map_err(|e| CallError::Failed(format!("assignment: {e}")))
    }

    async fn send_report(&self, token: &str, report: &Report) -> Result<(), CallError> {
        let body = serde_json::to_vec(report).map_err(|e| CallError::Failed(e.to_string()))?;
        self.call(
            Method::POST,
            "/v1/report",
            Some(token),
            Some(body),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let failed = |e: &dyn std::fmt::Display| CallError::Failed(format!("{method} {path}: {e}"));
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| failed(&e))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| failed(&e))?;
            tokio::spawn(connection);
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("Host", &self.authority)
                .header("Content-Type", "application/json");
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| failed(&e))?;
            let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| failed(&e))?
                .to_bytes();
            let message = || {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| status.to_string())
            };
            match status {
                StatusCode::OK => Ok(bytes.to_vec()),
                StatusCode::UNAUTHORIZED => Err(CallError::Unauthorized(format!(
                    "{method} {path}: {}",
                    message()
                ))),
                _ => Err(CallError::Failed(format!("{method} {path}: {}", message()))),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Failed(format!(
                    "{method} {path}: no answer in time"
                )))
            })
    }
}

/// The stack an assignment carries, checked with the stack rules on this side too.
fn assigned_stack(value: &serde_json::Value) -> Result<Stack, RolloutError> {
    let file: StackFile = serde_json::from_value(value.clone())
        .map_err(|e| RolloutError::new(format!("assigned stack: {e}")))?;
    Stack::from_file(&file).map_err(|e| RolloutError::new(format!("assigned stack: {e}")))
}
