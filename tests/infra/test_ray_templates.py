"""infra/: the Ray services of the compose stack and the KubeRay RayJob are wired to the engine section."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from lmpipe.config import load_params

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _flag(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}="))


def test_compose_ray_head_and_workers_share_the_project_and_the_port() -> None:
    services: dict[str, Any] = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    port = _flag(head["command"], "port")
    assert _flag(worker["command"], "address") == f"ray-head:{port}"
    assert "ray-head" in worker["depends_on"]
    # tasks read data/raw and write data/clean by path: every node mounts the same checkout
    for service in (head, worker, services["worker"]):
        assert "..:/workspace" in service["volumes"]
    assert head["image"] == worker["image"] == services["worker"]["image"]  # same Ray and Python as the driver
    # one token authenticates the Ray nodes and the driver to each other
    auth = {(s["environment"]["RAY_AUTH_MODE"], s["environment"]["RAY_AUTH_TOKEN"]) for s in (head, worker, services["worker"])}
    assert len(auth) == 1 and next(iter(auth))[0] == "token"


def test_rayjob_runs_clean_on_its_own_cluster() -> None:
    job = yaml.safe_load((INFRA / "k8s" / "clean-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["lmpipe", "clean"]
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-S"]
    engine = load_params(REPO / "params.yaml", overrides, sections=["engine"]).engine
    assert (engine.kind, engine.address) == ("ray", "auto")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    claims = set()
    for pod in pods:
        (container,) = pod["containers"]
        assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
        assert container["workingDir"] == "/workspace"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "lmpipe-ray-auth", "key": "token"}
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] == "workspace"}
    assert len(claims) == 1
