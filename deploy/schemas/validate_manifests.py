#!/usr/bin/env python3
"""Validates manifests rendered by `helm template` from helm/tandem, offline.

usage: validate_manifests.py [-k 1.28 -k 1.37 ...] [--args-out FILE] RENDERED.yaml...

1. Every object of a built-in kind passes kubernetes-validate --strict (its Python API) for each
   Kubernetes version given; a kind with no schema is an error, not a warning.
2. LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) and ServiceMonitor (monitoring.coreos.com/v1)
   are checked against their CRDs' OpenAPI schemas vendored next to this file, made strict
   (unknown fields refused, as the API server's strict field validation does); the LWS leader and
   worker pod templates are also checked as core v1 PodTemplates by kubernetes-validate.
3. Names fit Kubernetes' limits (pod hostnames, services), no object is rendered twice.
4. Tandem wiring: each server's flags are ones the `tandem` binary takes, probes use
   grpc.health.v1 on the gRPC port, a tensor-parallel group's ranks agree on world size and
   peers, etcd endpoints point at the etcd the chart deploys.

Exit status 1 with one line per problem when anything fails.
"""
import argparse
import copy
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kvu
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CRDS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}

# The flags each role is given by the chart: the `tandem` CLI contract (docs/deploy.md).
FLAGS = {
    "router": {"--listen", "--metrics-listen", "--workers", "--model-name", "--drain-grace",
               "--etcd-endpoints", "--cluster", "--routing-policy", "--max-new-tokens-limit",
               "--max-message-bytes", "--max-concurrent-streams", "--request-timeout",
               "--poll-interval", "--log-json", "--config", "--tls-cert", "--tls-key",
               "--tls-client-ca", "--tls-ca", "--tls-server-name", "--api-keys"},
    "worker": {"--model", "--listen", "--metrics-listen", "--model-name", "--quant",
               "--max-context", "--max-batch-tokens", "--max-running", "--max-waiting",
               "--max-new-tokens-limit", "--max-message-bytes", "--max-concurrent-streams",
               "--drain-grace", "--rank", "--world-size", "--group-peers",
               "--group-connect-timeout", "--group-io-timeout", "--etcd-endpoints", "--cluster",
               "--advertise-address", "--group", "--draft-endpoint", "--log-json", "--config",
               "--device", "--collective", "--max-queue-time", "--tls-cert", "--tls-key",
               "--tls-client-ca", "--tls-ca", "--tls-server-name"},
    "draft": {"--model", "--listen", "--metrics-listen", "--etcd-endpoints", "--cluster",
              "--advertise-address", "--log-json", "--config", "--device", "--tls-cert",
              "--tls-key", "--tls-client-ca"},
}

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def strictify(schema):
    """Refuses unknown fields wherever the CRD lists properties and doesn't keep unknown ones."""
    if isinstance(schema, dict):
        out = {k: strictify(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string"):
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        return out
    if isinstance(schema, list):
        return [strictify(v) for v in schema]
    return schema


def crd_validator(path):
    with open(os.path.join(HERE, path)) as f:
        schema = json.load(f)
    schema = strictify(schema)
    # The CRD schema leaves metadata open; the API server checks it as ObjectMeta.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def kv(doc, where, versions):
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kvu.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(where, f"kubernetes {v}: {path}: {e.message}")
        except kvu.SchemaNotFoundError as e:
            problem(where, f"no schema: {e.message}")


def args_of(c):
    return list(c.get("args") or [])


def flag_map(args):
    out = {}
    for a in args:
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out[k] = v
    return out


SERVER_ARGS = []  # (where, role, args) of every Tandem server rendered, for --args-out


def check_server(c, role, where, pod):
    args = args_of(c)
    SERVER_ARGS.append((where, role, [a for a in args if a != role] if role != "worker" else args))
    if role != "worker":
        if not args or args[0] != role:
            problem(where, f"container {c['name']}: first arg must be the subcommand {role!r}, got {args[:1]}")
            return {}
        args = args[1:]
    else:
        cmd = c.get("command") or []
        if not (cmd[:2] == ["/bin/sh", "-c"] and "exec /usr/local/bin/tandem worker \"$@\"" in cmd[2]):
            problem(where, "worker container must exec `tandem worker` with its args")
    bad = [a for a in args if not a.startswith("--")]
    if bad:
        problem(where, f"{role}: arguments must be --flag=value, got {bad}")
    flags = flag_map(args)
    unknown = set(flags) - FLAGS[role]
    if unknown:
        problem(where, f"{role}: flags the tandem binary doesn't take: {sorted(unknown)}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    listen = flags.get("--listen", "")
    if not listen.endswith(f":{ports.get('grpc')}"):
        problem(where, f"{role}: --listen {listen} is not the grpc containerPort {ports.get('grpc')}")
    if not flags.get("--metrics-listen", "").endswith(f":{ports.get('metrics')}"):
        problem(where, f"{role}: --metrics-listen is not the metrics containerPort")
    # With TLS the gRPC port speaks only TLS, which kubelet's gRPC probe cannot: the same health
    # is then read over HTTP on the metrics port (/readyz).
    tls = "--tls-cert" in flags
    for probe in ("readinessProbe",) + (("startupProbe", "livenessProbe") if role != "router" else ()):
        p = c.get(probe) or {}
        if tls:
            h = p.get("httpGet", {})
            if h.get("path") != "/readyz" or h.get("port") not in ("metrics", ports.get("metrics")):
                problem(where, f"{role}: {probe} must be httpGet /readyz on the metrics port (TLS)")
        elif p.get("grpc", {}).get("port") != ports.get("grpc"):
            problem(where, f"{role}: {probe} must be a grpc probe on port {ports.get('grpc')}")
    if tls:
        for f in ("--tls-cert", "--tls-key") + (("--tls-client-ca",) if role != "router" else ()):
            if not flags.get(f, "").startswith("/"):
                problem(where, f"{role}: TLS needs {f} on the mounted secret")
    if role == "router":
        lp = (c.get("livenessProbe") or {}).get("httpGet", {})
        if lp.get("path") != "/healthz":
            problem(where, "router: livenessProbe must be httpGet /healthz on the metrics port")
    names = {e["name"] for e in c.get("env", [])}
    for ref in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", " ".join(args)):
        if ref not in names and not ref.startswith("LWS_"):
            problem(where, f"{role}: $({ref}) is used in args but not set in env")
    mounts = {m["name"] for m in c.get("volumeMounts", [])}
    vols = {v["name"] for v in pod.get("volumes", [])}
    for m in mounts - vols:
        problem(where, f"{role}: volumeMount {m} has no volume")
    return flags


def check_group(where, pod_spec, size, peer_host, lws=False):
    """peer_host(r) -> the host rank r must be reached at (a regex)."""
    c = pod_spec["containers"][0]
    flags = check_server(c, "worker", where, pod_spec)
    if flags.get("--world-size") != str(size):
        problem(where, f"--world-size {flags.get('--world-size')} != group size {size}")
    if size > 1:
        peers = flags.get("--group-peers", "").split(",")
        if len(peers) != size:
            problem(where, f"--group-peers has {len(peers)} entries for {size} ranks")
        collective = {p["name"]: p["containerPort"] for p in c["ports"]}["collective"]
        for r, p in enumerate(peers):
            if not re.fullmatch(peer_host(r) + f":{collective}", p):
                problem(where, f"rank {r}'s peer address {p} is not {peer_host(r)}:{collective}")
    want_rank = "$(LWS_WORKER_INDEX)" if lws else "$(TANDEM_RANK)"
    if flags.get("--rank") != want_rank:
        problem(where, f"--rank must be {want_rank}, got {flags.get('--rank')}")
    return flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", "--kubernetes-version", action="append", default=[])
    ap.add_argument("--args-out", help="write each server's role and args as JSON lines here")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    versions = a.kubernetes_version or [kvu.latest_version()]
    validators = {k: crd_validator(v) for k, v in CRDS.items()}
    total = 0
    for fn in a.files:
        with open(fn) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        seen = set()
        by_kind = {}
        for d in docs:
            total += 1
            kind, api, name = d.get("kind"), d.get("apiVersion"), d.get("metadata", {}).get("name", "")
            where = f"{os.path.basename(fn)}: {kind}/{name}"
            if (kind, name) in seen:
                problem(where, "rendered twice")
            seen.add((kind, name))
            by_kind.setdefault(kind, []).append(d)
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
                problem(where, "name is not a DNS-1123 label of at most 63 characters")
            if (api, kind) in validators:
                for e in sorted(validators[(api, kind)].iter_errors(d), key=lambda e: list(e.path)):
                    problem(where, f"CRD schema: {'.'.join(str(p) for p in e.path)}: {e.message}")
                if kind == "LeaderWorkerSet":
                    t = d["spec"]["leaderWorkerTemplate"]
                    for which in ("leaderTemplate", "workerTemplate"):
                        kv({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{which.lower()}"},
                            "template": t[which]}, f"{where} {which}", versions)
            else:
                kv(d, where, versions)
        try:
            check_wiring(os.path.basename(fn), by_kind)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            problem(os.path.basename(fn), f"Tandem wiring could not be checked: {type(e).__name__}: {e}")
    if a.args_out:
        with open(a.args_out, "w") as f:
            for where, role, args in SERVER_ARGS:
                f.write(json.dumps({"where": where, "role": role, "args": args}) + "\n")
    for p in problems:
        print(f"FAIL {p}")
    print(f"validate_manifests: {total} objects in {len(a.files)} file(s), kubernetes {', '.join(versions)}: "
          f"{'ok' if not problems else str(len(problems)) + ' problem(s)'}")
    return 1 if problems else 0


def check_wiring(fn, by_kind):
    etcd_eps = None
    for s in by_kind.get("StatefulSet", []):
        if s["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "etcd":
            n, svc, reps = s["metadata"]["name"], s["spec"]["serviceName"], s["spec"]["replicas"]
            etcd_eps = {f"http://{n}-{i}.{svc}.{{ns}}.svc:2379" for i in range(reps)}
    servers = []
    for lws in by_kind.get("LeaderWorkerSet", []):
        name = lws["metadata"]["name"]
        size = lws["spec"]["leaderWorkerTemplate"]["size"]
        groups = lws["spec"]["replicas"]
        where = f"{fn}: LeaderWorkerSet/{name}"
        if len(f"{name}-{groups - 1}-{size - 1}") > 63:
            problem(where, "worker pod names would exceed 63 characters")
        if lws["spec"].get("startupPolicy", "LeaderCreated") != "LeaderCreated":
            problem(where, "startupPolicy must be LeaderCreated: the leader is ready only once every rank has joined")
        if lws["spec"]["leaderWorkerTemplate"].get("restartPolicy") != "RecreateGroupOnPodRestart":
            problem(where, "restartPolicy must be RecreateGroupOnPodRestart: a group lives and dies as one")
        def host(r, name=name):
            if r == 0:
                return re.escape("$(LWS_LEADER_ADDRESS)")
            return re.escape(f"{name}-$(TANDEM_GROUP_INDEX)-{r}.{name}.$(POD_NAMESPACE)")
        for which in ("leaderTemplate", "workerTemplate"):
            spec = lws["spec"]["leaderWorkerTemplate"][which]["spec"]
            servers.append(check_group(f"{where} {which}", spec, size, host, lws=True))
    for s in by_kind.get("StatefulSet", []):
        labels = s["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") != "verifier":
            continue
        name, size, svc = s["metadata"]["name"], s["spec"]["replicas"], s["spec"]["serviceName"]
        where = f"{fn}: StatefulSet/{name}"
        if s["spec"].get("podManagementPolicy") != "Parallel":
            problem(where, "podManagementPolicy must be Parallel: ranks meet at start-up")
        headless = [x for x in by_kind.get("Service", []) if x["metadata"]["name"] == svc]
        if not headless or headless[0]["spec"].get("clusterIP") != "None" or not headless[0]["spec"].get("publishNotReadyAddresses"):
            problem(where, f"serviceName {svc} must be a headless service that publishes not-ready pods")
        if len(f"{name}-{size - 1}") > 52:
            problem(where, "pod names leave no room for the controller-revision-hash label (63)")
        servers.append(check_group(where, s["spec"]["template"]["spec"], size,
                                   lambda r, name=name, svc=svc: re.escape(f"{name}-{r}.{svc}.$(POD_NAMESPACE)")))
    for dep in by_kind.get("Deployment", []):
        role = dep["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        if role in ("router", "draft"):
            spec = dep["spec"]["template"]["spec"]
            servers.append(check_server(spec["containers"][0], role, f"{fn}: Deployment/{dep['metadata']['name']}", spec))
    for flags in servers:
        eps = flags.get("--etcd-endpoints")
        if eps is not None and etcd_eps is not None:
            got = {re.sub(r"\.[a-z0-9-]+\.svc:", ".{ns}.svc:", e) for e in eps.split(",")}
            if got != etcd_eps:
                problem(fn, f"--etcd-endpoints {eps} are not the deployed etcd members")
        if eps is not None and "--cluster" not in flags:
            problem(fn, "--etcd-endpoints without --cluster")
    if not servers:
        problem(fn, "no Tandem servers rendered")


if __name__ == "__main__":
    sys.exit(main())
