//! A small OCI distribution client: exact manifest bytes in and out, blobs streamed with their
//! digest checked and their size bounded, basic and bearer-token auth, credentials from
//! `~/.docker/config.json`.
//!
//! It speaks only the registry HTTP API (distribution spec v1.1) and knows nothing of bundles.
//! Shared by `outpost-signer` (push, tag resolution, `--with-images`) and the agent's OCI source.

mod auth;
mod reference;

pub use auth::{Challenge, Credentials, docker_config_credentials};
pub use reference::{Reference, ReferenceError};

use outpost_bundle_format::Digest;
use outpost_bundle_format::crypto::Sha256;
use reqwest::{Method, StatusCode, header};
use std::sync::Mutex;
use std::time::Duration;

/// The default for [`Registry::with_stall_timeout`].
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// Largest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Every manifest type we ask for (and nothing else).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("{url}: {}", error_chain(source))]
    Transport { url: String, source: reqwest::Error },
    #[error("{url}: HTTP {status}{}: {body}", retry_note(retry_after))]
    Status {
        url: String,
        status: u16,
        body: String,
        /// The server's `Retry-After`, when it sent one in seconds.
        retry_after: Option<Duration>,
    },
    #[error("{url}: stalled: {received} bytes in {}s, below 1 KiB per {}s", stall.as_secs(), stall.as_secs())]
    Stalled {
        url: String,
        received: u64,
        stall: Duration,
    },
    #[error("{url}: authentication failed: {reason}")]
    Auth { url: String, reason: String },
    #[error("{what} is over the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },
    #[error("{what}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// An error with its causes ("error sending request: connection refused"): reqwest's own
/// message leaves out why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        cause = e.source();
    }
    text
}

fn retry_note(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!(" (retry after {}s)", d.as_secs()))
        .unwrap_or_default()
}

impl RegistryError {
    /// Transient errors are worth retrying with backoff; others need a human.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::Stalled { .. } => true,
            RegistryError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// How long the registry asked to be left alone (`Retry-After` on a 429 or 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What a HEAD on a manifest returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    pub size: Option<u64>,
}

/// A client for one registry host.
pub struct Registry {
    http: reqwest::Client,
    /// A request whose answer does not start, or whose body brings less than 1 KiB, within this
    /// long is cut off: a stalled or dripping server fails the request instead of holding it.
    stall: Duration,
    base: String,
    credentials: Credentials,
    token: Mutex<Option<String>>,
}

impl Registry {
    /// `plain_http` uses http:// (always the case for loopback hosts, as docker does).
    pub fn new(
        host: &str,
        credentials: Credentials,
        plain_http: bool,
    ) -> Result<Self, RegistryError> {
        let loopback =
            host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]");
        let scheme = if plain_http || loopback {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(600))
            .build()
            .map_err(|source| RegistryError::Transport {
                url: host.into(),
                source,
            })?;
        Ok(Registry {
            http,
            stall: DEFAULT_STALL,
            base: format!("{scheme}://{host}/v2"),
            credentials,
            token: Mutex::new(None),
        })
    }

    /// Cuts off requests that stall for `stall` (default 30 s); see [`Registry`].
    pub fn with_stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall.max(Duration::from_millis(100));
        self
    }

    /// HEAD on a manifest: the cheap change check. `None` when the tag does not exist.
    pub async fn head_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<ManifestHead>, RegistryError> {
        let url = format!("{}/{repository}/manifests/{reference}", self.base);
        let response = self
            .send(
                Method::HEAD,
                &url,
                &[(header::ACCEPT, MANIFEST_ACCEPT)],
                None,
                &format!("repository:{repository}:pull"),
            )
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = self.check_status(&url, response).await?;
        let digest = header_text(&response, "docker-content-digest")
            .map(Digest::parse)
            .transpose()
            .map_err(|e| RegistryError::Protocol(format!("{url}: {e}")))?;
        let media_type = manifest_type(&url, &response)?;
        let size =
            header_text(&response, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok());
        match digest {
            Some(digest) => Ok(Some(ManifestHead {
                digest,
                media_type,
                size,
            })),
            // Registries need not send the digest on HEAD; fall back to hashing the body.
            None => {
                let (bytes, media_type) = self.get_manifest(repository, reference, 4 << 20).await?;
                Ok(Some(ManifestHead {
                    digest: Digest::of(&bytes),
                    media_type,
                    size: Some(bytes.len() as u64),
                }))
            }
        }
    }

    /// The exact manifest bytes and media type. When `reference` is a digest the bytes are
    /// checked against it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let url = format!("{}/{repository}/manifests/{reference}", self.base);
        let response = self
            .send(
                Method::GET,
                &url,
                &[(header::ACCEPT, MANIFEST_ACCEPT)],
                None,
                &format!("repository:{repository}:pull"),
            )
            .await?;
        let response = self.check_status(&url, response).await?;
        let media_type = manifest_type(&url, &response)?;
        let mut bytes = Vec::new();
        self.read_body(response, &url, limit, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        if let Ok(expected) = Digest::parse(reference) {
            check_digest(&url, expected, Digest::of(&bytes))?;
        }
        Ok((bytes, media_type))
    }

    /// The OCI 1.1 referrers index of `digest`, or None when the registry lacks the API (404).
    pub async fn get_referrers(
        &self,
        repository: &str,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let url = format!("{}/{repository}/referrers/{digest}", self.base);
        let accept = [(header::ACCEPT, "application/vnd.oci.image.index.v1+json")];
        let response = self
            .send(
                Method::GET,
                &url,
                &accept,
                None,
                &format!("repository:{repository}:pull"),
            )
            .await?;
        if matches!(
            response.status(),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Ok(None);
        }
        let response = self.check_status(&url, response).await?;
        let mut bytes = Vec::new();
        self.read_body(response, &url, limit, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(Some(bytes))
    }

    /// Streams a blob into `sink`, checking its digest and bounding its size.
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &Digest,
        limit: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, RegistryError> {
        let url = format!("{}/{repository}/blobs/{digest}", self.base);
        let response = self
            .send(
                Method::GET,
                &url,
                &[],
                None,
                &format!("repository:{repository}:pull"),
            )
            .await?;
        let response = self.check_status(&url, response).await?;
        let mut hasher = Sha256::default();
        let size = self
            .read_body(response, &url, limit, |chunk| {
                hasher.update(chunk);
                sink(chunk)
            })
            .await?;
        check_digest(&url, *digest, Digest::from_sha256(hasher.finish()))?;
        Ok(size)
    }

    pub async fn blob_exists(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let url = format!("{}/{repository}/blobs/{digest}", self.base);
        let response = self
            .send(Method::HEAD, &url, &[], None, &push_scope(repository))
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            _ => self.check_status(&url, response).await.map(|_| false),
        }
    }

    /// Uploads a blob (monolithic POST then PUT) unless the registry already has it.
    pub async fn push_blob(
        &self,
        repository: &str,
        digest: &Digest,
        bytes: Vec<u8>,
    ) -> Result<(), RegistryError> {
        if self.blob_exists(repository, digest).await? {
            return Ok(());
        }
        let url = format!("{}/{repository}/blobs/uploads/", self.base);
        let response = self
            .send(
                Method::POST,
                &url,
                &[],
                Some(Vec::new()),
                &push_scope(repository),
            )
            .await?;
        let response = self.check_status(&url, response).await?;
        let location = header_text(&response, header::LOCATION.as_str()).ok_or_else(|| {
            RegistryError::Protocol(format!("{url}: upload started without a Location"))
        })?;
        let location = self.absolute(location);
        let separator = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{separator}digest={digest}");
        let response = self
            .send(
                Method::PUT,
                &put_url,
                &[(header::CONTENT_TYPE, "application/octet-stream")],
                Some(bytes),
                &push_scope(repository),
            )
            .await?;
        self.check_status(&put_url, response).await?;
        Ok(())
    }

    /// Puts manifest bytes unchanged under `reference` (a tag or digest); returns their digest.
    pub async fn push_manifest(
        &self,
        repository: &str,
        reference: &str,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let url = format!("{}/{repository}/manifests/{reference}", self.base);
        let response = self
            .send(
                Method::PUT,
                &url,
                &[(header::CONTENT_TYPE, media_type)],
                Some(bytes),
                &push_scope(repository),
            )
            .await?;
        let response = self.check_status(&url, response).await?;
        if let Some(returned) = header_text(&response, "docker-content-digest") {
            let returned =
                Digest::parse(returned).map_err(|e| RegistryError::Protocol(e.to_string()))?;
            check_digest(&url, digest, returned)?;
        }
        Ok(digest)
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            let origin = self.base.trim_end_matches("/v2");
            format!("{origin}{location}")
        }
    }

    /// Sends a request, answering one 401 challenge (basic or bearer) and retrying.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, &str)],
        body: Option<Vec<u8>>,
        scope: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let build = |authorization: Option<String>| {
            let mut request = self.http.request(method.clone(), url);
            for (name, value) in headers {
                request = request.header(name, *value);
            }
            if let Some(auth) = authorization {
                request = request.header(header::AUTHORIZATION, auth);
            }
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            request
        };
        let cached = self.token.lock().ok().and_then(|t| t.clone());
        let first = cached.clone().or_else(|| self.credentials.basic_header());
        let response = self.answer(url, build(first), body.is_some()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = header_text(&response, header::WWW_AUTHENTICATE.as_str())
            .unwrap_or_default()
            .to_string();
        let authorization = auth::answer_challenge(
            &self.http,
            &challenge,
            &self.credentials,
            scope,
            self.stall,
            self.base.starts_with("http://"),
        )
        .await
        .map_err(|reason| RegistryError::Auth {
            url: url.to_string(),
            reason,
        })?;
        if authorization.starts_with("Bearer ")
            && let Ok(mut token) = self.token.lock()
        {
            *token = Some(authorization.clone());
        }
        let response = self
            .answer(url, build(Some(authorization)), body.is_some())
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(RegistryError::Auth {
                url: url.to_string(),
                reason: "the registry refused the credentials".into(),
            });
        }
        Ok(response)
    }
}

impl Registry {
    /// Sends one request. Without an upload, the answer's head must start within the stall
    /// timeout (an upload's answer comes only after the upload, which may take long).
    async fn answer(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
        uploading: bool,
    ) -> Result<reqwest::Response, RegistryError> {
        let transport = |source| RegistryError::Transport {
            url: url.to_string(),
            source,
        };
        if uploading {
            return request.send().await.map_err(transport);
        }
        match tokio::time::timeout(self.stall, request.send()).await {
            Ok(answer) => answer.map_err(transport),
            Err(_) => Err(RegistryError::Stalled {
                url: url.to_string(),
                received: 0,
                stall: self.stall,
            }),
        }
    }

    async fn check_status(
        &self,
        url: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, RegistryError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(&response);
        // Read at most 1 KiB of an error body: a hostile server could send an endless one.
        let mut response = response;
        let mut raw = Vec::new();
        while raw.len() < 1024 {
            // An error body that stalls is not waited for: the status says enough.
            match tokio::time::timeout(self.stall, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    raw.extend_from_slice(&chunk[..chunk.len().min(1024 - raw.len())])
                }
                _ => break,
            }
        }
        let body: String = String::from_utf8_lossy(&raw)
            .chars()
            .take(300)
            .collect::<String>()
            .replace('\n', " ");
        Err(RegistryError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body,
            retry_after,
        })
    }

    /// Streams a response body, refusing more than `limit` bytes (declared or actual), and
    /// cutting it off when less than 1 KiB arrives in a stall timeout.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        url: &str,
        limit: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, RegistryError> {
        const LEAST_PER_STALL: u64 = 1024;
        let too_large = || RegistryError::TooLarge {
            what: url.to_string(),
            limit,
        };
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let mut total = 0u64;
        // Progress is judged per window of one stall timeout.
        let (mut window_start, mut window_bytes) = (tokio::time::Instant::now(), 0u64);
        loop {
            let deadline = window_start + self.stall;
            let stalled = |received| RegistryError::Stalled {
                url: url.to_string(),
                received,
                stall: self.stall,
            };
            let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
                Err(_) => return Err(stalled(window_bytes)),
                Ok(chunk) => chunk.map_err(|source| RegistryError::Transport {
                    url: url.to_string(),
                    source,
                })?,
            };
            let Some(chunk) = chunk else { break };
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large());
            }
            sink(&chunk).map_err(|source| RegistryError::Io {
                what: url.to_string(),
                source,
            })?;
            window_bytes += chunk.len() as u64;
            if window_bytes >= LEAST_PER_STALL {
                (window_start, window_bytes) = (tokio::time::Instant::now(), 0);
            } else if tokio::time::Instant::now() >= deadline {
                return Err(stalled(window_bytes));
            }
        }
        Ok(total)
    }
}

/// The media type of a manifest answer. A registry, or a portal or proxy in front of it, that
/// answers with something other than JSON (an HTML login page, say) fails the request: it is
/// not a bundle to reject.
fn manifest_type(url: &str, response: &reqwest::Response) -> Result<String, RegistryError> {
    let media_type = header_text(response, header::CONTENT_TYPE.as_str())
        .unwrap_or_default()
        .to_string();
    let essence = media_type.split(';').next().unwrap_or_default().trim();
    if !essence.is_empty() && !essence.ends_with("json") {
        let shown: String = essence.chars().take(64).collect();
        return Err(RegistryError::Protocol(format!(
            "{url}: answered with content type {shown:?}, not a manifest"
        )));
    }
    Ok(media_type)
}

/// A response's `Retry-After`, capped at [`MAX_RETRY_AFTER`].
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    parse_retry_after(
        header_text(response, header::RETRY_AFTER.as_str())?,
        chrono::Utc::now(),
    )
}

/// A header's value, when present and text.
fn header_text<'r>(response: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    response.headers().get(name)?.to_str().ok()
}

/// `Retry-After` as seconds or as an HTTP date (RFC 9110), from `now`, capped at
/// [`MAX_RETRY_AFTER`]; a date already past asks for no wait.
fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

fn check_digest(what: &str, expected: Digest, actual: Digest) -> Result<(), RegistryError> {
    if expected == actual {
        Ok(())
    } else {
        Err(RegistryError::DigestMismatch {
            what: what.to_string(),
            expected,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_default();
        let parse = |value| parse_retry_after(value, now);
        assert_eq!(parse("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
    }
}
