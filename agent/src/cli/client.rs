//! The CLI's client: one HTTP/1.1 call to the running agent over its unix socket.

use super::{ConfigArg, Failure, load, runtime};
use hyper::{Method, StatusCode};
use outpost_agent::api;
use serde_json::Value;

/// One call to the running agent; a refusal (409) or bad request is exit 1 with its message.
pub(super) fn request(
    config: &ConfigArg,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let config = load(config)?;
    let (status, value) = runtime()?.block_on(api::call(&config.api.socket, method, path, body))?;
    if status != StatusCode::OK {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        return Err(Failure(1, message));
    }
    Ok(value)
}
