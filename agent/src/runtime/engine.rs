//! A small client for the Docker Engine API (v1.41) on a unix socket: the calls the Docker
//! runtime makes, nothing more. dockerd and Podman's compatible service both answer it.
//! One connection per request: the socket is local, and nothing is held between polls.

use http_body_util::{BodyExt, Either, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const API: &str = "/v1.41";
/// Engine answers are small JSON documents; anything bigger is a fault, not data.
const MAX_ANSWER: usize = 16 << 20;
/// How long the engine may stay silent: for the answer's head, and between parts of a streamed
/// answer (a long pull that keeps reporting progress is fine).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("container engine at {socket}: {message}")]
    Transport { socket: String, message: String },
    #[error("container engine: {method} {path}: {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
}

impl EngineError {
    fn status(&self) -> Option<u16> {
        match self {
            EngineError::Api { status, .. } => Some(*status),
            EngineError::Transport { .. } => None,
        }
    }
}

/// An answer, or `None` where the engine says there is no such thing (404).
fn absent_ok(answer: Result<Value, EngineError>) -> Result<Option<Value>, EngineError> {
    match answer {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.status() == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What is done with a successful answer's body.
enum Answer<'a> {
    /// Kept whole (a JSON document, at most `MAX_ANSWER`).
    Whole,
    /// JSON lines, each handed over as it comes (image pulls, loads); a line carrying `error`
    /// fails the request.
    Lines(&'a mut (dyn FnMut(&Value) + Send)),
    /// Raw bytes of any length (a volume's archive), sent on as they come.
    Stream(tokio::sync::mpsc::Sender<Bytes>),
}

/// A request body.
enum Payload<'a> {
    None,
    Json(&'a Value),
    /// A tar archive streamed from a file, never held in memory whole (images are large).
    TarFile(FileBody),
}

/// A file as a request or answer body, read a chunk at a time.
pub struct FileBody {
    file: tokio::fs::File,
    size: u64,
    buffer: Box<[u8]>,
}

impl FileBody {
    pub async fn open(path: &Path) -> std::io::Result<FileBody> {
        let file = tokio::fs::File::open(path).await?;
        let size = file.metadata().await?.len();
        Ok(FileBody {
            file,
            size,
            buffer: vec![0u8; 256 << 10].into_boxed_slice(),
        })
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use tokio::io::AsyncRead;
        let this = &mut *self;
        let mut read = tokio::io::ReadBuf::new(&mut this.buffer);
        match std::pin::Pin::new(&mut this.file).poll_read(cx, &mut read) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Some(Err(e))),
            std::task::Poll::Ready(Ok(())) if read.filled().is_empty() => {
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(Some(Ok(
                hyper::body::Frame::data(Bytes::copy_from_slice(read.filled())),
            ))),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.size)
    }
}

#[derive(Clone)]
pub struct Engine {
    socket: PathBuf,
}

impl Engine {
    pub fn new(socket: &Path) -> Engine {
        Engine {
            socket: socket.to_path_buf(),
        }
    }

    fn transport(&self, message: impl std::fmt::Display) -> EngineError {
        EngineError::Transport {
            socket: self.socket.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Sends one request; a successful answer's body goes where `answer` says (an error's is
    /// always kept whole, for its message).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Payload<'_>,
        headers: &[(&str, String)],
        mut answer_to: Answer<'_>,
    ) -> Result<Vec<u8>, EngineError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.transport(e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.transport(e))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://engine{API}{path}"))
            .header("Host", "engine");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let mut head_timeout = IDLE_TIMEOUT;
        let payload = match body {
            Payload::Json(body) => {
                request = request.header("Content-Type", "application/json");
                Either::Left(Full::new(Bytes::from(
                    serde_json::to_vec(body).unwrap_or_default(),
                )))
            }
            Payload::TarFile(file) => {
                // The head comes after the whole upload: allow for it at 10 MiB/s.
                head_timeout += Duration::from_secs(file.size / (10 << 20));
                request = request
                    .header("Content-Type", "application/x-tar")
                    .header("Content-Length", file.size);
                Either::Right(file)
            }
            Payload::None => Either::Left(Full::new(Bytes::new())),
        };
        let request = request.body(payload).map_err(|e| self.transport(e))?;
        let silent = |what: &str| self.transport(format!("{method} {path}: no {what} in time"));
        let exchange = async {
            let response = tokio::time::timeout(head_timeout, sender.send_request(request))
                .await
                .map_err(|_| silent("answer"))?
                .map_err(|e| self.transport(e))?;
            let status = response.status();
            let mut body = response.into_body();
            let mut answer = Vec::new();
            // Streamed answers are JSON lines: each is handed over as it comes. An error
            // status is one JSON document whose message is the reason: kept whole.
            let streamed = matches!(answer_to, Answer::Lines(_)) && status.is_success();
            let raw = match &answer_to {
                Answer::Stream(sink) if status.is_success() => Some(sink.clone()),
                _ => None,
            };
            let mut take_line = |line: &[u8]| -> Result<(), EngineError> {
                let Answer::Lines(on_line) = &mut answer_to else {
                    return Ok(());
                };
                let Ok(value) = serde_json::from_slice::<Value>(line) else {
                    return Ok(());
                };
                if let Some(error) = value.get("error").and_then(Value::as_str) {
                    return Err(EngineError::Api {
                        method: method.to_string(),
                        path: path.to_string(),
                        status: status.as_u16(),
                        message: one_line(error),
                    });
                }
                on_line(&value);
                Ok(())
            };
            while let Some(frame) = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
                .await
                .map_err(|_| silent("progress"))?
            {
                let frame = frame.map_err(|e| self.transport(e))?;
                if let Some(sink) = &raw {
                    if let Ok(data) = frame.into_data()
                        && sink.send(data).await.is_err()
                    {
                        return Err(
                            self.transport(format!("{method} {path}: the answer's reader stopped"))
                        );
                    }
                    continue;
                }
                if let Some(data) = frame.data_ref() {
                    if answer.len() + data.len() > MAX_ANSWER {
                        return Err(self.transport(format!(
                            "{method} {path}: answer larger than {MAX_ANSWER} bytes"
                        )));
                    }
                    answer.extend_from_slice(data);
                    while streamed && let Some(end) = answer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = answer.drain(..=end).collect();
                        take_line(&line)?;
                    }
                }
            }
            if streamed {
                take_line(&std::mem::take(&mut answer))?;
            }
            Ok((status, answer))
        };
        let (status, answer) = exchange.await?;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(answer);
        }
        let message = serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(one_line))
            .unwrap_or_else(|| one_line(&String::from_utf8_lossy(&answer)));
        Err(EngineError::Api {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, EngineError> {
        let payload = body.map_or(Payload::None, Payload::Json);
        let answer = self.send(method, path, payload, &[], Answer::Whole).await?;
        if answer.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer).map_err(|e| self.transport(format!("{path}: {e}")))
    }

    /// Containers (running or not) carrying every `label=value` given.
    pub async fn list_containers(&self, labels: &[String]) -> Result<Vec<Value>, EngineError> {
        let filters = serde_json::json!({ "label": labels }).to_string();
        let path = format!("/containers/json?all=true&filters={}", encode(&filters));
        match self.json(Method::GET, &path, None).await? {
            Value::Array(items) => Ok(items),
            other => Err(self.transport(format!("containers list: unexpected answer {other}"))),
        }
    }

    pub async fn inspect_container(&self, name: &str) -> Result<Option<Value>, EngineError> {
        let path = format!("/containers/{}/json", encode(name));
        absent_ok(self.json(Method::GET, &path, None).await)
    }

    pub async fn create_container(&self, name: &str, body: &Value) -> Result<(), EngineError> {
        self.json(
            Method::POST,
            &format!("/containers/create?name={}", encode(name)),
            Some(body),
        )
        .await
        .map(|_| ())
    }

    pub async fn start_container(&self, name: &str) -> Result<(), EngineError> {
        self.json(
            Method::POST,
            &format!("/containers/{}/start", encode(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Stops with SIGTERM, then SIGKILL after `timeout_s`.
    pub async fn stop_container(&self, name: &str, timeout_s: u32) -> Result<(), EngineError> {
        self.json(
            Method::POST,
            &format!("/containers/{}/stop?t={timeout_s}", encode(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Removes a container (killing it if it runs); anonymous volumes go with it, named ones stay.
    /// Already gone is fine.
    pub async fn remove_container(&self, name: &str) -> Result<(), EngineError> {
        let path = format!("/containers/{}?force=true&v=true", encode(name));
        absent_ok(self.json(Method::DELETE, &path, None).await).map(|_| ())
    }

    pub async fn rename_container(&self, name: &str, to: &str) -> Result<(), EngineError> {
        self.json(
            Method::POST,
            &format!("/containers/{}/rename?name={}", encode(name), encode(to)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// One CPU and memory sample (no stream).
    pub async fn stats(&self, name: &str) -> Result<Value, EngineError> {
        self.json(
            Method::GET,
            &format!("/containers/{}/stats?stream=false", encode(name)),
            None,
        )
        .await
    }

    pub async fn image_exists(&self, reference: &str) -> Result<bool, EngineError> {
        absent_ok(
            self.json(
                Method::GET,
                &format!("/images/{}/json", encode(reference)),
                None,
            )
            .await,
        )
        .map(|found| found.is_some())
    }

    /// Pulls `reference`; `progress` sees the engine's progress lines.
    pub async fn pull(
        &self,
        reference: &str,
        auth: Option<String>,
        progress: &mut (dyn FnMut(&Value) + Send),
    ) -> Result<(), EngineError> {
        let headers: Vec<(&str, String)> =
            auth.into_iter().map(|a| ("X-Registry-Auth", a)).collect();
        self.send(
            Method::POST,
            &format!("/images/create?fromImage={}", encode(reference)),
            Payload::None,
            &headers,
            Answer::Lines(progress),
        )
        .await
        .map(|_| ())
    }

    /// Loads a `docker save` style archive, streamed from `archive`.
    pub async fn load(&self, archive: &Path) -> Result<(), EngineError> {
        let body = FileBody::open(archive)
            .await
            .map_err(|e| self.transport(format!("{}: {e}", archive.display())))?;
        self.send(
            Method::POST,
            "/images/load?quiet=true",
            Payload::TarFile(body),
            &[],
            Answer::Lines(&mut |_| {}),
        )
        .await
        .map(|_| ())
    }

    /// Streams the tar archive of `path` in container `name` (running or not) into `sink`.
    pub async fn get_archive(
        &self,
        name: &str,
        path: &str,
        sink: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), EngineError> {
        let path = format!("/containers/{}/archive?path={}", encode(name), encode(path));
        self.send(Method::GET, &path, Payload::None, &[], Answer::Stream(sink))
            .await
            .map(|_| ())
    }

    /// Extracts the tar archive `archive` into `path` of container `name` (running or not).
    pub async fn put_archive(
        &self,
        name: &str,
        path: &str,
        archive: &Path,
    ) -> Result<(), EngineError> {
        let body = FileBody::open(archive)
            .await
            .map_err(|e| self.transport(format!("{}: {e}", archive.display())))?;
        let path = format!("/containers/{}/archive?path={}", encode(name), encode(path));
        self.send(
            Method::PUT,
            &path,
            Payload::TarFile(body),
            &[],
            Answer::Whole,
        )
        .await
        .map(|_| ())
    }

    pub async fn inspect_network(&self, name: &str) -> Result<Option<Value>, EngineError> {
        let path = format!("/networks/{}", encode(name));
        absent_ok(self.json(Method::GET, &path, None).await)
    }

    pub async fn create_network(&self, body: &Value) -> Result<(), EngineError> {
        self.json(Method::POST, "/networks/create", Some(body))
            .await
            .map(|_| ())
    }

    pub async fn create_volume(&self, body: &Value) -> Result<(), EngineError> {
        self.json(Method::POST, "/volumes/create", Some(body))
            .await
            .map(|_| ())
    }

    pub async fn inspect_volume(&self, name: &str) -> Result<Option<Value>, EngineError> {
        let path = format!("/volumes/{}", encode(name));
        absent_ok(self.json(Method::GET, &path, None).await)
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        let path = format!("/volumes/{}", encode(name));
        absent_ok(self.json(Method::DELETE, &path, None).await).map(|_| ())
    }
}

fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 512 {
        let mut end = 512;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line
    }
}

/// Percent-encodes a query or path value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An engine socket that answers every request with `response`.
    fn engine_answering(response: String) -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let response = response.into_bytes();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(&response).await;
            }
        });
        (dir, Engine::new(&socket))
    }

    #[tokio::test]
    async fn a_refused_pull_keeps_the_engines_reason() {
        let body =
            r#"{"message":"pull access denied for r.example/web, repository does not exist"}"#;
        let response = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (_dir, engine) = engine_answering(response);
        let error = engine
            .pull("r.example/web@sha256:00", None, &mut |_| {})
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "container engine: POST /images/create?fromImage=r.example%2Fweb%40sha256%3A00: 404: pull access denied for r.example/web, repository does not exist"
        );
    }

    /// Podman answers 500 to a container list while it recovers from a restart: the engine's
    /// trouble, retried, never a failed release (which would roll back).
    #[tokio::test]
    async fn an_engine_that_cannot_list_its_containers_is_unavailable() {
        use crate::runtime::Runtime as _;
        let body = r#"{"message":"retrieving network namespace: unknown FS magic"}"#;
        let (dir, _) = engine_answering(format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        let config = crate::config::DockerConfig {
            socket: dir.path().join("engine.sock"),
            ..Default::default()
        };
        let runtime = crate::runtime::docker::DockerRuntime::new(&config, dir.path());
        let error = runtime.observe("acme").await.unwrap_err();
        assert!(error.unavailable, "{error}");
        assert!(error.message.contains("unknown FS magic"), "{error}");
    }

    #[tokio::test]
    async fn an_error_line_in_a_streamed_pull_fails_it() {
        let (_dir, engine) = engine_answering(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 69\r\n\r\n{\"status\":\"Pulling\"}\n{\"error\":\"toomanyrequests: rate limit reached\"}\n"
                .to_string(),
        );
        let mut lines = 0;
        let error = engine
            .pull("r.example/web@sha256:00", None, &mut |_| lines += 1)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("200: toomanyrequests: rate limit reached"),
            "{error}"
        );
        assert_eq!(lines, 1, "the progress line before it");
    }
}
