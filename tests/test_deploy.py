"""The deployment files parse and say what the scaling issue asks for.

Static checks only: the compose file, the Dockerfile and the KubeRay manifest are read and
parsed; nothing is built, started or fetched.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
RAYCLUSTER = ROOT / "deploy" / "kuberay" / "raycluster.yaml"

# A required interpolation: compose refuses to start when RAY_AUTH_TOKEN is unset or empty.
TOKEN_FROM_HOST = re.compile(r"^\$\{RAY_AUTH_TOKEN:\?[^}]*\}$")


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def kube_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d]


@pytest.fixture(scope="module")
def raycluster(kube_docs) -> dict:
    clusters = [d for d in kube_docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, [d.get("kind") for d in kube_docs]
    return clusters[0]


def argv(command) -> list[str]:
    """A compose `command` (list or string) as an argument list."""
    return list(command) if isinstance(command, list) else shlex.split(command)


def env_dict(environment) -> dict[str, str]:
    """A compose `environment` (mapping or list of KEY=VALUE) as a mapping."""
    if isinstance(environment, dict):
        return {k: str(v) for k, v in environment.items()}
    return dict(item.split("=", 1) for item in environment or [])


def published_host_ip(port) -> str | None:
    """The host address a compose port entry publishes on; None means every interface."""
    if isinstance(port, dict):
        return port.get("host_ip")
    spec = str(port).split("/", 1)[0]
    if spec.startswith("["):  # [ipv6]:host:container
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else None


def volume_mounts(volumes) -> dict[str, str]:
    """Compose service volumes as {target: source}."""
    mounts = {}
    for v in volumes or []:
        if isinstance(v, dict):
            mounts[v["target"]] = v.get("source")
        else:
            source, target = str(v).split(":")[:2]
            mounts[target] = source
    return mounts


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def ray_containers(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    found = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec["workerGroupSpecs"]:
        found[f"worker:{group['groupName']}"] = group["template"]["spec"]["containers"][0]
    return found


def gpu_worker_groups(raycluster: dict) -> list[dict]:
    return [
        g
        for g in raycluster["spec"].get("workerGroupSpecs", [])
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]


def env_entry(env: list[dict], name: str) -> dict:
    matches = [e for e in env or [] if e["name"] == name]
    assert len(matches) == 1, f"{name}: {matches}"
    return matches[0]


# --- the helpers themselves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "host_ip"),
    [
        ("127.0.0.1:8265:8265", "127.0.0.1"),
        ("127.0.0.1:6379:6379/tcp", "127.0.0.1"),
        ("0.0.0.0:8265:8265", "0.0.0.0"),
        ("8265:8265", None),
        ("8265", None),
        ("[::1]:8265:8265", "::1"),
        ({"target": 8265, "published": 8265}, None),
        ({"target": 8265, "published": 8265, "host_ip": "127.0.0.1"}, "127.0.0.1"),
    ],
)
def test_published_host_ip_reads_short_and_long_port_syntax(port, host_ip):
    assert published_host_ip(port) == host_ip


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "FROM python:3.11-slim\n# a comment\nRUN a \\\n    # inside\n    && b\nUSER 1000\n"
    assert dockerfile_instructions(text) == [
        ("FROM", "python:3.11-slim"),
        ("RUN", "a && b"),
        ("USER", "1000"),
    ]


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_head_and_worker_are_built_from_the_repo_dockerfile(services):
    assert {"head", "worker"} <= set(services)
    for name in ("head", "worker"):
        build = services[name]["build"]
        if isinstance(build, str):
            build = {"context": build}
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name


def test_compose_publishes_ports_on_loopback_only(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            assert published_host_ip(port) == "127.0.0.1", f"{name}: {port!r}"
            published += 1
    assert published > 0


def test_compose_head_publishes_dashboard_and_gcs_ports(services):
    ports = [str(p).split("/", 1)[0] for p in services["head"]["ports"]]
    assert "127.0.0.1:8265:8265" in ports
    assert "127.0.0.1:6379:6379" in ports


def test_compose_worker_has_no_ports_or_container_name_so_it_scales(services):
    worker = services["worker"]
    assert "ports" not in worker
    assert "container_name" not in worker
    assert "hostname" not in worker


def test_compose_worker_reserves_one_nvidia_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(nvidia) == 1, devices
    assert "gpu" in nvidia[0]["capabilities"]
    assert nvidia[0]["count"] == 1
    assert "--num-gpus=1" in argv(services["worker"]["command"])


def test_compose_head_reserves_no_gpu(services):
    head = services["head"]
    assert "devices" not in head.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert "--num-gpus=0" in argv(head["command"])


def test_compose_head_command_starts_a_blocking_ray_head_on_6379(services):
    cmd = argv(services["head"]["command"])
    assert cmd[:3] == ["ray", "start", "--head"]
    assert "--port=6379" in cmd
    assert "--block" in cmd
    # Listens on the container network (workers connect to it); the host publish is loopback.
    assert "--dashboard-host=0.0.0.0" in cmd


def test_compose_worker_command_joins_the_head_gcs_and_blocks(services):
    cmd = argv(services["worker"]["command"])
    assert cmd[:2] == ["ray", "start"]
    assert "--head" not in cmd
    addresses = [a.split("=", 1)[1] for a in cmd if a.startswith("--address=")]
    assert addresses == ["head:6379"]
    assert "--block" in cmd


def test_compose_token_auth_is_on_with_the_token_from_the_host_environment(services):
    for name in ("head", "worker"):
        env = env_dict(services[name]["environment"])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert TOKEN_FROM_HOST.match(env["RAY_AUTH_TOKEN"]), f"{name}: {env['RAY_AUTH_TOKEN']}"
        assert "RAY_AUTH_TOKEN_PATH" not in env, name


def test_compose_worker_waits_for_a_healthy_head(services):
    assert services["head"]["healthcheck"]["test"]
    assert services["worker"]["depends_on"]["head"]["condition"] == "service_healthy"


def test_compose_runs_volume_is_shared_by_head_and_worker(compose, services):
    head = volume_mounts(services["head"]["volumes"])
    worker = volume_mounts(services["worker"]["volumes"])
    assert head.get("/runs") == worker.get("/runs") == "runs"
    assert "runs" in compose["volumes"]


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_is_based_on_python_311(dockerfile):
    froms = [args for keyword, args in dockerfile if keyword == "FROM"]
    assert froms, "no FROM"
    assert re.match(r"python:3\.11([-.][\w.-]+)?(@sha256:\w+)?$", froms[-1].split()[0])


def test_dockerfile_installs_the_torch_version_pyproject_pins(dockerfile):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"torch\s*==", d)]
    assert pins == ["torch==2.13.0"]
    runs = [args for keyword, args in dockerfile if keyword == "RUN"]
    torch_runs = [i for i, r in enumerate(runs) if "pip install" in r and "torch==2.13.0" in r]
    project_runs = [i for i, r in enumerate(runs) if re.search(r"pip install( -\S+)* \.( |$)", r)]
    assert torch_runs, "torch==2.13.0 is never pip-installed"
    assert project_runs, "the project is never pip-installed"
    # torch first, so `pip install .` keeps the chosen (CUDA or CPU) build.
    assert torch_runs[0] < project_runs[0]


def test_dockerfile_copies_and_pip_installs_the_project(dockerfile):
    copied = " ".join(args for keyword, args in dockerfile if keyword == "COPY")
    for needed in ("pyproject.toml", "ensemble"):  # workers moved into ensemble.runtime
        assert needed in copied, needed
    assert any(
        keyword == "RUN" and re.search(r"pip install( -\S+)* \.( |$)", args)
        for keyword, args in dockerfile
    )


def test_dockerfile_runs_as_a_non_root_user(dockerfile):
    users = [args.split(":")[0] for keyword, args in dockerfile if keyword == "USER"]
    assert users, "no USER instruction: the image runs as root"
    assert users[-1] not in {"root", "0"}


def test_dockerfile_bakes_in_no_ray_token(dockerfile):
    for keyword, args in dockerfile:
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"TOKEN|SECRET|PASSWORD", args, re.IGNORECASE), args


# --- deploy/kuberay/raycluster.yaml ---------------------------------------------------------


def test_kuberay_manifest_holds_a_ray_io_v1_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]


def test_kuberay_gpu_worker_group_requests_nvidia_gpus_and_sets_replicas(raycluster):
    groups = gpu_worker_groups(raycluster)
    assert groups, "no worker group with an nvidia.com/gpu limit"
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_head_has_no_gpus(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    resources = head["template"]["spec"]["containers"][0].get("resources", {})
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in resources.get(part, {})
    assert head["rayStartParams"].get("num-gpus") == "0"


def test_kuberay_token_auth_comes_from_a_secret_in_every_ray_container(raycluster):
    envs = {name: c.get("env") for name, c in ray_containers(raycluster).items()}
    if raycluster["spec"].get("enableInTreeAutoscaling"):
        envs["autoscaler"] = raycluster["spec"]["autoscalerOptions"]["env"]
    for name, env in envs.items():
        assert env_entry(env, "RAY_AUTH_MODE")["value"] == "token", name
        token = env_entry(env, "RAY_AUTH_TOKEN")
        assert "value" not in token, f"{name}: literal token"
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], name


def test_kuberay_manifest_has_no_secret_with_a_literal_token(kube_docs):
    assert not [d for d in kube_docs if d.get("kind") == "Secret"]


def test_kuberay_dashboard_is_not_exposed_outside_the_cluster(kube_docs, raycluster):
    for doc in kube_docs:
        if doc.get("kind") == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]
    head = raycluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    if "headService" in head:
        assert head["headService"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not [d for d in kube_docs if d.get("kind") == "Ingress"]


def test_kuberay_runs_pvc_is_mounted_at_runs_in_head_and_workers(kube_docs, raycluster):
    pvcs = [d for d in kube_docs if d.get("kind") == "PersistentVolumeClaim"]
    assert len(pvcs) == 1
    claim = pvcs[0]["metadata"]["name"]
    assert "ReadWriteMany" in pvcs[0]["spec"]["accessModes"]
    spec = raycluster["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/runs"]] == claim


def test_kuberay_head_and_workers_use_one_image_that_runs_as_non_root(raycluster):
    containers = ray_containers(raycluster)
    assert len({c["image"] for c in containers.values()}) == 1
    spec = raycluster["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0


# --- deploy/kuberay/rayjob.yaml -------------------------------------------------------------

RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"


@pytest.fixture(scope="module")
def job_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


@pytest.fixture(scope="module")
def rayjob(job_docs) -> dict:
    (job,) = [d for d in job_docs if d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    return job


def job_pods(rayjob: dict) -> dict[str, dict]:
    """Every pod spec the RayJob makes: the submitter, the head, each worker group."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    pods = {"submitter": spec["submitterPodTemplate"]["spec"]}
    pods["head"] = cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster["workerGroupSpecs"]:
        pods[f"worker:{g['groupName']}"] = g["template"]["spec"]
    return pods


def test_rayjob_fits_the_restricted_pod_security_standard(rayjob):
    for name, pod in job_pods(rayjob).items():
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
        assert ctx["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost"), name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        for v in pod.get("volumes", []):  # restricted allows these volume types only
            kinds = set(v) - {"name"}
            assert kinds <= {"persistentVolumeClaim", "configMap", "emptyDir", "secret"}, v
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"])


def test_rayjob_token_comes_from_the_secret_in_every_container(rayjob, job_docs):
    assert not [d for d in job_docs if d.get("kind") == "Secret"]
    for name, pod in job_pods(rayjob).items():
        for c in pod["containers"]:
            assert env_entry(c["env"], "RAY_AUTH_MODE")["value"] == "token", name
            ref = env_entry(c["env"], "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "tether-ensemble-ray-token" and ref["key"], name


def test_rayjob_runs_the_config_it_mounts_and_that_config_is_valid(rayjob, job_docs, tmp_path):
    from ensemble.runtime.job import load

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["ensemble", "run"] and argv[argv.index("--address") + 1] == "auto"
    (config_map,) = [d for d in job_docs if d.get("kind") == "ConfigMap"]
    head = job_pods(rayjob)["head"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    config_dir = argv[2].rsplit("/", 1)[0]
    assert volumes[mounts[config_dir]]["configMap"]["name"] == config_map["metadata"]["name"]
    name = argv[2].rsplit("/", 1)[1]
    (tmp_path / name).write_text(config_map["data"][name])
    cfg = load(tmp_path / name)  # the same check `ensemble run` makes first
    assert argv[argv.index("--run-dir") + 1] == f"/runs/{cfg.job}"


def test_rayjob_history_is_on_a_disk_of_the_heads_own(rayjob, job_docs):
    """SQLite's WAL needs one host: the head's /runs is ReadWriteOnce, never shared."""
    head = job_pods(rayjob)["head"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    claim = {v["name"]: v for v in head["volumes"]}[mounts["/runs"]]["persistentVolumeClaim"]
    (pvc,) = [d for d in job_docs if d.get("kind") == "PersistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for name, pod in job_pods(rayjob).items():
        if name.startswith("worker"):  # checkpoints: the node's own scratch disk
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/runs"]]
