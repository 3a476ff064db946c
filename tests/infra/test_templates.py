"""infra/: the compose stack is wired as documented; the multi-node templates render to valid launches."""

from __future__ import annotations

import importlib.util
import os
import re
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


def _filled_env_file(tmp_path: Path) -> Path:
    """infra/.env.example with every empty value filled in, as an operator would."""
    lines = []
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and line.endswith("="):
            line += "admin:s3cret" if line.startswith("PREFECT_AUTH_STRING") else "s3cret-value"
        lines.append(line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(not _compose_available(), reason="the docker compose plugin is not installed here")
def test_docker_compose_accepts_the_file_only_with_its_secrets(tmp_path: Path) -> None:
    compose_file = str(INFRA / "docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "MLFLOW_", "PREFECT_"))}
    config = ["docker", "compose", "-f", compose_file, "--env-file"]
    proc = subprocess.run([*config, str(INFRA / ".env.example"), "config", "--quiet"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0 and "set it in infra/.env" in proc.stderr  # the example as is: refused
    proc = subprocess.run([*config, str(_filled_env_file(tmp_path)), "config", "--quiet"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr


SECRET = re.compile(r"\$\{(?P<name>[A-Z0-9_]*(PASSWORD|SECRET|AUTH|USER)[A-Z0-9_]*)(?P<rule>[:?-]*)")


def test_compose_has_no_default_secrets_and_both_servers_authenticate(compose: dict[str, Any]) -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    uses = [(m["name"], m["rule"]) for m in SECRET.finditer(text)]
    assert len(uses) >= 10
    assert [name for name, rule in uses if rule != ":?"] == []  # every secret is required, none defaulted
    example = {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert {name for name, _ in uses} <= example  # the example names every secret compose asks for
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(INFRA / ".env")], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env must be ignored by git"

    services = compose["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][mlflow["command"].index("--app-name") + 1] == "basic-auth"
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == mlflow["configs"][0]["target"]
    auth_ini = compose["configs"][mlflow["configs"][0]["source"]]["content"]
    assert "database_uri = postgresql://" in auth_ini and "/mlflow_auth" in auth_ini
    assert "CREATE DATABASE mlflow_auth" in compose["configs"]["databases"]["content"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    for name in ("worker", "worker-gpu"):
        environment = services[name]["environment"]
        assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(environment)
    assert "ADMIN" not in services["worker"]["environment"]["MLFLOW_TRACKING_USERNAME"]  # its own account

    # our images end as the unprivileged user, in both targets
    stages = re.split(r"^FROM ", (INFRA / "Dockerfile").read_text(), flags=re.M)[1:]
    assert len(stages) == 2
    for stage in stages:
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users and users[-1] == "lmpipe", stage.splitlines()[0]


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
        assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile", "target": "train",
                                   "args": {"LMPIPE_UID": "${LMPIPE_UID:-1000}"}}
        assert "..:/workspace" in worker["volumes"] and worker["environment"]["LMPIPE_ROOT"] == "/workspace"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    buckets = services["buckets"]["environment"]["BUCKETS"].split()
    assert "mlflow" in buckets and "dvc" in buckets
    init = compose["configs"]["databases"]["content"]
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
    config = pytest.importorskip("lmpipe.train.pretrain.config")
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
