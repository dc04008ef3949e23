//! The local API: HTTP/1.1 on the unix socket from the config. The customer's CLI is its
//! client. `/healthz` and `/metrics` (Prometheus text) live here too, and, when the customer
//! sets `api.metrics_address`, also on that TCP address, which serves nothing else.

use crate::pipeline::{Agent, HistoryView, Refused};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The source's health, shared by the loop and the API (its counters are in the metrics).
#[derive(Default)]
pub struct Shared {
    pub source: String,
    pub last_error: Mutex<Option<String>>,
}

/// Serves until the listener fails. Removes a stale socket file first.
pub async fn serve(agent: Arc<Agent>, shared: Arc<Shared>, socket: &Path) -> anyhow::Result<()> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("{}: another agent is already listening", socket.display());
        }
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Bound under a temporary name, restricted to 0660, then renamed into place: the socket is
    // never reachable with the process umask's looser mode.
    let staging = socket.with_file_name(format!(
        ".{}.{}",
        socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging)
        .map_err(|e| anyhow::anyhow!("{}: {e}", staging.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))?;
    std::fs::rename(&staging, socket).map_err(|e| anyhow::anyhow!("{}: {e}", socket.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let (agent, shared) = (agent.clone(), shared.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (agent, shared) = (agent.clone(), shared.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(handle(request, &agent, &shared, uid).await)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `address`, and nothing else: no decision and
/// no status is reachable over TCP.
pub async fn serve_metrics(agent: Arc<Agent>, address: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("api.metrics_address {address}: {e}"))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: wait rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = match (request.method(), request.uri().path()) {
                    (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
                    (&Method::GET, "/metrics") => metrics(&agent, request.headers()),
                    _ => text(
                        StatusCode::NOT_FOUND,
                        "only /metrics and /healthz here\n".into(),
                    ),
                };
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn outcome(result: anyhow::Result<String>) -> Response<Full<Bytes>> {
    match result {
        Ok(message) => reply(StatusCode::OK, json!({"message": message})),
        Err(e) if e.is::<Refused>() => reply(StatusCode::CONFLICT, json!({"error": e.to_string()})),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    }
}

async fn handle(
    request: Request<Incoming>,
    agent: &Agent,
    shared: &Shared,
    uid: Option<u32>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body: Value = match Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
    {
        Ok(bytes) if bytes.is_empty() => Value::Null,
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(value) => value,
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("body: {e}")}),
                );
            }
        },
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("body: {e}")}),
            );
        }
    };
    // Free text from the client ends up in history and logs: one line, bounded.
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .map(|text| one_line(text, 1000))
    };
    // Who decided: the name the CLI sends, with the uid the kernel vouches for.
    let who = format!(
        "{} (uid {})",
        field("who")
            .map(|w| one_line(&w, 64))
            .unwrap_or_else(|| "unknown".into()),
        uid.map_or("?".into(), |u| u.to_string())
    );
    let now = crate::config::now();
    let missing = |name: &str| {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("missing `{name}`")}),
        )
    };
    match (parts.method, parts.uri.path()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (Method::GET, "/metrics") => metrics(agent, &parts.headers),
        (Method::GET, "/status") => match agent.status() {
            Ok(mut status) => {
                status["source"] = json!({
                    "describe": shared.source,
                    "polls": agent.metrics.polls("ok") + agent.metrics.polls("error"),
                    "errors": agent.metrics.polls("error"),
                    "last_poll_unix": agent.metrics.last_poll_unix(),
                    "download": agent.metrics.download(),
                    "last_error": shared.last_error.lock().ok().and_then(|e| e.clone()),
                });
                reply(StatusCode::OK, status)
            }
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        },
        (Method::GET, "/plan") => match agent.plan() {
            Ok(plan) => reply(StatusCode::OK, plan),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        },
        (Method::GET, "/snapshots") => match agent.store.snapshots() {
            Ok(snapshots) => reply(StatusCode::OK, json!({ "snapshots": snapshots })),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        },
        (Method::GET, "/history") => {
            let limit = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("limit="))
                .and_then(|l| l.parse().ok())
                .unwrap_or(50usize)
                .min(10_000);
            let history = agent.store.history(limit).and_then(|events| {
                Ok(HistoryView {
                    events,
                    decisions: agent.store.decisions(limit)?,
                })
            });
            match history {
                Ok(view) => reply(
                    StatusCode::OK,
                    serde_json::to_value(view).unwrap_or_default(),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
            }
        }
        (Method::POST, "/approve") => match field("version") {
            Some(version) => {
                outcome(agent.approve(&version, field("digest").as_deref(), &who, now))
            }
            None => missing("version"),
        },
        (Method::POST, "/reject") => match (field("version"), field("reason")) {
            (Some(version), Some(reason)) => {
                outcome(agent.reject(&version, field("digest").as_deref(), &reason, &who, now))
            }
            (None, _) => missing("version"),
            (_, None) => missing("reason"),
        },
        (Method::POST, "/pin") => match field("version") {
            Some(version) => outcome(agent.pin(&version, &who, now)),
            None => missing("version"),
        },
        (Method::POST, "/unpin") => outcome(agent.unpin(&who, now)),
        (Method::POST, "/rollback") => {
            let restore_data = body.get("restore_data").and_then(Value::as_bool) == Some(true);
            outcome(agent.rollback(&who, restore_data, now))
        }
        (method, path) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no route {method} {path}")}),
        ),
    }
}

/// `text` with control characters (newlines included) replaced by spaces, at most `max` chars.
fn one_line(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `/metrics`: the Prometheus text format, or OpenMetrics when the scraper asks for it.
fn metrics(agent: &Agent, headers: &hyper::HeaderMap) -> Response<Full<Bytes>> {
    let positions = agent.store.positions().unwrap_or_default();
    let runtime = agent.runtime_view.current();
    let replicas = runtime
        .resources
        .iter()
        .filter_map(|(name, r)| Some((name.clone(), r.desired.unwrap_or(0), r.ready?)))
        .collect();
    let pools = runtime
        .pools
        .iter()
        .map(|(name, pool)| {
            let mut states = std::collections::BTreeMap::new();
            for machine in &pool.machines {
                // `unhealthy: why` counts as unhealthy.
                let state = machine.state.split(':').next().unwrap_or_default();
                *states.entry(state.to_string()).or_insert(0) += 1;
            }
            (name.clone(), u64::from(pool.desired), states)
        })
        .collect();
    let machine_replicas = runtime
        .pools
        .iter()
        .flat_map(|(pool, status)| {
            status.machines.iter().map(|machine| {
                (
                    pool.clone(),
                    machine.id.clone(),
                    machine.replicas.len() as u64,
                )
            })
        })
        .collect();
    let mut volumes = std::collections::BTreeMap::new();
    for volume in runtime.volumes.values() {
        // `attached to i-…` counts as attached.
        let state = volume.state.split(" to ").next().unwrap_or_default();
        *volumes.entry(state.to_string()).or_insert(0) += 1;
    }
    let load_balancer_targets = runtime
        .load_balancers
        .iter()
        .map(|(endpoint, balancer)| (endpoint.clone(), balancer.targets.len() as u64))
        .collect();
    let snapshot = crate::metrics::Snapshot {
        current_sequence: positions.current.as_ref().map(|c| c.sequence),
        pending_sequence: positions.pending.as_ref().map(|p| p.sequence),
        highest_sequence: positions.highest_sequence,
        replicas,
        pools,
        machine_replicas,
        volumes,
        load_balancer_targets,
        now_unix: crate::config::now().timestamp() as f64,
    };
    let openmetrics = headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let mut response = text(StatusCode::OK, agent.metrics.encode(&snapshot, openmetrics));
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS
    } else {
        crate::metrics::PROMETHEUS_TEXT
    };
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// The CLI side: one request to the agent's socket. Returns the status code and JSON body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent at {}: {e} (is `outpost-agent run` running?)",
            socket.display()
        )
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let payload = body
        .map(|b| serde_json::to_vec(&b).unwrap_or_default())
        .unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "outpost-agent")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the agent's answer: {e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}
