"""The deployment examples of deploy/, checked offline (scripts/test-dynamo runs this in
the Dynamo venv, which has the Kubernetes client and PyYAML):

- deploy/kubernetes/inferd.yaml: each core object round-trips through the Kubernetes
  client's typed models (an unknown or mistyped field does not survive it); the
  InferencePool holds the v1 API's fields only; the objects refer to each other
  rightly (selectors, ports, the picker's pool and config); and the inferd container's
  own arguments are run for real (the model folder and port swapped for local ones):
  it serves, answers its probes and the served names, and exports every series the
  picker's configuration names, with the labels it reads.
- deploy/dynamo/launch.sh: its commands parse with the worker's and the Dynamo
  frontend's own argument parsers.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import yaml
from kubernetes import client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFERD = os.environ.get("INFERD_BIN") or os.path.join(ROOT, "target", "release", "inferd")
MODEL_FOLDER = os.environ["INFERD_TEST_MODEL_FOLDER"]


def check(name, fn):
    fn()
    print(f"ok  {name}", flush=True)


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


K8S = load("deploy/kubernetes/inferd.yaml")


def only(kind, name=None):
    found = [d for d in K8S if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def core_objects_match_the_kubernetes_models():
    api = client.ApiClient()
    models = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
              ("v1", "ConfigMap"): "V1ConfigMap", ("v1", "ServiceAccount"): "V1ServiceAccount",
              ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
              ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding"}
    kinds = {(d["apiVersion"], d["kind"]) for d in K8S}
    assert kinds - set(models) == {("inference.networking.k8s.io/v1", "InferencePool")}, kinds
    for doc in K8S:
        key = (doc["apiVersion"], doc["kind"])
        if key not in models:
            continue
        typed = api._ApiClient__deserialize(doc, models[key])
        back = api.sanitize_for_serialization(typed)
        assert back == doc, f"{doc['kind']} {doc['metadata']['name']}: fields lost or retyped:\n{json.dumps(doc)}\n{json.dumps(back)}"


def pool_has_the_v1_fields():
    pool = only("InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}, spec
    labels = spec["selector"]["matchLabels"]
    assert set(spec["selector"]) == {"matchLabels"} and 1 <= len(labels) <= 64
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ports = spec["targetPorts"]
    assert 1 <= len(ports) <= 8 and all(set(p) == {"number"} and 1 <= p["number"] <= 65535 for p in ports)
    assert len({p["number"] for p in ports}) == len(ports)
    ref = spec["endpointPickerRef"]
    assert set(ref) <= {"group", "kind", "name", "port", "failureMode"}, ref
    assert ref.get("kind", "Service") == "Service" and set(ref["port"]) == {"number"}
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


def references_agree():
    server = only("Deployment", "inferd-smollm2")
    pod = server["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert server["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = pod["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[args.index("--port") + 1] == str(port["http"])
    service = only("Service", "inferd-smollm2")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", port["http"])
    pool = only("InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port["http"]]
    # The picker: its Service is the pool's reference, it watches this pool, and its
    # configuration names the engine these pods say they run.
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = only("Service", ref["name"])
    assert epp_service["spec"]["ports"][0]["port"] == ref["port"]["number"]
    epp = only("Deployment", ref["name"])
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    epp_args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert epp_args[epp_args.index("--pool-name") + 1] == pool["metadata"]["name"]
    # It may read the pool and the pods: its account is bound to a role that says so.
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    only("ServiceAccount", account)
    binding = [b for b in K8S if b["kind"] == "RoleBinding" and any(
        s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])][0]
    role = only("Role", binding["roleRef"]["name"])
    allowed = {(g, r) for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= allowed, allowed
    config = epp_config()
    assert config["kind"] == "EndpointPickerConfig" and config["apiVersion"] == "llm-d.ai/v1alpha1"
    extractor = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"][0]["parameters"]
    engine = labels[extractor["engineLabelKey"]]
    assert engine in [e["name"] for e in extractor["engineConfigs"]], engine
    # Terminating pods get longer than inferd's own drain.
    grace = int(args[args.index("--shutdown-grace-secs") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace


def epp_config():
    config_map = only("ConfigMap", "inferd-smollm2-epp")
    return yaml.safe_load(config_map["data"]["epp.yaml"])


def http(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.status, r.read().decode()


def the_container_runs_and_exports_what_the_picker_reads():
    container = only("Deployment", "inferd-smollm2")["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    args[args.index("/mnt/models")] = MODEL_FOLDER
    args[args.index("--port") + 1] = "0"
    args[args.index("--host") + 1] = "127.0.0.1"
    p = subprocess.Popen([INFERD, *args, "--num-blocks", "256"], stderr=subprocess.PIPE, text=True)
    try:
        base = None
        deadline = time.time() + 120
        while base is None and time.time() < deadline:
            line = p.stderr.readline()
            assert line, "inferd exited"
            m = re.search(r"serving .* on (http://[0-9.:]+)", line)
            base = m and m.group(1)
        assert base, "inferd did not start"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert http(base, container[probe]["httpGet"]["path"])[0] == 200, probe
        names = args[args.index("--served-model-name") + 1:args.index("--host")]
        models = json.loads(http(base, "/v1/models")[1])
        assert [m["id"] for m in models["data"]] == names, models
        _, metrics = http(base, "/metrics")
        extractor = [p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor"][0]["parameters"]
        engine = [e for e in extractor["engineConfigs"] if e["name"] == "inferd"][0]
        for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
            name = engine[key]
            assert re.search(rf"^# TYPE {re.escape(name)} gauge$", metrics, re.M), (key, name)
            samples = re.findall(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", metrics, re.M)
            assert samples, (key, name)
            float(samples[0][1])
        labels = dict(kv.split("=", 1) for kv in re.findall(
            r'^inferd:cache_config_info{([^}]*)}', metrics, re.M)[0].replace('"', "").split(","))
        assert int(labels[engine["cacheBlockSizeLabelName"]]) > 0
        assert int(labels[engine["cacheNumBlocksLabelName"]]) == 256
    finally:
        p.terminate()
        p.wait(60)


def launch_script_commands_parse():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "deploy/dynamo/launch.sh")], check=True)
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "deploy/dynamo/launch.sh"), "--print", "HuggingFaceTB/SmolLM2-135M-Instruct", "3"],
        check=True, capture_output=True, text=True, env=dict(os.environ, INFERD_ARGS="--num-blocks 512"),
    ).stdout.splitlines()
    assert len(out) == 4, out
    frontend, workers = shlex.split(out[0]), [shlex.split(w) for w in out[1:]]
    assert frontend[1:3] == ["-m", "dynamo.frontend"], frontend
    from dynamo.frontend.frontend_args import FrontendArgGroup, FrontendConfig

    parser = argparse.ArgumentParser()
    FrontendArgGroup().add_arguments(parser)
    args, unknown = parser.parse_known_args(frontend[3:])
    assert not unknown, unknown
    config = FrontendConfig.from_cli_args(args)
    config.validate()
    assert args.router_mode == "kv" and args.migration_limit == 3
    from inferd_dynamo.engine import _parse

    for w in workers:
        assert w[1:3] == ["-m", "inferd_dynamo"], w
        parsed, extra = _parse(w[3:])
        assert parsed.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and extra == ["--num-blocks", "512"], (parsed, extra)


for name, fn in [("Kubernetes core objects match the client's models", core_objects_match_the_kubernetes_models),
                 ("the InferencePool holds the v1 fields", pool_has_the_v1_fields),
                 ("selectors, ports and the picker's references agree", references_agree),
                 ("the inferd container runs and exports what the picker reads",
                  the_container_runs_and_exports_what_the_picker_reads),
                 ("the Dynamo launch script's commands parse", launch_script_commands_parse)]:
    check(name, fn)
print(json.dumps({"deploy": "checked", "passed": 5}))
sys.exit(0)
