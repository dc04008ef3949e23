//! Registry credentials and the 401 challenge dance (Basic, or Bearer via the token endpoint).

use base64::Engine as _;
use std::path::{Path, PathBuf};

/// Credentials for one registry.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => write!(f, "Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
        }
    }
}

impl Credentials {
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
        }
    }
}

/// Credentials for `host` from a docker config file (`auths.<host>.auth` or
/// `username`/`password`). `path` defaults to `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`. A missing file means anonymous.
pub fn docker_config_credentials(host: &str, path: Option<&Path>) -> Result<Credentials, String> {
    let path: PathBuf = match path {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(Credentials::Anonymous),
            },
        },
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if text.len() > 1 << 20 {
        return Err(format!("{}: larger than 1 MiB", path.display()));
    }
    let config: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let Some(entry) = config.get("auths").and_then(|a| {
        a.get(host)
            .or_else(|| a.get(format!("https://{host}")))
            .or_else(|| a.get(format!("http://{host}")))
    }) else {
        return Ok(Credentials::Anonymous);
    };
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .map_err(|_| format!("{}: auths.{host}.auth is not base64", path.display()))?;
        let decoded = String::from_utf8_lossy(&decoded).into_owned();
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("{}: auths.{host}.auth is not user:password", path.display()))?;
        return Ok(Credentials::Basic {
            username: username.into(),
            password: password.into(),
        });
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(username), Some(password)) => Ok(Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }),
        _ => Ok(Credentials::Anonymous),
    }
}

/// A registry's `WWW-Authenticate` challenge: untrusted text, parsed into what the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// Parses `Basic …` or `Bearer realm="…",service="…"`; anything else is an error naming it.
    pub fn parse(header: &str) -> Result<Challenge, String> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            let shown: String = scheme.chars().take(32).collect();
            return Err(format!("unsupported authentication scheme {shown:?}"));
        }
        let params = parse_params(params);
        let value = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let realm = value("realm").ok_or("bearer challenge without a realm")?;
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            let shown: String = realm.chars().take(64).collect();
            return Err(format!("bearer realm {shown:?} is not an http(s) URL"));
        }
        Ok(Challenge::Bearer {
            realm,
            service: value("service"),
        })
    }
}

/// Answers a `WWW-Authenticate` challenge with an Authorization header value. The token
/// endpoint is named by the registry, so it is held to the same rules: the stall timeout, a
/// 1 MiB answer, and no plain-http realm for a registry reached over https (the credentials
/// would travel in the clear).
pub(crate) async fn answer_challenge(
    http: &reqwest::Client,
    challenge: &str,
    credentials: &Credentials,
    scope: &str,
    stall: std::time::Duration,
    plain_http_registry: bool,
) -> Result<String, String> {
    match Challenge::parse(challenge)? {
        Challenge::Basic => credentials.basic_header().ok_or_else(|| {
            "the registry needs credentials (docker config or --username/--password)".to_string()
        }),
        Challenge::Bearer { realm, .. } if realm.starts_with("http://") && !plain_http_registry => {
            Err(format!(
                "bearer realm {realm} is plain http for a registry reached over https"
            ))
        }
        Challenge::Bearer { realm, service } => {
            let mut query: Vec<(&str, &str)> = Vec::new();
            if let Some(service) = &service {
                query.push(("service", service));
            }
            query.push(("scope", scope));
            let mut request = http.get(&realm).query(&query);
            if let Some(basic) = credentials.basic_header() {
                request = request.header(reqwest::header::AUTHORIZATION, basic);
            }
            let stalled = || {
                format!(
                    "token endpoint {realm}: no answer within {}s",
                    stall.as_secs()
                )
            };
            let response = tokio::time::timeout(stall, request.send())
                .await
                .map_err(|_| stalled())?
                .map_err(|e| format!("token endpoint {realm}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!(
                    "token endpoint {realm}: HTTP {}",
                    response.status()
                ));
            }
            // Read at most 1 MiB: the token endpoint is named by the registry, not trusted.
            let mut response = response;
            let mut bytes = Vec::new();
            while let Some(chunk) = tokio::time::timeout(stall, response.chunk())
                .await
                .map_err(|_| stalled())?
                .map_err(|e| format!("token endpoint {realm}: {e}"))?
            {
                if bytes.len() + chunk.len() > 1 << 20 {
                    return Err(format!("token endpoint {realm}: response over 1 MiB"));
                }
                bytes.extend_from_slice(&chunk);
            }
            let body: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("token endpoint {realm}: {e}"))?;
            let token = body
                .get("token")
                .or_else(|| body.get("access_token"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| format!("token endpoint {realm}: no token in the response"))?;
            Ok(format!("Bearer {token}"))
        }
    }
}

/// `realm="https://x",service="y"` → [(realm, https://x), (service, y)].
fn parse_params(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, remaining)) => (value.to_string(), remaining),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((value, remaining)) => (value.trim().to_string(), remaining),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = remaining.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_params() {
        let params = parse_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(
            params[0],
            ("realm".into(), "https://auth.example/token".into())
        );
        assert_eq!(params[1], ("service".into(), "registry.example".into()));
        assert_eq!(params.len(), 3);
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            Challenge::parse(r#"Bearer realm="http://127.0.0.1:1/token",service="reg""#),
            Ok(Challenge::Bearer {
                realm: "http://127.0.0.1:1/token".into(),
                service: Some("reg".into())
            })
        );
        assert_eq!(Challenge::parse("basic realm=x"), Ok(Challenge::Basic));
        for (header, error) in [
            ("Bearer service=x", "bearer challenge without a realm"),
            (
                r#"Bearer realm="file:///etc/passwd""#,
                "is not an http(s) URL",
            ),
            (
                "Negotiate abc",
                "unsupported authentication scheme \"Negotiate\"",
            ),
        ] {
            let got = Challenge::parse(header).unwrap_err();
            assert!(got.contains(error), "{header}: {got}");
        }
    }

    #[test]
    fn reads_docker_config() {
        let dir = tempfile_dir();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"}}}"#,
        )
        .unwrap();
        match docker_config_credentials("127.0.0.1:5000", Some(&path)).unwrap() {
            Credentials::Basic { username, password } => {
                assert_eq!((username.as_str(), password.as_str()), ("user", "pass"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            docker_config_credentials("other:1", Some(&path)).unwrap(),
            Credentials::Anonymous
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outpost-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
