//! The node agent (`outpost-agent node`): runs on each machine of a VM pool. It joins the agent
//! once with the bootstrap secret, then fetches its assignment (long-polled), runs the replicas
//! assigned to this machine with the container-engine backend ([`Replicas`]: health checks,
//! surge, stop-first for stateful replicas) and reports what runs. When the agent cannot be
//! reached it keeps running its last assignment, which it keeps on disk across restarts. A
//! stateful replica's `/data` is the volume the agent attached to the machine for it
//! ([`Disks`]). Linked resources on other machines are reached through [`links`](super::links).

use super::disk::Disks;

#[path = "node_images.rs"]
mod images;
use super::images::CarriedImage;
use super::nodes::{Assignment, JoinAnswer, JoinRequest, Report, ReportedReplica};
use crate::config::{DockerConfig, Permissions};
use crate::forward::{Forwarder, LinkServer};
use crate::rollout::replicas::{Replicas, Settings};
use crate::rollout::snapshots::Snapshots;
use crate::rollout::{Context, RolloutError};
use crate::runtime::{Health, Runtime, Slot};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use outpost_bundle_format::stack::{Stack, StackFile};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest answer the node reads from the agent (an assignment carries a stack).
const MAX_ANSWER: usize = 8 << 20;
/// Between attempts to reach an agent that does not answer.
const RETRY: Duration = Duration::from_secs(3);
/// The longest error answer the node reads.
const MAX_ERROR: usize = 64 << 10;
/// How long a replica's load sample stands for it.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// The longest a carried image's download may go without receiving anything.
const IDLE_DOWNLOAD: Duration = Duration::from_secs(30);

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
    /// The engine. Public endpoints listen at `publish_address`, else at the machine's own
    /// address (the one it reaches the agent from: the load balancer's target).
    pub docker: DockerConfig,
    pub publish_address: Option<IpAddr>,
    /// Where the machine's attached volumes appear.
    pub disks: Disks,
    /// Where this machine's link server listens for peers (`0.0.0.0:7481`).
    pub links_listen: SocketAddr,
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
    /// The machine's address, as its last connection to the agent went out.
    own_address: Mutex<Option<IpAddr>>,
    /// The port its link server listens on, once bound.
    links_port: Mutex<Option<u16>>,
    /// Link listeners at the host address, for the replicas here.
    link_listeners: Forwarder,
    link_server: Arc<LinkServer>,
    links_summary: Mutex<String>,
    /// The carried images whose set the images directory was last pruned to.
    pruned_for: Mutex<Option<BTreeSet<String>>>,
    /// The last load sample of each autoscaled replica.
    samples: Mutex<
        std::collections::BTreeMap<
            crate::plan::ReplicaId,
            (std::time::Instant, crate::runtime::Usage),
        >,
    >,
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
            own_address: Mutex::default(),
            links_port: Mutex::default(),
            link_listeners: Forwarder::default(),
            link_server: Arc::default(),
            links_summary: Mutex::default(),
            pruned_for: Mutex::default(),
            samples: Mutex::default(),
        })
    }

    fn assignment_file(&self) -> PathBuf {
        self.options.state_dir.join("assignment.json")
    }

    /// Runs until the process ends.
    pub async fn run(&self) {
        match tokio::net::TcpListener::bind(self.options.links_listen).await {
            Ok(listener) => {
                if let Ok(mut port) = self.links_port.lock() {
                    *port = listener.local_addr().ok().map(|a| a.port());
                }
                tokio::spawn(self.link_server.clone().serve(listener));
            }
            Err(e) => tracing::error!(
                "links listener {}: {e} (replicas here are not reachable from other machines)",
                self.options.links_listen
            ),
        }
        // What the node waits for before it can carry out its assignment, last it looked.
        let mut waiting: Option<String> = None;
        // The stack and its replicas' address for this host, once known.
        let mut host: Option<(String, IpAddr)> = None;
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
                            // New links alone change listeners, not what runs here.
                            let same_work = Assignment {
                                generation: assignment.generation,
                                links: assignment.links.clone(),
                                ..next.clone()
                            } == assignment;
                            assignment = next;
                            self.keep(&assignment);
                            if !same_work {
                                outcome = None;
                            }
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
            let Some(stack) = assignment.release.as_ref().map(|r| r.stack["name"].clone()) else {
                continue;
            };
            let stack = stack.as_str().unwrap_or_default().to_string();
            if host.as_ref().is_none_or(|(known, _)| *known != stack) {
                match (self.runtime)().host_address(&stack).await {
                    Ok(address) => host = Some((stack, address)),
                    Err(e) => {
                        tracing::warn!("engine: {}", e.message);
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            let links_host = host.as_ref().map(|(_, address)| *address);
            let rebuild = backend.as_ref().is_none_or(|(built, replicas)| {
                built.grants != assignment.grants
                    || built.pools != assignment.pools
                    || built.gpus != assignment.gpus
                    || built.rollout != assignment.rollout
                    || replicas.settings().links_host != links_host
                    || replicas.settings().docker.publish.address != self.publish_address()
            });
            if rebuild {
                backend = Some((assignment.clone(), self.backend(&assignment, links_host)));
            }
            let Some((_, replicas)) = &backend else {
                continue;
            };
            // Carried images first: without them the engine would try a registry the site
            // may not reach. A failed fetch is tried again on the next pass; the rollout's
            // progress deadline bounds the wait.
            let images = assignment
                .release
                .as_ref()
                .map(|r| r.images.as_slice())
                .unwrap_or_default();
            let fetched = self.fetch_images(images, token.as_deref()).await;
            // Likewise each attached volume's device: waited for, a pass at a time.
            let fetched = fetched.and_then(|()| {
                assignment
                    .volumes
                    .iter()
                    .try_for_each(|v| self.options.disks.find(v).map(|_| ()))
            });
            if let Err(e) = &fetched {
                if waiting.as_ref() != Some(e) {
                    tracing::warn!("{e}");
                }
                // Looked at again shortly, not after a whole long poll.
                tokio::time::sleep(Duration::from_secs(1)).await;
                after = 0;
            }
            waiting = fetched.as_ref().err().cloned();
            // An assignment that failed is not tried again: the agent decides (it rolls back).
            // One carried out is kept converged by drift passes.
            if fetched.is_ok() && !matches!(outcome, Some(Err(_))) {
                let fresh = outcome.is_none();
                let result = self.converge(replicas, &assignment, fresh).await;
                if let Err(e) = &result {
                    tracing::warn!("assignment {}: {e}", assignment.generation);
                }
                if fresh || result.is_ok() {
                    outcome = Some(result);
                }
            }
            let report = self.report(replicas, &assignment, &outcome).await;
            let Some(credential) = &token else { continue };
            if let Err(CallError::Unauthorized(_)) = self.send_report(credential, &report).await {
                token = None;
            }
        }
    }

    /// Where public endpoints listen: as configured, else at the machine's own address.
    fn publish_address(&self) -> IpAddr {
        self.options.publish_address.unwrap_or_else(|| {
            self.own_address
                .lock()
                .ok()
                .and_then(|a| *a)
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into())
        })
    }

    fn backend(&self, assignment: &Assignment, links_host: Option<IpAddr>) -> Replicas<R> {
        let mut docker = self.options.docker.clone();
        docker.gpus = assignment.gpus.clone();
        docker.publish.address = self.publish_address();
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
            links_host,
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
                if let Some(host) = replicas.settings().links_host {
                    self.route_links(&stack, host, &instances, &assignment.links)
                        .await;
                }
                for instance in instances.iter().filter(|i| i.slot == Slot::Primary) {
                    let container = stack
                        .resource(&instance.replica.id.resource)
                        .map(|r| &r.container);
                    let check = container.and_then(|c| c.health_check.as_ref());
                    let health = runtime.probe(instance, check).await;
                    let usage = match container {
                        Some(c) if health == Health::Healthy => {
                            self.usage(runtime, instance, c).await
                        }
                        _ => None,
                    };
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
                        usage,
                    });
                }
                if let Ok(mut samples) = self.samples.lock() {
                    samples.retain(|id, _| report.replicas.iter().any(|r| r.replica == *id));
                }
            }
            Err(e) => {
                report.error.get_or_insert(format!("engine: {}", e.message));
            }
        }
        report
    }

    /// The load of a replica of an autoscaled resource, sampled at most every
    /// [`SAMPLE_EVERY`] (a sample takes the engine about a second).
    async fn usage(
        &self,
        runtime: &R,
        instance: &crate::runtime::Instance,
        container: &outpost_bundle_format::stack::Container,
    ) -> Option<crate::runtime::Usage> {
        if !matches!(
            container.scaling,
            outpost_bundle_format::stack::Scaling::Auto { .. }
        ) {
            return None;
        }
        let id = &instance.replica.id;
        let kept = self.samples.lock().ok()?.get(id).copied();
        if let Some((at, usage)) = kept
            && at.elapsed() < SAMPLE_EVERY
        {
            return Some(usage);
        }
        let usage = runtime.usage(instance, container.cpu.desired).await?;
        if let Ok(mut samples) = self.samples.lock() {
            samples.insert(id.clone(), (std::time::Instant::now(), usage));
        }
        Some(usage)
    }

    /// Points the link listeners at the linked resources' replicas, here or on peers, and
    /// offers this machine's to its peers.
    async fn route_links(
        &self,
        stack: &Stack,
        host: IpAddr,
        instances: &[crate::runtime::Instance],
        links: &super::nodes::Links,
    ) {
        let routes = super::links::routes(stack, host, instances, links);
        let summary = super::links::describe(&routes);
        if let Ok(mut last) = self.links_summary.lock()
            && *last != summary
        {
            tracing::info!("links: {summary}");
            *last = summary;
        }
        self.link_server.set(&links.secret, routes.offered);
        for error in self.link_listeners.update(routes.listeners).await {
            tracing::warn!("link listener {error}");
        }
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
            links_port: self.links_port.lock().ok().and_then(|p| *p),
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
        let exchange = async {
            let response = self.send(&method, path, token, body).await?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| CallError::Failed(format!("{method} {path}: {e}")))?
                .to_bytes();
            if status == StatusCode::OK {
                return Ok(bytes.to_vec());
            }
            Err(refusal(&method, path, status, &bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Failed(format!(
                    "{method} {path}: no answer in time"
                )))
            })
    }

    /// Sends one request to the agent; the answer, its body unread.
    async fn send(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let failed = |e: &dyn std::fmt::Display| CallError::Failed(format!("{method} {path}: {e}"));
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| failed(&e))?;
        if let (Ok(local), Ok(mut own)) = (stream.local_addr(), self.own_address.lock()) {
            *own = Some(local.ip());
        }
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
        sender.send_request(request).await.map_err(|e| failed(&e))
    }
}

/// Why the agent refused a request: the `error` of its JSON answer, else the status.
fn refusal(method: &Method, path: &str, status: StatusCode, answer: &[u8]) -> CallError {
    let message = serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| status.to_string());
    let message = format!("{method} {path}: {message}");
    if status == StatusCode::UNAUTHORIZED {
        CallError::Unauthorized(message)
    } else {
        CallError::Failed(message)
    }
}

/// The stack an assignment carries, checked with the stack rules on this side too.
fn assigned_stack(value: &serde_json::Value) -> Result<Stack, RolloutError> {
    let file: StackFile = serde_json::from_value(value.clone())
        .map_err(|e| RolloutError::new(format!("assigned stack: {e}")))?;
    Stack::from_file(&file).map_err(|e| RolloutError::new(format!("assigned stack: {e}")))
}
