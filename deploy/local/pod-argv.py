#!/usr/bin/env python3
"""Turns one container of a `helm template` rendering into the command line the kubelet would run,
so deploy/local/netns-cluster starts exactly what the chart deploys.

usage: pod-argv.py RENDERED.yaml KIND NAME CONTAINER --bin PATH [--field PATH=VALUE]...

Prints, NUL-separated: `env`, NAME=VALUE for each of the container's env entries, then the argv
(command + args, or the image's entrypoint /usr/local/bin/tandem + args), with $(VAR) references
expanded as Kubernetes does (from the container's env, in order; $$ is a literal $; an unknown
reference stays as written) and /usr/local/bin/tandem replaced by --bin.
--field gives the values of the downward API fields the env uses (metadata.name,
metadata.namespace, status.podIP, metadata.labels['...']). An env entry from any other source,
or a field not given, is an error: the local run must not silently differ from the chart.
"""
import argparse
import re
import sys

import yaml

ENTRYPOINT = "/usr/local/bin/tandem"


def pod_spec(obj):
    spec = obj["spec"]
    if "template" in spec:
        return spec["template"]["spec"]
    raise SystemExit(f"{obj['kind']}/{obj['metadata']['name']}: no pod template")


def expand(s, env):
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("kind")
    ap.add_argument("name")
    ap.add_argument("container")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--field", action="append", default=[])
    a = ap.parse_args()
    fields = dict(f.split("=", 1) for f in a.field)
    with open(a.rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    match = [o for o in objs if o["kind"] == a.kind and o["metadata"]["name"] == a.name]
    if len(match) != 1:
        raise SystemExit(f"{a.kind}/{a.name}: found {len(match)} in {a.rendered}")
    spec = pod_spec(match[0])
    cs = [c for c in spec["containers"] if c["name"] == a.container]
    if len(cs) != 1:
        raise SystemExit(f"{a.kind}/{a.name}: no container {a.container}")
    c = cs[0]
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in fields:
                raise SystemExit(f"{a.kind}/{a.name}: env {e['name']} needs --field {path}=VALUE")
            env[e["name"]] = fields[path]
        else:
            raise SystemExit(f"{a.kind}/{a.name}: env {e['name']}: only value and fieldRef are supported")
    argv = list(c.get("command") or [ENTRYPOINT]) + list(c.get("args") or [])
    argv = [expand(x, env).replace(ENTRYPOINT, a.bin) for x in argv]
    out = ["env"] + [f"{k}={v}" for k, v in env.items()] + argv
    sys.stdout.write("\0".join(out) + "\0")


if __name__ == "__main__":
    main()
