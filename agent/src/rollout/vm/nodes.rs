//! The agent's side of the node protocol: HTTP/1.1 JSON on `vm.nodes.listen`, inside the
//! customer's network. A machine joins once with the bootstrap secret from its user data and
//! its instance id, which must be a machine of one of the agent's pools; it gets a credential
//! bound to that instance id. With it, the node fetches its assignment (long-polled) and
//! reports what runs. `GET /v1/binary` serves this agent's own executable, whose SHA-256 the
//! user data checks before running it; `GET /v1/images/{digest}.tar` (with the credential) the
//! archive of an image the release's bundle carried.

use super::images::{Archives, CarriedImage};
use crate::plan::ReplicaId;
use crate::runtime::engine::FileBody;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use outpost_bundle_format::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The largest request body a node may send.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub instance_id: String,
    pub bootstrap_secret: String,
    /// The pool settings its user data was made for.
    pub settings: String,
    /// The port its link server listens on, at the address it joins from.
    #[serde(default)]
    pub links_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JoinAnswer {
    /// The node's credential: `Authorization: Bearer TOKEN` on every later request.
    pub token: String,
}

/// The release a node runs, as the agent verified it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssignedRelease {
    pub name: String,
    pub version: String,
    pub digest: Digest,
    /// The stack file (JSON) the release carries; the node checks it with the stack rules.
    pub stack: serde_json::Value,
    /// The images the bundle carried, which the node fetches from the agent.
    #[serde(default)]
    pub images: Vec<CarriedImage>,
}

/// What one machine runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Grows with every change of any node's assignment.
    pub generation: u64,
    pub release: Option<AssignedRelease>,
    pub replicas: Vec<ReplicaId>,
    /// The customer's environment grants, by permission profile.
    pub grants: BTreeMap<String, BTreeMap<String, String>>,
    /// The capacity pools the customer configured (resources name them).
    pub pools: Vec<String>,
    /// The GPUs each machine of this machine's pool has, by type.
    pub gpus: BTreeMap<String, u32>,
    /// The customer's rollout settings (progress deadline, grace), as the agent has them.
    pub rollout: crate::config::RolloutConfig,
    /// The volumes attached to this machine for its stateful replicas.
    #[serde(default)]
    pub volumes: Vec<AttachedVolume>,
    /// Where the linked resources this machine does not run are reached.
    #[serde(default)]
    pub links: Links,
}

/// Links across machines: the other machines' link servers, by the linked resource they run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Links {
    /// What a peer's link server wants to hear (the same for every machine of the agent).
    pub secret: String,
    pub peers: BTreeMap<String, Vec<std::net::SocketAddr>>,
}

/// A volume attached to the machine: the disk behind one replica's `/data`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttachedVolume {
    pub replica: ReplicaId,
    /// The cloud's id for it (`vol-…`).
    pub volume: String,
    /// The device name it was attached under (`/dev/sdf`).
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportedReplica {
    pub replica: ReplicaId,
    pub config_hash: String,
    pub healthy: bool,
    /// `healthy`, `starting: …`, `down: exited with code 1`.
    pub health: String,
    /// Its load, sampled for autoscaled resources.
    #[serde(default)]
    pub usage: Option<crate::runtime::Usage>,
}

/// What a node says it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The assignment this report is about.
    pub generation: u64,
    /// The release it converged on, if it did.
    pub converged: Option<Digest>,
    /// Why it could not, in one line.
    pub error: Option<String>,
    pub replicas: Vec<ReportedReplica>,
}

/// One joined machine.
#[derive(Debug, Clone)]
pub struct Node {
    pub settings: String,
    /// Its link server: the address it joined from, at the port it named.
    pub links: Option<std::net::SocketAddr>,
    pub joined_at: Instant,
    pub assignment: Assignment,
    pub report: Option<Report>,
    pub reported_at: Option<Instant>,
}

#[derive(Default)]
struct Registry {
    /// The machines of the agent's pools, as the cloud last described them.
    allowed: BTreeSet<String>,
    /// Credential → machine id.
    tokens: BTreeMap<String, String>,
    nodes: BTreeMap<String, Node>,
    generation: u64,
}

/// The nodes this agent knows, shared by the node server and the VM backend.
pub struct Nodes {
    secret: String,
    /// Derived from the bootstrap secret: stable across agent restarts, so links between
    /// machines keep working while nodes join a restarted agent.
    links_secret: String,
    /// How long a node's request for a new assignment is held open: nodes report after each,
    /// so this is well inside the report timeout.
    long_poll: Duration,
    binary: PathBuf,
    /// The archives of carried images machines fetch.
    pub archives: Archives,
    registry: Mutex<Registry>,
    /// Bumped on every assignment change: long polls wake.
    assigned: watch::Sender<u64>,
    /// Bumped on every report and join: the backend wakes.
    reported: watch::Sender<u64>,
}

impl Nodes {
    /// `report_timeout`: how long a node may stay quiet before its machine counts as lost.
    /// `images`: where the agent keeps the archives of carried images.
    pub fn new(
        secret: String,
        binary: PathBuf,
        images: PathBuf,
        report_timeout: Duration,
    ) -> Arc<Nodes> {
        let links_secret =
            outpost_bundle_format::Digest::of(format!("outpost links secret\n{secret}").as_bytes())
                .hex();
        Arc::new(Nodes {
            links_secret,
            secret,
            long_poll: (report_timeout / 3)
                .clamp(Duration::from_millis(500), Duration::from_secs(25)),
            binary,
            archives: Archives::new(images),
            registry: Mutex::default(),
            assigned: watch::channel(0).0,
            reported: watch::channel(0).0,
        })
    }

    /// The machines allowed to join (those of the agent's pools); nodes of machines no longer
    /// listed are forgotten, with their credentials.
    pub fn allow(&self, machines: BTreeSet<String>) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.nodes.retain(|id, _| machines.contains(id));
            registry
                .tokens
                .retain(|_, machine| machines.contains(machine));
            registry.allowed = machines;
        }
    }

    /// The joined machines and what they last said.
    pub fn nodes(&self) -> BTreeMap<String, Node> {
        self.registry
            .lock()
            .map(|r| r.nodes.clone())
            .unwrap_or_default()
    }

    /// Gives `machine` a new assignment (if it differs from the one it has; the generation is
    /// set here).
    pub fn assign(&self, machine: &str, mut assignment: Assignment) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let generation = registry.generation + 1;
        let Some(node) = registry.nodes.get_mut(machine) else {
            return;
        };
        assignment.generation = node.assignment.generation;
        // Links are kept apart (`link`): they follow what every machine runs.
        assignment.links = node.assignment.links.clone();
        if node.assignment == assignment {
            return;
        }
        assignment.generation = generation;
        node.assignment = assignment;
        registry.generation = generation;
        self.assigned.send_replace(generation);
    }

    /// Gives `machine` new links (if they differ from the ones it has).
    pub fn link(&self, machine: &str, peers: BTreeMap<String, Vec<std::net::SocketAddr>>) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        let generation = registry.generation + 1;
        let Some(node) = registry.nodes.get_mut(machine) else {
            return;
        };
        let links = Links {
            secret: self.links_secret.clone(),
            peers,
        };
        if node.assignment.links == links {
            return;
        }
        node.assignment.links = links;
        node.assignment.generation = generation;
        registry.generation = generation;
        self.assigned.send_replace(generation);
    }

    /// Waits until a node reports or joins, or `timeout` passes.
    pub async fn wait_report(&self, timeout: Duration) {
        let mut seen = self.reported.subscribe();
        let _ = tokio::time::timeout(timeout, seen.changed()).await;
    }

    fn join(
        &self,
        request: JoinRequest,
        from: std::net::IpAddr,
    ) -> Result<JoinAnswer, (StatusCode, String)> {
        if !outpost_bundle_format::crypto::secrets_equal(
            request.bootstrap_secret.as_bytes(),
            self.secret.as_bytes(),
        ) {
            return Err((StatusCode::FORBIDDEN, "wrong bootstrap secret".into()));
        }
        let mut registry = self.registry.lock().map_err(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "registry poisoned".into(),
            )
        })?;
        if !registry.allowed.contains(&request.instance_id) {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "instance {} is not a machine of this agent's pools",
                    request.instance_id
                ),
            ));
        }
        let token = outpost_bundle_format::crypto::random_secret()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // One credential per machine: a node that joins again replaces its old one.
        registry.tokens.retain(|_, m| *m != request.instance_id);
        registry
            .tokens
            .insert(token.clone(), request.instance_id.clone());
        let node = registry
            .nodes
            .entry(request.instance_id.clone())
            .or_insert_with(|| Node {
                settings: String::new(),
                links: None,
                joined_at: Instant::now(),
                assignment: Assignment::default(),
                report: None,
                reported_at: None,
            });
        node.settings = request.settings;
        node.links = request
            .links_port
            .map(|port| std::net::SocketAddr::new(from, port));
        tracing::info!(machine = %request.instance_id, "node joined");
        drop(registry);
        self.reported.send_modify(|n| *n += 1);
        Ok(JoinAnswer { token })
    }

    fn machine_of(&self, request: &Request<Incoming>) -> Result<String, (StatusCode, String)> {
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or((StatusCode::UNAUTHORIZED, "no node credential".to_string()))?;
        let registry = self.registry.lock().map_err(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "registry poisoned".into(),
            )
        })?;
        registry
            .tokens
            .iter()
            .find(|(known, _)| {
                outpost_bundle_format::crypto::secrets_equal(known.as_bytes(), token.as_bytes())
            })
            .map(|(_, machine)| machine.clone())
            .ok_or((
                StatusCode::UNAUTHORIZED,
                "unknown node credential: join again".to_string(),
            ))
    }

    fn assignment(&self, machine: &str) -> Option<Assignment> {
        self.registry
            .lock()
            .ok()?
            .nodes
            .get(machine)
            .map(|n| n.assignment.clone())
    }

    fn record(&self, machine: &str, report: Report) {
        if let Ok(mut registry) = self.registry.lock()
            && let Some(node) = registry.nodes.get_mut(machine)
        {
            node.report = Some(report);
            node.reported_at = Some(Instant::now());
        }
        self.reported.send_modify(|n| *n += 1);
    }

    /// Serves the node protocol on `listener` for ever.
    pub async fn serve(self: Arc<Nodes>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, from)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let nodes = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let nodes = nodes.clone();
                    async move {
                        let response = match nodes.handle(request, from.ip()).await {
                            Ok(response) => response,
                            Err((status, message)) => {
                                json(status, &serde_json::json!({"error": message}))
                            }
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        from: std::net::IpAddr,
    ) -> Result<Response<Answer>, (StatusCode, String)> {
        let path = request.uri().path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/v1/binary") => {
                // Streamed: a debug build is hundreds of MB.
                let file = FileBody::open(&self.binary).await.map_err(|e| {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{}: {e}", self.binary.display()),
                    )
                })?;
                Ok(Response::new(Either::Right(file)))
            }
            (Method::GET, image) if image.starts_with("/v1/images/") => {
                self.machine_of(&request)?;
                let archive = image
                    .strip_prefix("/v1/images/")
                    .and_then(|name| name.strip_suffix(".tar"))
                    .and_then(|digest| self.archives.archive(digest))
                    .ok_or((StatusCode::NOT_FOUND, format!("no {image} here")))?;
                let file = FileBody::open(&archive)
                    .await
                    .map_err(|e| (StatusCode::NOT_FOUND, format!("{image}: {e}")))?;
                Ok(Response::new(Either::Right(file)))
            }
            (Method::POST, "/v1/join") => {
                let join: JoinRequest = body(request).await?;
                Ok(json(StatusCode::OK, &self.join(join, from)?))
            }
            (Method::GET, "/v1/assignment") => {
                let machine = self.machine_of(&request)?;
                let after: u64 = request
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("after="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut changes = self.assigned.subscribe();
                let deadline = tokio::time::Instant::now() + self.long_poll;
                loop {
                    let assignment = self.assignment(&machine).ok_or((
                        StatusCode::UNAUTHORIZED,
                        "this machine left the pool: join again".to_string(),
                    ))?;
                    if assignment.generation > after || tokio::time::Instant::now() >= deadline {
                        return Ok(json(StatusCode::OK, &assignment));
                    }
                    let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
                }
            }
            (Method::POST, "/v1/report") => {
                let machine = self.machine_of(&request)?;
                let report: Report = body(request).await?;
                self.record(&machine, report);
                Ok(json(StatusCode::OK, &serde_json::json!({})))
            }
            _ => Err((StatusCode::NOT_FOUND, format!("no {path} here"))),
        }
    }
}

async fn body<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, (StatusCode, String)> {
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("request body: {e}")))
}

/// An answer: JSON, or a file streamed.
type Answer = Either<Full<Bytes>, FileBody>;

fn json(status: StatusCode, value: &impl Serialize) -> Response<Answer> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(
        serde_json::to_vec(value).unwrap_or_default(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
