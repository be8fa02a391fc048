"""deploy/: the Kubernetes manifests and the Dockerfile parse and agree with each other and
with launch.serve (ports, probe paths, labels, flags)."""

import glob
import importlib.metadata
import json
import os
import re
import shlex

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
SERVE = os.path.join(ROOT, "launch", "serve.py")
API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
}


def _manifests() -> dict[str, dict]:
    """Every document of every deploy/k8s/*.yaml, by kind (each kind once)."""
    by_kind = {}
    paths = sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml")))
    assert paths, "no manifests under deploy/k8s"
    for path in paths:
        with open(path) as f:
            for document in yaml.safe_load_all(f):
                if document is None:
                    continue
                assert {"apiVersion", "kind", "metadata"} <= document.keys(), path
                assert document["metadata"]["name"], path
                assert document["kind"] not in by_kind, f"two {document['kind']} manifests"
                by_kind[document["kind"]] = document
    return by_kind


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments (one entry per occurrence), continuations joined."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    text = re.sub(r"\\\n", " ", text)
    instructions = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        instructions.setdefault(name.upper(), []).append(rest.strip())
    return instructions


def _flags(argv: list[str]) -> dict[str, str]:
    """--name=value arguments of a command line."""
    flags = {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            flags[name] = value
    return flags


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _resolve_port(container: dict, port) -> int:
    """A probe or Service port (a number or a named container port) as the container port."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port {port!r} is not a named port of the container"
    return named[port]


def test_every_manifest_has_the_expected_kind_and_api_version():
    manifests = _manifests()
    assert set(manifests) == set(API_VERSIONS)
    for kind, document in manifests.items():
        assert document["apiVersion"] == API_VERSIONS[kind], kind


def test_deployment_probes_resources_and_secrets():
    deployment = _manifests()["Deployment"]
    container = _container(deployment)
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    probes = {
        "readinessProbe": "/ready",
        "livenessProbe": "/health",
        "startupProbe": "/health",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _resolve_port(container, get["port"]) == port["containerPort"], probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    keys = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert keys, "API keys must come from a Secret"
    # The server listens where the container port says, on every interface.
    flags = _flags(container["command"] + container["args"])
    assert container["command"][:3] == ["python", "-m", "launch.serve"]
    assert flags["host"] == "0.0.0.0"
    assert int(flags["port"]) == port["containerPort"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # The workdir flag points at a mounted volume.
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert flags["workdir"] in mounts


def test_selectors_match_the_deployment_labels():
    manifests = _manifests()
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= labels.items()
    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = _container(deployment)
    for port in service["spec"]["ports"]:
        assert _resolve_port(container, port["targetPort"]) == 8000


def test_hpa_targets_the_deployment():
    manifests = _manifests()
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target["apiVersion"] == manifests["Deployment"]["apiVersion"]
    assert target["name"] == manifests["Deployment"]["metadata"]["name"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    types = {m["type"] for m in hpa["metrics"]}
    assert types <= {"Resource", "Pods", "Object", "External", "ContainerResource"}
    for metric in hpa["metrics"]:
        spec = metric[metric["type"][0].lower() + metric["type"][1:]]
        assert spec["target"]["type"] in {"Utilization", "AverageValue", "Value"}
        if metric["type"] == "Pods":
            # Custom metric names cannot hold ':'; the adapter renames vllm:* to vllm_*.
            assert ":" not in spec["metric"]["name"]
    # Replicas belong to the HPA alone: a fixed count in the Deployment would fight it.
    assert "replicas" not in manifests["Deployment"]["spec"]


def test_dockerfile_matches_the_deployment():
    docker = _dockerfile()
    assert docker["FROM"] == ["python:3.11-slim"]
    assert docker["EXPOSE"] == ["8000"]
    (user,) = docker["USER"]
    assert user not in {"root", "0"}
    deployment = _manifests()["Deployment"]
    assert int(user) == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    copied = {shlex.split(c)[0].rstrip("/") for c in docker["COPY"]}
    assert {"requirements.txt", "research", "launch", "configs"} <= copied
    assert any("-r requirements.txt" in r for r in docker["RUN"])
    (cmd,) = docker["CMD"]
    argv = json.loads(cmd)  # exec form: signals reach python, not a shell
    assert argv[:3] == ["python", "-m", "launch.serve"]
    container = _container(deployment)
    assert argv == container["command"] + container["args"]
    (healthcheck,) = docker["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in healthcheck


def _defined_flags() -> set[str]:
    """Flags launch.serve defines, its own and the shared ones of launch/cli.py."""
    defined = set()
    for path in (SERVE, os.path.join(ROOT, "launch", "cli.py")):
        with open(path) as f:
            defined |= set(re.findall(r"flags\.DEFINE_\w+\(\s*[\"'](\w+)[\"']", f.read()))
    return defined


def test_command_flags_exist_in_launch_serve():
    defined = _defined_flags()
    deployment = _manifests()["Deployment"]
    container = _container(deployment)
    argv = json.loads(_dockerfile()["CMD"][0])
    for command in (argv, container["command"] + container["args"]):
        missing = set(_flags(command)) - defined
        assert not missing, f"flags not defined in launch/serve.py: {sorted(missing)}"


def test_api_keys_and_probes_match_the_server():
    """The Secret lands in the variable launch.serve reads, and the kubelet's probes need no
    API key (it sends none): a keyed server must still answer /health and /ready."""
    from research.serving.http import server

    with open(SERVE) as f:  # Not imported: its absl flags would clash with other mains'.
        (keys_env,) = re.findall(r"^KEYS_ENV = \"(\w+)\"", f.read(), flags=re.MULTILINE)
    container = _container(_manifests()["Deployment"])
    keys = [e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert keys == [keys_env]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in server.OPEN_PATHS, probe


def test_dockerfile_installs_the_serving_stack_at_the_tested_versions():
    """Every `name==version` the image installs is what this environment runs, and the
    server's imports beyond requirements.txt are among them."""
    installs = " ".join(r for r in _dockerfile()["RUN"] if "pip install" in r)
    pins = dict(re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s]*)", installs))
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins |= dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", f.read(), flags=re.MULTILINE))
    names = {name.lower().replace("_", "-") for name in pins}
    assert {"fastapi", "uvicorn", "prometheus-client", "jinja2"} <= names
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, name


def test_pods_get_time_to_drain():
    """SIGTERM drains in-flight requests for --drain_timeout_s after the preStop sleep; the
    kubelet must not SIGKILL the pod before that."""
    with open(SERVE) as f:
        (drain_s,) = re.findall(r"\"drain_timeout_s\",\s*([0-9.]+)", f.read())
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    container = _container(_manifests()["Deployment"])
    flags = _flags(container["command"] + container["args"])
    drain_s = float(flags.get("drain_timeout_s", drain_s))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_s
    annotations = _manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"
