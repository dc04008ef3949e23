#!/usr/bin/env python3
"""Render and lint a Helm chart with Helm's own engine, without a helm binary.

    chart.py render CHART_DIR VALUES_FILE [--set K=V]... [--name N] [--namespace NS]
    chart.py lint CHART_DIR
    chart.py facts CHART_DIR VALUES_FILE [--set K=V]... [--name N] [--namespace NS]
    chart.py config-files CHART_DIR VALUES_FILE OUT_DIR [--set K=V]... [--name N] [--namespace NS]

helm-python-sdk (PyPI; import name helm_python) is Helm's Go SDK built as a C library, so
rendering, values.schema.json validation and lint are Helm's, as with `helm template` and
`helm lint`; --set is Helm's --set, applied over the values file. No cluster is contacted.

render       the manifests as multi-document YAML, in Helm's install order (kind, then name),
             each under a `# Source:` line; NOTES.txt and empty documents are left out.
lint         exit 1 on any lint error or warning (informational findings are printed only).
facts        JSON {"objects": [...], "agent_config": {...}}: the rendered objects and the
             ConfigMap's agent.yaml parsed, for tests that have no YAML parser.
config-files write the agent's ConfigMap (agent.yaml, root.json) into OUT_DIR, for
             `outpost-agent check-config`.

Errors are one line on stderr, exit 1. Needs the venv of .ci/scripts/setup.sh (helm_python and
PyYAML).
"""
import argparse
import json
import os
import re
import sys
import tempfile

try:
    import helm_python
    import yaml
# helm_python also fails here when its native library cannot be loaded.
except Exception as e:
    sys.exit(f"chart.py: {e} (the venv is filled by .ci/scripts/setup.sh)")

# Helm's install order (pkg/release/util/kind_sorter.go), so `kubectl apply -f` of the rendered
# file creates objects in the order `helm install` would; other kinds go last.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


class Failure(Exception):
    """A one-line reason to exit 1."""


def one_line(text):
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def merge(base, override):
    """Helm's merge of --set over -f: maps merge key by key, anything else is replaced."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load_values(path, sets):
    try:
        with open(path, encoding="utf-8") as f:
            # Helm's own parsers, as for `helm template -f FILE --set K=V`.
            values = helm_python.values_from_yaml(f.read())
    except OSError as e:
        raise Failure(f"{path}: {e.strerror}") from e
    for expression in sets:
        merge(values, helm_python.parse_set_string(expression))
    return values


def documents(args):
    """The rendered objects as (source, text, object), in install order."""
    values = load_values(args.values, args.set)
    with helm_python.Chart.load(args.chart) as chart:
        rendered = chart.render(values, name=args.name, namespace=args.namespace)
    docs = []
    for source in sorted(rendered):
        if source.endswith("NOTES.txt"):
            continue
        for text in re.split(r"^---[ \t]*$", rendered[source], flags=re.MULTILINE):
            try:
                obj = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise Failure(f"{source}: not YAML: {one_line(e)}") from e
            if obj is None:
                continue
            if not isinstance(obj, dict) or "kind" not in obj:
                raise Failure(f"{source}: a document that is not a Kubernetes object")
            docs.append((source, text.strip("\n"), obj))

    def order(doc):
        kind = doc[2]["kind"]
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        return (rank, kind, doc[2].get("metadata", {}).get("name", ""), doc[0])

    return sorted(docs, key=order)


def agent_configmap(docs):
    """The data of the rendered ConfigMap that holds agent.yaml."""
    found = [obj["data"] for _, _, obj in docs
             if obj["kind"] == "ConfigMap" and "agent.yaml" in (obj.get("data") or {})]
    if len(found) != 1:
        raise Failure(f"expected one ConfigMap with agent.yaml, found {len(found)}")
    return found[0]


def quietly(call):
    """Runs call with fd 2 in a temporary file and returns its result and what was written
    there: Helm logs each missing required value to stderr while linting (expected with the
    chart's defaults), which is worth showing only when the lint fails."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return result, capture.read().decode("utf-8", errors="replace")


def cmd_render(args):
    docs = documents(args)
    for source, text, _ in docs:
        print(f"---\n# Source: {source}\n{text}")


def cmd_lint(args):
    if not os.path.isdir(args.chart):
        raise Failure(f"{args.chart}: not a directory")
    report, log = quietly(lambda: helm_python.lint(args.chart))
    severities = {1: "INFO", 2: "WARNING", 3: "ERROR"}
    bad = 0
    for m in report.get("messages") or []:
        print(f"[{severities.get(m['severity'], 'UNKNOWN')}] {m['path']}: {one_line(m['error'])}")
        bad += m["severity"] != 1
    # Errors that stopped the lint itself, if not already among the findings.
    if not bad:
        for error in report.get("errors") or []:
            print(f"[ERROR] {one_line(error)}")
            bad += 1
    if bad:
        sys.stderr.write(log)
        raise Failure(f"{args.chart}: lint found {bad} error(s) or warning(s)")


def cmd_facts(args):
    docs = documents(args)
    objects = [obj for _, _, obj in docs]
    config = yaml.safe_load(agent_configmap(docs)["agent.yaml"])
    print(json.dumps({"objects": objects, "agent_config": config}, indent=2))


def cmd_config_files(args):
    os.makedirs(args.out_dir, exist_ok=True)
    for name, text in agent_configmap(documents(args)).items():
        if "/" in name or name.startswith("."):
            raise Failure(f"ConfigMap key {name!r} is not a plain file name")
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(os.path.join(args.out_dir, name))


def main():
    parser = argparse.ArgumentParser(prog="chart.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def rendering(name, func, extra=()):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("values")
        for arg in extra:
            p.add_argument(arg)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--name", default="outpost-agent")
        p.add_argument("--namespace", default="outpost")
        p.set_defaults(func=func)

    rendering("render", cmd_render)
    rendering("facts", cmd_facts)
    rendering("config-files", cmd_config_files, ["out_dir"])
    lint = sub.add_parser("lint")
    lint.add_argument("chart")
    lint.set_defaults(func=cmd_lint)

    args = parser.parse_args()
    try:
        args.func(args)
    except (Failure, helm_python.HelmError) as e:
        sys.exit(f"chart.py {args.command}: {one_line(e)}")


if __name__ == "__main__":
    main()
