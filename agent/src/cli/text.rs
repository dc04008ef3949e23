//! The CLI's text rendering of what the agent answers: `status`, `history`, releases.

use serde_json::Value;

pub(super) fn release_line(release: &Value) -> String {
    let field = |name: &str| {
        release
            .get(name)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    format!(
        "{} (sequence {}, {})",
        field("version"),
        field("sequence"),
        field("digest")
    )
}

/// The runtime part of `status`: phase, each resource's rollout step and replicas' health.
pub(super) fn runtime_text(runtime: &Value) -> String {
    let Some(view) = runtime.as_object() else {
        return format!("runtime:   {}\n", runtime.as_str().unwrap_or("none"));
    };
    let get = |k: &str| view.get(k).and_then(Value::as_str);
    let mut out = format!(
        "runtime:   {} ({})\n",
        get("kind").unwrap_or("?"),
        get("phase").unwrap_or("starting")
    );
    if let Some(note) = get("note") {
        out.push_str(&format!("           {note}\n"));
    }
    for (key, label) in [
        ("last_error", "last error"),
        ("last_rollback", "last rollback"),
    ] {
        if let Some(text) = get(key) {
            out.push_str(&format!("           {label}: {text}\n"));
        }
    }
    let list = |key: &str| {
        view.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    };
    for line in list("endpoints").chain(list("endpoint_errors")) {
        out.push_str(&format!("endpoint:  {line}\n"));
    }
    for (name, resource) in view
        .get("resources")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "resource:  {name}: {}\n",
            resource["step"].as_str().unwrap_or("-")
        ));
        for replica in resource["replicas"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "             {} {}\n",
                replica["name"].as_str().unwrap_or_default(),
                replica["health"].as_str().unwrap_or_default()
            ));
        }
        // VM pools: the counts the machines' nodes report.
        if resource["replicas"].is_null()
            && let (Some(desired), Some(ready)) =
                (resource["desired"].as_u64(), resource["ready"].as_u64())
        {
            out.push_str(&format!(
                "             {ready} of {desired} replicas healthy\n"
            ));
        }
        // Kubernetes: the workload's counts, as its controller reports them.
        let workload = &resource["workload"];
        if let Some(object) = workload["object"].as_str() {
            out.push_str(&format!(
                "             {object}: {} replicas, {} ready, {} updated, {} available\n",
                workload["replicas"], workload["ready"], workload["updated"], workload["available"]
            ));
        }
    }
    for (name, pool) in view
        .get("pools")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "pool:      {name}: {} machines wanted\n",
            pool["desired"]
        ));
        if let Some(problem) = pool["problem"].as_str() {
            out.push_str(&format!("             {problem}\n"));
        }
        for machine in pool["machines"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "             {} ({}) {}: {}\n",
                machine["id"].as_str().unwrap_or_default(),
                machine["zone"].as_str().unwrap_or_default(),
                machine["state"].as_str().unwrap_or_default(),
                joined(&machine["replicas"], "no replicas")
            ));
        }
    }
    for (replica, volume) in view
        .get("volumes")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "volume:    {replica}: {} ({}, {} GiB) {}\n",
            volume["id"].as_str().unwrap_or_default(),
            volume["zone"].as_str().unwrap_or_default(),
            volume["size_gib"],
            volume["state"].as_str().unwrap_or_default()
        ));
    }
    for (endpoint, balancer) in view
        .get("load_balancers")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "balancer:  {endpoint}: {} -> {}\n",
            balancer["dns"].as_str().unwrap_or_default(),
            joined(&balancer["targets"], "no machines")
        ));
    }
    for finding in list("findings") {
        out.push_str(&format!("finding:   {finding}\n"));
    }
    out
}

pub(super) fn status_text(status: &Value) -> String {
    let mut out = String::new();
    let stack = &status["stack"];
    out.push_str(&format!(
        "stack:     {} (channel {})\n",
        stack["name"].as_str().unwrap_or_default(),
        stack["channel"].as_str().unwrap_or_default()
    ));
    if let Some(source) = status["source"]["describe"].as_str() {
        out.push_str(&format!("source:    {source}"));
        if let Some(error) = status["source"]["last_error"].as_str() {
            out.push_str(&format!(" (last error: {error})"));
        }
        out.push('\n');
    }
    let download = &status["source"]["download"];
    if let (Some(what), Some(bytes), Some(total)) = (
        download["what"].as_str(),
        download["bytes"].as_u64(),
        download["total"].as_u64(),
    ) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let percent = (bytes * 100).checked_div(total).unwrap_or(0);
        out.push_str(&format!(
            "download:  {what}: {:.1} of {:.1} MiB ({percent}%)\n",
            mib(bytes),
            mib(total)
        ));
    }
    match &status["current"] {
        Value::Null => out.push_str("current:   none\n"),
        current => out.push_str(&format!("current:   {}\n", release_line(current))),
    }
    match &status["pending"] {
        Value::Null => out.push_str("pending:   none\n"),
        pending => out.push_str(&format!(
            "pending:   {}\n           waiting for {}\n",
            release_line(pending),
            pending["waiting_for"].as_str().unwrap_or("nothing")
        )),
    }
    if let Some(pinned) = status["pinned"].as_str() {
        out.push_str(&format!("pinned:    {pinned}\n"));
    }
    out.push_str(&runtime_text(&status["runtime"]));
    if let Some(r) = status["last_rejection"].as_object() {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-");
        out.push_str(&format!(
            "rejected:  {} at {} ({}): {}\n",
            get("digest"),
            get("at"),
            get("check"),
            get("reason")
        ));
    }
    out
}

pub(super) fn history_text(history: &Value) -> String {
    let mut out = String::new();
    for event in history["events"].as_array().into_iter().flatten() {
        let get = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("");
        out.push_str(&format!(
            "{}  {:<10} {}\n",
            get("at"),
            get("kind"),
            get("message")
        ));
    }
    let decisions = history["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    if !decisions.is_empty() {
        out.push_str("\ndecisions:\n");
        for d in decisions {
            let get = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("");
            let reason = d
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{}  {:<8} {} by {}{reason}\n",
                get("at"),
                get("decision"),
                get("version"),
                get("who")
            ));
        }
    }
    out
}

/// `snapshots` as a table: release, resource, ordinal, size, age; the newest last.
pub(super) fn snapshots_text(answer: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    let list = answer["snapshots"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no snapshots\n".to_string();
    }
    let mut out = format!(
        "{:<14} {:<16} {:>7} {:>10} {:>8}  {}\n",
        "RELEASE", "RESOURCE", "ORDINAL", "SIZE", "AGE", "STATE"
    );
    for s in &list {
        let release = s["version"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                s["release"]
                    .as_str()
                    .unwrap_or("?")
                    .chars()
                    .take(19)
                    .collect()
            });
        let size = s["bytes"].as_u64().map_or("-".to_string(), human_size);
        let age = s["taken_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or("-".to_string(), |t| {
                human_age((now - t.with_timezone(&chrono::Utc)).num_seconds())
            });
        out.push_str(&format!(
            "{:<14} {:<16} {:>7} {:>10} {:>8}  {}\n",
            release,
            s["resource"].as_str().unwrap_or("?"),
            s["ordinal"],
            size,
            age,
            if s["ready"].as_bool() == Some(true) {
                "ready"
            } else {
                "incomplete"
            }
        ));
    }
    out
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn human_age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A JSON array of strings, comma-separated, or `none` when empty.
fn joined(list: &Value, none: &str) -> String {
    let items: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_pools_show_their_machines_and_replicas() {
        let runtime = serde_json::json!({
            "kind": "vm", "phase": "converged",
            "resources": {"web": {"step": "-", "desired": 2, "ready": 2}},
            "pools": {"default": {"desired": 2, "machines": [
                {"id": "i-1", "zone": "us-east-1a", "state": "healthy", "replicas": ["web-0"]},
                {"id": "i-2", "zone": "us-east-1b", "state": "booting", "replicas": []},
            ]}},
            "volumes": {"db-0": {"id": "vol-1", "zone": "us-east-1a", "size_gib": 2, "state": "attached to i-1"}},
            "load_balancers": {"web.web": {"dns": "lb-1.elb.example", "targets": ["i-1"]}},
        });
        let text = runtime_text(&runtime);
        for line in [
            "runtime:   vm (converged)",
            "             2 of 2 replicas healthy",
            "pool:      default: 2 machines wanted",
            "             i-1 (us-east-1a) healthy: web-0",
            "             i-2 (us-east-1b) booting: no replicas",
            "volume:    db-0: vol-1 (us-east-1a, 2 GiB) attached to i-1",
            "balancer:  web.web: lb-1.elb.example -> i-1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
    }
}
