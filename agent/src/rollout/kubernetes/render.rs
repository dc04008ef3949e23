//! Render: the Kubernetes objects a release maps to under the customer's config, as JSON
//! documents ready for server-side apply, in apply order. Pure: no cluster, no I/O. The
//! `outpost-agent render` command prints them so a platform team can review exactly what would
//! be applied; the Kubernetes runtime applies the same documents.
//!
//! Everything lands in the customer's one namespace. Identity (the ServiceAccount), placement
//! (node selectors, tolerations) and classes (storage, ingress) come from the customer's
//! config, never from the vendor's stack.

use crate::config::{
    Config, KubernetesConfig, Permissions, Placement, RolloutConfig, SnapshotsConfig,
};
use crate::plan::{config_hash, dependency_order, link_environment};
use outpost_bundle_format::stack::{Container, Protocol, Scaling, Stack};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

pub const MANAGED_BY: &str = "outpost";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const STACK_LABEL: &str = "outpost.dev/stack";
pub const RESOURCE_LABEL: &str = "outpost.dev/resource";
pub const DIGEST_ANNOTATION: &str = "outpost.dev/bundle-digest";
/// The claim template of a resource with `persistentStorage`: its claims are
/// `data-<statefulset>-<ordinal>`.
pub const STATEFUL_CLAIM: &str = "data";
const HASH_ANNOTATION: &str = "outpost.dev/config-hash";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// What rendering takes from the configuration: the `kubernetes` section, the grants and the
/// rollout deadline.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kubernetes: KubernetesConfig,
    pub permissions: Permissions,
    pub rollout: RolloutConfig,
    pub snapshots: SnapshotsConfig,
}

impl Settings {
    pub fn of(config: &Config) -> Settings {
        Settings {
            kubernetes: config.kubernetes.clone(),
            permissions: config.permissions.clone(),
            rollout: config.rollout.clone(),
            snapshots: config.snapshots.clone(),
        }
    }
}

/// The objects for `stack` (bundle `digest`) in `config.kubernetes.namespace`, in apply order:
/// per resource in `links` order its Service, workload, autoscaler and public endpoints.
pub fn render(config: &Config, stack: &Stack, digest: &str) -> Result<Vec<Value>, RenderError> {
    render_with(&Settings::of(config), stack, digest)
}

/// [`render`] from the settings alone (what the cluster backend holds).
pub fn render_with(
    config: &Settings,
    stack: &Stack,
    digest: &str,
) -> Result<Vec<Value>, RenderError> {
    let k8s = &config.kubernetes;
    let mut objects = Vec::new();
    for index in dependency_order(stack) {
        let resource = &stack.resources[index];
        let c = &resource.container;
        let at = format!("resource {}", c.name);
        let grant = config
            .permissions
            .grant(&c.permissions)
            .map_err(|e| RenderError(format!("{at}: {e}")))?;
        let service_account = grant.service_account.ok_or_else(|| {
            RenderError(format!(
                "{at}: permissions.{}.service_account is not set: the customer maps each permission profile to a ServiceAccount",
                c.permissions
            ))
        })?;
        let placement = placement(k8s, c).map_err(|e| RenderError(format!("{at}: {e}")))?;
        let object = Object::new(k8s, stack, c, digest);
        objects.push(object.service(c));
        objects.push(object.workload(
            config,
            stack,
            c,
            (&service_account, &grant.environment),
            &placement,
        ));
        if let Scaling::Auto {
            min,
            max,
            target_cpu_percent,
            target_memory_percent,
            ..
        } = c.scaling
        {
            let kind = workload_kind(c);
            objects.push(object.autoscaler(
                kind,
                min,
                max,
                target_cpu_percent,
                target_memory_percent,
            ));
        }
        for endpoint in &c.public_endpoints {
            objects.push(match endpoint.protocol {
                Protocol::Tcp => object.load_balancer(&endpoint.name, endpoint.port),
                Protocol::Http => {
                    // Without a host the rule would catch every unmatched host on the
                    // IngressClass, other namespaces' traffic included.
                    let host = k8s.hosts.get(&endpoint.name).ok_or_else(|| {
                        RenderError(format!(
                            "{at}: public endpoint {name} has no host (config key kubernetes.hosts.{name})",
                            name = endpoint.name
                        ))
                    })?;
                    object.ingress(k8s, &endpoint.name, host, endpoint.port)
                }
            });
        }
    }
    check_names(&objects)?;
    Ok(objects)
}

/// Every object's name is its own and one Kubernetes accepts: a resource's tcp endpoint and
/// another resource could otherwise both map to `Service/<stack>-<a>-<b>`, and one would
/// silently take the other over.
fn check_names(objects: &[Value]) -> Result<(), RenderError> {
    let mut seen = BTreeMap::new();
    for object in objects {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let (kind, name) = (text("/kind"), text("/metadata/name"));
        let resource = text("/metadata/labels/outpost.dev~1resource");
        if let Some(other) = seen.insert((kind, name), resource) {
            return Err(RenderError(format!(
                "resources {other} and {resource} both map to {kind}/{name}: rename one of them or the endpoint"
            )));
        }
        // A StatefulSet's pods carry a revision label of its name and a hash.
        let most = if kind == "StatefulSet" { 52 } else { 63 };
        if name.len() > most {
            return Err(RenderError(format!(
                "{kind}/{name}: {} characters, more than Kubernetes allows ({most}); shorten the stack, resource or endpoint name",
                name.len()
            )));
        }
        if kind == "Service" && !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(RenderError(format!(
                "Service/{name}: a Service name must start with a letter; rename the stack"
            )));
        }
    }
    Ok(())
}

/// Multi-document YAML of `objects`.
pub fn to_yaml(objects: &[Value]) -> Result<String, RenderError> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(
            &serde_saphyr::to_string(object).map_err(|e| RenderError(format!("yaml: {e}")))?,
        );
    }
    Ok(out)
}

/// Node selectors and tolerations for the resource's pool and GPU type.
fn placement(k8s: &KubernetesConfig, c: &Container) -> Result<Placement, String> {
    let mut merged = Placement::default();
    let mut add = |p: &Placement| {
        merged.node_selector.extend(p.node_selector.clone());
        merged.tolerations.extend(p.tolerations.iter().cloned());
    };
    if let Some(pool) = &c.pool {
        add(k8s
            .pools
            .get(pool)
            .ok_or_else(|| format!("pool {pool:?} is not mapped (config key kubernetes.pools)"))?);
    }
    if let Some(gpu) = &c.gpu {
        add(k8s.gpus.get(&gpu.kind).ok_or_else(|| {
            format!(
                "GPU type {:?} is not mapped to nodes (config key kubernetes.gpus)",
                gpu.kind
            )
        })?);
    }
    Ok(merged)
}

/// What every object of one resource shares: name, namespace, labels, annotations.
struct Object {
    name: String,
    namespace: String,
    labels: Value,
    selector: Value,
    annotations: Value,
}

impl Object {
    fn new(k8s: &KubernetesConfig, stack: &Stack, c: &Container, digest: &str) -> Object {
        let name = format!("{}-{}", stack.name, c.name);
        let selector = json!({STACK_LABEL: stack.name, RESOURCE_LABEL: c.name});
        let mut labels = selector.clone();
        labels[MANAGED_BY_LABEL] = json!(MANAGED_BY);
        labels["app.kubernetes.io/name"] = json!(c.name);
        labels["app.kubernetes.io/part-of"] = json!(stack.name);
        Object {
            name,
            namespace: k8s.namespace.clone(),
            labels,
            selector,
            annotations: json!({
                DIGEST_ANNOTATION: digest,
                HASH_ANNOTATION: config_hash(&stack.name, c),
            }),
        }
    }

    fn metadata(&self, name: &str) -> Value {
        json!({
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels,
            "annotations": self.annotations,
        })
    }

    fn ports(c: &Container) -> Vec<Value> {
        c.ports
            .iter()
            .map(
                |p| json!({"name": format!("p{p}"), "port": p, "targetPort": p, "protocol": "TCP"}),
            )
            .collect()
    }

    /// A ClusterIP Service per resource: its stable in-namespace DNS name.
    fn service(&self, c: &Container) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&self.name),
            "spec": {"type": "ClusterIP", "selector": self.selector, "ports": Self::ports(c)},
        })
    }

    fn load_balancer(&self, endpoint: &str, port: u16) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&format!("{}-{endpoint}", self.name)),
            "spec": {
                "type": "LoadBalancer",
                "selector": self.selector,
                "ports": [{"name": endpoint, "port": port, "targetPort": port, "protocol": "TCP"}],
            },
        })
    }

    fn ingress(&self, k8s: &KubernetesConfig, endpoint: &str, host: &str, port: u16) -> Value {
        let mut spec = json!({
            "rules": [{"host": host, "http": {"paths": [{
                "path": "/",
                "pathType": "Prefix",
                "backend": {"service": {"name": self.name, "port": {"number": port}}},
            }]}}],
        });
        if let Some(class) = &k8s.ingress_class {
            spec["ingressClassName"] = json!(class);
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": self.metadata(&format!("{}-{endpoint}", self.name)),
            "spec": spec,
        })
    }

    fn autoscaler(&self, kind: &str, min: u32, max: u32, cpu: u32, memory: Option<u32>) -> Value {
        let utilization = |resource: &str, target: u32| json!({"type": "Resource", "resource": {"name": resource, "target": {"type": "Utilization", "averageUtilization": target}}});
        let mut metrics = vec![utilization("cpu", cpu)];
        metrics.extend(memory.map(|m| utilization("memory", m)));
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": self.metadata(&self.name),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": self.name},
                "minReplicas": min,
                "maxReplicas": max,
                "metrics": metrics,
            },
        })
    }

    fn workload(
        &self,
        config: &Settings,
        stack: &Stack,
        c: &Container,
        (service_account, granted): (&str, &BTreeMap<String, String>),
        placement: &Placement,
    ) -> Value {
        let k8s = &config.kubernetes;
        // Links by the linked resource's Service DNS name; the customer's grant wins.
        let mut environment = link_environment(stack, c, |link| {
            format!("{}-{link}.{}.svc", stack.name, k8s.namespace)
        });
        environment.extend(granted.clone());
        let mut requests = Map::new();
        let mut limits = Map::new();
        requests.insert("cpu".into(), json!(cpu(c.cpu.min)));
        limits.insert("cpu".into(), json!(cpu(c.cpu.desired)));
        requests.insert("memory".into(), json!(c.memory.as_str()));
        limits.insert("memory".into(), json!(c.memory.as_str()));
        if let Some(storage) = &c.ephemeral_storage {
            requests.insert("ephemeral-storage".into(), json!(storage.as_str()));
            limits.insert("ephemeral-storage".into(), json!(storage.as_str()));
        }
        if let Some(gpu) = &c.gpu {
            limits.insert("nvidia.com/gpu".into(), json!(gpu.count));
        }
        let mut container = json!({
            "name": c.name,
            "image": c.image.to_string(),
            "ports": c.ports.iter().map(|p| json!({"containerPort": p, "protocol": "TCP"})).collect::<Vec<_>>(),
            "env": environment.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            "resources": {"requests": requests, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": false},
        });
        if !c.command.is_empty() {
            container["args"] = json!(c.command);
        }
        if let Some(check) = &c.health_check {
            let probe = json!({
                "httpGet": {"path": check.path, "port": check.port},
                "timeoutSeconds": check.timeout_seconds,
                "failureThreshold": check.failure_threshold,
                "periodSeconds": 10,
            });
            container["readinessProbe"] = probe.clone();
            container["livenessProbe"] = probe;
        }
        if c.persistent_storage.is_some() {
            container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
        }
        let mut pod = json!({
            "serviceAccountName": service_account,
            "containers": [container],
        });
        if !placement.node_selector.is_empty() {
            pod["nodeSelector"] = json!(placement.node_selector);
        }
        if !placement.tolerations.is_empty() {
            pod["tolerations"] = json!(placement.tolerations);
        }
        // Only the config hash goes on the pod template: a release that leaves this resource
        // alone must not restart its pods.
        let template = json!({
            "metadata": {
                "labels": self.labels,
                "annotations": {HASH_ANNOTATION: self.annotations[HASH_ANNOTATION]},
            },
            "spec": pod,
        });
        let replicas = match c.scaling {
            Scaling::Fixed(n) => Some(n),
            // The autoscaler owns the count; applying one would fight it.
            Scaling::Auto { .. } => None,
        };
        let mut spec = json!({
            "selector": {"matchLabels": self.selector},
            "template": template,
        });
        if let Some(n) = replicas {
            spec["replicas"] = json!(n);
        }
        if c.stateful {
            spec["serviceName"] = json!(self.name);
            spec["podManagementPolicy"] = json!("OrderedReady");
            if let Some(size) = &c.persistent_storage {
                let mut claim = json!({
                    "metadata": {"name": STATEFUL_CLAIM, "labels": self.labels},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": size.as_str()}},
                    },
                });
                if let Some(class) = &k8s.storage_class {
                    claim["spec"]["storageClassName"] = json!(class);
                }
                spec["volumeClaimTemplates"] = json!([claim]);
                // Claims stay when the StatefulSet is deleted or scaled down (data is the
                // customer's to delete), unless the customer opted in to deleting them.
                let policy = if k8s.delete_volumes {
                    "Delete"
                } else {
                    "Retain"
                };
                spec["persistentVolumeClaimRetentionPolicy"] =
                    json!({"whenDeleted": policy, "whenScaled": policy});
            }
            // Owned by the agent, so a partition or OnDelete set by hand is drift, not a
            // rollout that never finishes.
            spec["updateStrategy"] =
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
        } else {
            spec["progressDeadlineSeconds"] = json!(config.rollout.progress_deadline_seconds);
            spec["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": workload_kind(c),
            "metadata": self.metadata(&self.name),
            "spec": spec,
        })
    }
}

fn workload_kind(c: &Container) -> &'static str {
    if c.stateful {
        "StatefulSet"
    } else {
        "Deployment"
    }
}

/// CPU as a Kubernetes quantity: whole cores, else millicores.
fn cpu(cores: f64) -> String {
    let milli = (cores * 1000.0).round() as u64;
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let (dir, path) = crate::testing::test_config(extra);
        let config = Config::load(&path).unwrap();
        drop(dir);
        config
    }

    const GRANTS: &str = "kubernetes:\n  namespace: shop-prod\n  storage_class: fast-ssd\n  ingress_class: nginx\n  hosts: {site: shop.example.com}\n  pools:\n    general: {node_selector: {pool: general}}\n    gpu: {node_selector: {pool: gpu}}\n  gpus:\n    nvidia-l4: {node_selector: {gpu: l4}, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}\n";

    fn everything() -> Stack {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/stacks/valid/everything.yaml"),
        )
        .unwrap();
        Stack::from_yaml(&text).unwrap().1
    }

    fn with_service_accounts(config: &mut Config) {
        config.permissions = serde_json::from_value(json!({
            "execution": {"service_account": "shop-runner"},
            "storage": {"service_account": "shop-storage"},
        }))
        .unwrap();
    }

    #[test]
    fn everything_stays_in_the_namespace_with_the_customers_identity_and_placement() {
        let mut config = config(GRANTS);
        with_service_accounts(&mut config);
        let objects = render(&config, &everything(), "sha256:00").unwrap();
        let kinds: Vec<String> = objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Service/shop-db",
                "StatefulSet/shop-db",
                "Service/shop-web",
                "Deployment/shop-web",
                "HorizontalPodAutoscaler/shop-web",
                "Ingress/shop-web-site",
                "Service/shop-web-metrics",
                "Service/shop-trainer",
                "Deployment/shop-trainer",
            ]
        );
        for object in &objects {
            assert_eq!(object["metadata"]["namespace"], "shop-prod", "{object:#}");
            assert_eq!(
                object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                "outpost"
            );
        }
        let db = &objects[1]["spec"];
        assert_eq!(db["template"]["spec"]["serviceAccountName"], "shop-storage");
        assert_eq!(db["template"]["spec"]["nodeSelector"]["pool"], "general");
        assert_eq!(
            db["volumeClaimTemplates"][0]["spec"]["storageClassName"],
            "fast-ssd"
        );
        assert_eq!(
            db["persistentVolumeClaimRetentionPolicy"]["whenDeleted"],
            "Retain"
        );
        let web = &objects[3]["spec"];
        assert_eq!(web["replicas"], Value::Null, "the HPA owns the count");
        let container = &web["template"]["spec"]["containers"][0];
        assert_eq!(container["resources"]["requests"]["cpu"], "250m");
        assert_eq!(container["readinessProbe"]["failureThreshold"], 3);
        assert!(
            container["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "DB_HOST", "value": "shop-db.shop-prod.svc"}))
        );
        assert_eq!(objects[4]["spec"]["metrics"].as_array().unwrap().len(), 2);
        assert_eq!(objects[5]["spec"]["ingressClassName"], "nginx");
        assert_eq!(objects[6]["spec"]["type"], "LoadBalancer");
        let trainer = &objects[8]["spec"]["template"]["spec"];
        assert_eq!(
            trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            2
        );
        assert_eq!(trainer["nodeSelector"], json!({"pool": "gpu", "gpu": "l4"}));
        assert_eq!(trainer["tolerations"][0]["effect"], "NoSchedule");
    }

    #[test]
    fn unmapped_identity_pool_or_gpu_is_a_clear_error() {
        let mut config = config(GRANTS);
        config.permissions =
            serde_json::from_value(json!({"execution": {}, "storage": {}})).unwrap();
        let error = render(&config, &everything(), "sha256:00")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("resource db: permissions.storage.service_account is not set"),
            "{error}"
        );
        with_service_accounts(&mut config);
        config.kubernetes.gpus.clear();
        let error = render(&config, &everything(), "sha256:00")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "resource trainer: GPU type \"nvidia-l4\" is not mapped to nodes (config key kubernetes.gpus)"
        );
    }

    #[test]
    fn names_that_collide_or_that_kubernetes_refuses_are_clear_errors() {
        let mut config = config(GRANTS);
        with_service_accounts(&mut config);
        let render_yaml = |config: &Config, yaml: &str| {
            render(config, &Stack::from_yaml(yaml).unwrap().1, "sha256:00")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let resource = |name: &str, endpoints: &str| {
            format!(
                "  - lifecycle: live\n    container:\n      name: {name}\n      code: {{image: \"r.example/a@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"}}\n      cpu: 1\n      memory: 1Gi\n      ports: [80]\n      replicas: 1\n      permissions: execution\n      publicEndpoints: [{endpoints}]\n"
            )
        };
        let stack = |name: &str, resources: &[String]| {
            format!(
                "name: {name}\npermissionProfiles: {{execution: {{}}}}\nresources:\n{}",
                resources.concat()
            )
        };
        let collide = stack(
            "shop",
            &[
                resource("web", "{name: api, port: 80, protocol: tcp}"),
                resource("web-api", ""),
            ],
        );
        assert_eq!(
            render_yaml(&config, &collide),
            Err("resources web and web-api both map to Service/shop-web-api: rename one of them or the endpoint".into())
        );
        let long = "a".repeat(60);
        assert!(
            render_yaml(&config, &stack("shop", &[resource(&long, "")]))
                .unwrap_err()
                .contains("characters, more than Kubernetes allows (63)")
        );
        assert_eq!(
            render_yaml(&config, &stack("1shop", &[resource("web", "")])),
            Err(
                "Service/1shop-web: a Service name must start with a letter; rename the stack"
                    .into()
            )
        );
        let hostless = stack(
            "shop",
            &[resource("web", "{name: www, port: 80, protocol: http}")],
        );
        assert_eq!(
            render_yaml(&config, &hostless),
            Err(
                "resource web: public endpoint www has no host (config key kubernetes.hosts.www)"
                    .into()
            )
        );
    }

    #[test]
    fn claims_follow_the_customers_choice_to_keep_or_delete_volumes() {
        let mut config = config(GRANTS);
        with_service_accounts(&mut config);
        let policy = |config: &Config| {
            let objects = render(config, &everything(), "sha256:00").unwrap();
            let db = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
            db["spec"]["persistentVolumeClaimRetentionPolicy"].clone()
        };
        assert_eq!(
            policy(&config),
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
        );
        config.kubernetes.delete_volumes = true;
        assert_eq!(
            policy(&config),
            json!({"whenDeleted": "Delete", "whenScaled": "Delete"})
        );
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(cpu(2.0), "2");
        assert_eq!(cpu(0.5), "500m");
        assert_eq!(cpu(1.25), "1250m");
    }
}
