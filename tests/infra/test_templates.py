"""infra/: the compose stack is wired as documented; the multi-node templates render to valid launches."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lmpipe_infra_render", INFRA / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


render = _load_render()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_available(), reason="the docker compose plugin is not installed here")
def test_docker_compose_accepts_the_file() -> None:
    proc = subprocess.run(["docker", "compose", "-f", str(INFRA / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compose_has_the_stack_and_its_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow", "prefect-server", "worker"} <= set(services)

    mlflow = services["mlflow"]
    command = mlflow["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--serve-artifacts" in command
    assert "mlflow:5000" in command[command.index("--allowed-hosts") + 1]  # the worker's Host header
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["buckets"]["condition"] == "service_completed_successfully"

    prefect = services["prefect-server"]
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "/api/health" in " ".join(prefect["healthcheck"]["test"])

    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "lmpipe"]
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile", "target": "train"}
        assert "..:/workspace" in worker["volumes"] and worker["environment"]["LMPIPE_ROOT"] == "/workspace"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    buckets = services["buckets"]["environment"]["BUCKETS"].split()
    assert "mlflow" in buckets and "dvc" in buckets
    init = compose["configs"]["prefect-database"]["content"]
    assert "CREATE DATABASE prefect" in init
    # every service built from our Dockerfile names a target the Dockerfile defines
    dockerfile = (INFRA / "Dockerfile").read_text()
    for service in services.values():
        if "build" in service:
            assert f"AS {service['build']['target']}" in dockerfile
    # published ports stay on the loopback interface unless someone decides otherwise
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_prefect_yaml_targets_the_pool_the_worker_polls(compose: dict[str, Any]) -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"nightly", "data-refresh", "manual"}
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["name"] == "lmpipe"
        assert deployment["entrypoint"] == "pipelines/flow.py:pipeline"
    directory = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $LMPIPE_ROOT }}"
    assert compose["services"]["worker"]["environment"]["LMPIPE_ROOT"] == "/workspace"


def test_slurm_script_renders_nodes_gpus_and_lightning_settings(tmp_path: Path) -> None:
    params = render.LaunchParams(nodes=4, gpus_per_node=8, image="/shared/lmpipe.sif", preset="shared-text",
                                 partition="gpu", time_limit="2-00:00:00")
    script = render.render_slurm(params)
    lines = script.splitlines()
    for directive in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                      "--time=2-00:00:00", "--signal=SIGUSR1@120"):
        assert f"#SBATCH {directive}" in lines
    assert "@{" not in script
    assert "apptainer exec --nv" in script and "/shared/lmpipe.sif" in script
    launch = script[script.index("srun "):]
    assert "lmpipe pretrain -p configs/shared-text.yaml" in launch
    assert "-S pretrain.num_nodes=4 -S pretrain.devices=8" in launch
    # SLURM reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    path = tmp_path / "pretrain.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0

    venv = render.render_slurm(render.LaunchParams(nodes=1, gpus_per_node=2, image="none"))
    assert "apptainer" not in venv and 'source "/workspace/.venv/bin/activate"' in venv
    assert "lmpipe pretrain -p params.yaml" in venv


def test_k8s_job_renders_to_an_indexed_torchrun_job() -> None:
    text = render.render_k8s(render.LaunchParams(nodes=3, gpus_per_node=4, image="registry.example/lmpipe:1",
                                                 job_name="pt-run"))
    assert "@{" not in text
    service, job = list(yaml.safe_load_all(text))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "pt-run"
    assert service["spec"]["selector"] == {"job-name": "pt-run"}  # the label the Job controller puts on pods
    container = pod["containers"][0]
    assert container["image"] == "registry.example/lmpipe:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    args = container["args"]
    assert container["command"] == ["torchrun"]
    assert {"--nnodes=3", "--nproc-per-node=4", "--node-rank=$(JOB_COMPLETION_INDEX)",
            "--master-addr=pt-run-0.pt-run", "--no-python"} <= set(args)
    tail = args[args.index("--no-python") + 1:]
    assert tail == ["lmpipe", "pretrain", "-p", "params.yaml", "-S", "pretrain.num_nodes=3",
                    "-S", "pretrain.devices=4"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"workspace": "/workspace", "shm": "/dev/shm"}


def test_templates_use_the_pretrain_config_keys() -> None:
    config = pytest.importorskip("lmpipe.train.config")
    fields = config.PretrainConfig.model_fields
    assert "num_nodes" in fields and "devices" in fields


@pytest.mark.parametrize(("change", "message"), [
    ({"nodes": 0}, "nodes: must be at least 1"),
    ({"gpus_per_node": 0}, "gpus_per_node: must be at least 1"),
    ({"job_name": "Pretrain_Run"}, "job_name"),
    ({"preset": "../etc/passwd"}, "preset"),
    ({"time_limit": "tomorrow"}, "time_limit"),
    ({"workdir": "relative/dir"}, "workdir"),
])
def test_impossible_parameters_are_named(change: dict[str, Any], message: str) -> None:
    params = render.LaunchParams(**change)
    with pytest.raises(ValueError, match=message):
        render.render_slurm(params)


def test_cli_writes_the_rendering_and_reports_errors_in_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.yaml"
    assert render.main(["k8s", "--nodes", "2", "--gpus-per-node", "8", "-o", str(out)]) == 0
    assert len(list(yaml.safe_load_all(out.read_text()))) == 2
    assert render.main(["k8s", "--image", "none"]) == 2
    assert capsys.readouterr().err.strip() == (
        "render.py k8s: error: image: Kubernetes needs a container image (e.g. lmpipe:train pushed to your registry)")
