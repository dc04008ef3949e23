//! The Kubernetes install artifacts in deploy/: the Helm chart, linted and rendered by Helm's own
//! engine (helm-python-sdk: Helm's Go SDK as a library, driven by tests/scripts/chart.py; no helm
//! binary can be installed here), every object valid for two Kubernetes minors
//! (kubernetes-validate), the security-relevant facts asserted, the agent.yaml it writes valid
//! for the agent, and deploy/kubernetes/outpost-agent.yaml what render.sh makes of it now.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::{Run, binary, python, repo, run, testdata};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

/// Not the example's `outpost`: everything must follow the release namespace.
const NAMESPACE: &str = "acme-prod";

/// Values over the example's, covering both branches of the templates.
struct Variant {
    args: &'static [&'static str],
    metrics: bool,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        args: &[],
        metrics: true,
    },
    Variant {
        args: &[
            "--set",
            "metrics.enabled=false",
            "--set",
            "config.kubernetes.delete_volumes=true",
        ],
        metrics: false,
    },
];

const VERBS: [&str; 5] = ["get", "list", "create", "patch", "delete"];

fn chart() -> PathBuf {
    repo().join("deploy/helm/outpost-agent")
}

fn example_values() -> PathBuf {
    repo().join("deploy/kubernetes/values.yaml")
}

/// `chart.py COMMAND CHART EXAMPLE_VALUES` in NAMESPACE, with `extra` arguments.
fn chart_py(command: &str, extra: &[&str]) -> Run {
    run(python()
        .arg(repo().join("tests/scripts/chart.py"))
        .arg(command)
        .arg(chart())
        .arg(example_values())
        .args(["--name", "outpost-agent", "--namespace", NAMESPACE])
        .args(extra))
}

/// The rendered objects and the agent.yaml of the ConfigMap, as JSON.
fn facts(extra: &[&str]) -> (Vec<Value>, Value) {
    let mut parsed: Value = serde_json::from_str(&chart_py("facts", extra).ok().stdout).unwrap();
    let objects = parsed["objects"].as_array().unwrap().clone();
    (objects, parsed["agent_config"].take())
}

fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

#[test]
fn the_chart_lints_clean() {
    run(python()
        .arg(repo().join("tests/scripts/chart.py"))
        .arg("lint")
        .arg(chart()))
    .ok();
}

#[test]
fn the_rendered_objects_are_valid_for_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, variant) in VARIANTS.iter().enumerate() {
        let rendered = dir.path().join(format!("rendered-{i}.yaml"));
        std::fs::write(&rendered, chart_py("render", variant.args).ok().stdout).unwrap();
        outpost_tests::assert_valid_for_kubernetes(&rendered, &format!("{:?}", variant.args));
    }
}

#[test]
fn the_agent_gets_its_namespace_only_and_a_locked_down_pod() {
    for variant in &VARIANTS {
        let (objects, config) = facts(variant.args);

        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert!(
            !kinds.iter().any(|k| k.starts_with("Cluster")),
            "cluster-wide objects: {kinds:?}"
        );
        let mut expected = vec![
            "ServiceAccount",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "Deployment",
        ];
        if variant.metrics {
            expected.insert(5, "Service");
        }
        assert_eq!(kinds, expected, "{:?}", variant.args);
        for object in &objects {
            assert_eq!(
                object["metadata"]["namespace"], NAMESPACE,
                "{}",
                object["metadata"]["name"]
            );
        }

        // The Role grants exactly what the Kubernetes runtime applies and prunes.
        let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for rule in the(&objects, "Role")["rules"].as_array().unwrap() {
            assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    let key = format!("{}/{}", group.as_str().unwrap(), resource.as_str().unwrap());
                    let verbs = rule["verbs"].as_array().unwrap().iter();
                    granted
                        .entry(key)
                        .or_default()
                        .extend(verbs.map(|v| v.as_str().unwrap().to_string()));
                }
            }
        }
        let all = || VERBS.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
        let mut wanted: BTreeMap<String, BTreeSet<String>> = [
            "/services",
            "apps/deployments",
            "apps/statefulsets",
            "autoscaling/horizontalpodautoscalers",
            "networking.k8s.io/ingresses",
        ]
        .into_iter()
        .map(|k| (k.to_string(), all()))
        .collect();
        // Pods only to replace one a StatefulSet is stuck on (or stop them for a restore);
        // claims and their snapshots only to snapshot and restore data (with delete_volumes
        // a StatefulSet's retention policy deletes its claims).
        let pods = ["list", "delete"].map(String::from);
        wanted.insert("/pods".into(), pods.into());
        let snapshots = ["get", "list", "create", "delete"].map(String::from);
        wanted.insert(
            "snapshot.storage.k8s.io/volumesnapshots".into(),
            snapshots.into(),
        );
        let claims = ["get", "create", "delete"].map(String::from);
        wanted.insert("/persistentvolumeclaims".into(), claims.into());
        assert_eq!(granted, wanted, "{:?}", variant.args);

        let binding = the(&objects, "RoleBinding");
        let account = the(&objects, "ServiceAccount")["metadata"]["name"].clone();
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(
            binding["roleRef"]["name"],
            the(&objects, "Role")["metadata"]["name"]
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}])
        );

        let deployment = the(&objects, "Deployment");
        assert_eq!(deployment["spec"]["replicas"], 1);
        assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], account);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod.get(key).is_none(), "{key}");
        }
        for volume in pod["volumes"].as_array().unwrap() {
            assert!(volume.get("hostPath").is_none(), "{volume}");
        }
        let containers = pod["containers"].as_array().unwrap();
        for container in containers {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true);
            assert_eq!(security["allowPrivilegeEscalation"], false);
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
            assert!(security.get("privileged").is_none());
        }
        let agent = &containers[0];
        if variant.metrics {
            assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
        } else {
            assert_eq!(
                agent["livenessProbe"]["exec"]["command"],
                json!([
                    "/outpost-agent",
                    "status",
                    "--config",
                    "/etc/outpost/agent.yaml"
                ])
            );
        }

        let claim = the(&objects, "PersistentVolumeClaim");
        assert_eq!(
            claim["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );

        // agent.yaml: the chart's keys, and the paths it names are the ones mounted.
        assert_eq!(config["runtime"], "kubernetes");
        assert_eq!(config["kubernetes"]["namespace"], NAMESPACE);
        assert_eq!(config["trust"], json!({"root": "/etc/outpost/root.json"}));
        assert_eq!(config["api"]["socket"], "/run/outpost/agent.sock");
        let metrics_address = config["api"].get("metrics_address");
        if variant.metrics {
            assert_eq!(metrics_address, Some(&json!("0.0.0.0:9090")));
        } else {
            assert_eq!(metrics_address, None);
        }
        let mounts: BTreeMap<&str, &str> = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap(),
                    m["name"].as_str().unwrap(),
                )
            })
            .collect();
        let state = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"])
            .unwrap();
        let state_dir = config["state_dir"].as_str().unwrap();
        assert_eq!(
            mounts.get(state_dir),
            Some(&state["name"].as_str().unwrap())
        );
        assert_eq!(mounts.get("/etc/outpost"), Some(&"config"));
        assert_eq!(mounts.get("/run/outpost"), Some(&"run"));
    }
}

#[test]
fn a_profile_mapped_to_the_agents_own_service_account_is_refused() {
    chart_py(
        "render",
        &[
            "--set",
            "config.permissions.execution.service_account=outpost-agent",
        ],
    )
    .fails(
        1,
        "config.permissions.execution.service_account is the agent's own ServiceAccount",
    );
}

#[test]
fn rendering_without_the_root_json_fails_with_the_reason() {
    chart_py("render", &["--set", "rootJson="]).fails(
        1,
        "rootJson is required: the vendor's root.json, e.g. --set-file rootJson=root.json",
    );
}

/// The agent itself accepts the chart's config: `outpost-agent check-config` on the rendered
/// ConfigMap's files, moved from /etc/outpost to a temporary directory, with a real root.json.
#[test]
fn the_agent_accepts_the_config_the_chart_writes() {
    for variant in &VARIANTS {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![dir.path().to_str().unwrap()];
        args.extend(variant.args);
        chart_py("config-files", &args).ok();
        let config = dir.path().join("agent.yaml");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("/etc/outpost", dir.path().to_str().unwrap());
        std::fs::write(&config, text).unwrap();
        std::fs::copy(
            testdata().join("bundles/rotated-root/root-v1.json"),
            dir.path().join("root.json"),
        )
        .unwrap();
        run(Command::new(binary("outpost-agent"))
            .args(["check-config", "--config"])
            .arg(&config))
        .ok();
    }
}

#[test]
fn the_kubectl_manifests_are_rendered_from_the_chart() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("outpost-agent.yaml");
    run(Command::new("bash")
        .arg(repo().join("deploy/kubernetes/render.sh"))
        .arg(&fresh))
    .ok();
    let committed = repo().join("deploy/kubernetes/outpost-agent.yaml");
    assert!(
        std::fs::read_to_string(&fresh).unwrap()
            == std::fs::read_to_string(&committed).unwrap_or_default(),
        "{} differs from the chart: run deploy/kubernetes/render.sh",
        committed.display()
    );
}

#[test]
fn the_chart_runs_this_agent_version() {
    let chart = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    let app_version = format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        chart.lines().any(|line| line == app_version),
        "Chart.yaml lacks {app_version} (the image tag build.sh gives this version)"
    );
}
