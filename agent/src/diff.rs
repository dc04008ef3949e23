//! What a pending release changes against the current one, resource by resource and field by
//! field, with permission-profile changes called out (shown by `outpost-agent plan`).

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub from: Value,
    pub to: Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "change", rename_all = "lowercase")]
pub enum ResourceChange {
    Added {
        name: String,
        spec: Value,
    },
    Removed {
        name: String,
    },
    Changed {
        name: String,
        fields: Vec<FieldChange>,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct StackDiff {
    pub resources: Vec<ResourceChange>,
    /// Permission profiles added, removed or asking for different permissions.
    pub permission_profiles: Vec<FieldChange>,
}

impl StackDiff {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.permission_profiles.is_empty()
    }
}

/// Diffs two stacks as stored in bundles (JSON). `current` is None for a first install.
pub fn diff(current: Option<&Value>, pending: &Value) -> StackDiff {
    let empty = Value::Null;
    let current = current.unwrap_or(&empty);
    let by_name = |stack: &Value| -> BTreeMap<String, Value> {
        stack
            .get("resources")
            .and_then(Value::as_array)
            .map(|resources| {
                resources
                    .iter()
                    .filter_map(|r| {
                        let name = r.pointer("/container/name")?.as_str()?.to_string();
                        Some((name, r.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old, new) = (by_name(current), by_name(pending));
    let mut resources = Vec::new();
    for (name, spec) in &new {
        match old.get(name) {
            None => resources.push(ResourceChange::Added {
                name: name.clone(),
                spec: spec.clone(),
            }),
            Some(before) => {
                let mut fields = Vec::new();
                diff_values("", before, spec, &mut fields);
                if !fields.is_empty() {
                    resources.push(ResourceChange::Changed {
                        name: name.clone(),
                        fields,
                    });
                }
            }
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        resources.push(ResourceChange::Removed { name: name.clone() });
    }
    let mut permission_profiles = Vec::new();
    diff_values(
        "permissionProfiles",
        current.get("permissionProfiles").unwrap_or(&Value::Null),
        pending.get("permissionProfiles").unwrap_or(&Value::Null),
        &mut permission_profiles,
    );
    StackDiff {
        resources,
        permission_profiles,
    }
}

/// Leaf-level differences of two JSON values; arrays compare whole.
fn diff_values(path: &str, before: &Value, after: &Value, out: &mut Vec<FieldChange>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff_values(
                    &child,
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Null, Value::Object(b)) => diff_values(
            path,
            &Value::Object(Default::default()),
            &Value::Object(b.clone()),
            out,
        ),
        (Value::Object(a), Value::Null) => diff_values(
            path,
            &Value::Object(a.clone()),
            &Value::Object(Default::default()),
            out,
        ),
        (a, b) if a != b => out.push(FieldChange {
            field: path.trim_start_matches("container.").to_string(),
            from: a.clone(),
            to: b.clone(),
        }),
        _ => {}
    }
}

/// Human-readable plan, like `flux diff`.
pub fn render(diff: &StackDiff) -> String {
    let mut out = String::new();
    if diff.is_empty() {
        out.push_str("no changes\n");
        return out;
    }
    for change in &diff.resources {
        match change {
            ResourceChange::Added { name, spec } => {
                let image = spec
                    .pointer("/container/code/image")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                out.push_str(&format!("+ {name} (new resource, image {image})\n"));
            }
            ResourceChange::Removed { name } => out.push_str(&format!("- {name} (removed)\n")),
            ResourceChange::Changed { name, fields } => {
                out.push_str(&format!("~ {name}\n"));
                for f in fields {
                    out.push_str(&format!(
                        "    {}: {} -> {}\n",
                        f.field,
                        show(&f.from),
                        show(&f.to)
                    ));
                }
            }
        }
    }
    if !diff.permission_profiles.is_empty() {
        out.push_str("! permission profiles change (review before approving):\n");
        for f in &diff.permission_profiles {
            out.push_str(&format!(
                "    {}: {} -> {}\n",
                f.field,
                show(&f.from),
                show(&f.to)
            ));
        }
    }
    out
}

fn show(value: &Value) -> String {
    match value {
        Value::Null => "(none)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resource_and_permission_changes() {
        let old = json!({"name": "acme", "permissionProfiles": {"execution": {"aws": ["s3:GetObject"]}},
            "resources": [{"lifecycle": "live", "container": {"name": "api", "memory": "1Gi", "ports": [8080]}},
                          {"lifecycle": "live", "container": {"name": "old", "memory": "1Gi"}}]});
        let new = json!({"name": "acme", "permissionProfiles": {"execution": {"aws": ["s3:GetObject", "s3:PutObject"]}},
            "resources": [{"lifecycle": "live", "container": {"name": "api", "memory": "2Gi", "ports": [8080]}},
                          {"lifecycle": "live", "container": {"name": "web", "memory": "1Gi", "code": {"image": "x"}}}]});
        let d = diff(Some(&old), &new);
        assert_eq!(d.resources.len(), 3);
        assert!(d.resources.contains(&ResourceChange::Changed {
            name: "api".into(),
            fields: vec![FieldChange {
                field: "memory".into(),
                from: json!("1Gi"),
                to: json!("2Gi")
            }]
        }));
        assert!(
            d.resources
                .contains(&ResourceChange::Removed { name: "old".into() })
        );
        assert_eq!(
            d.permission_profiles[0].field,
            "permissionProfiles.execution.aws"
        );
        let text = render(&d);
        assert!(
            text.contains("~ api\n    memory: \"1Gi\" -> \"2Gi\""),
            "{text}"
        );
        assert!(text.contains("+ web (new resource, image x)"));
        assert!(text.contains("! permission profiles change"));
        assert!(diff(Some(&new), &new).is_empty());
    }
}
