"""Render the multi-node pretraining templates (SLURM batch script, Kubernetes Indexed Job).

The templates in ``infra/slurm/`` and ``infra/k8s/`` hold ``@{name}`` placeholders (``@`` because
``$`` and ``{{ }}`` belong to the shell and to Helm). This fills them from a few launch parameters,
checks them, and writes the result::

    python infra/render.py slurm --nodes 4 --gpus-per-node 8 --image lmpipe.sif -o pretrain.sbatch
    python infra/render.py k8s --nodes 2 --gpus-per-node 8 --image registry.example/lmpipe:train \
        --preset shared-text -o pretrain-job.yaml

Both run ``lmpipe pretrain -S pretrain.num_nodes=N -S pretrain.devices=G``: Lightning's own
multi-node settings, which must match the launcher's node count and processes per node.
Standalone on purpose (standard library only), so it runs wherever the cluster's CLI runs.
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

INFRA = Path(__file__).resolve().parent
TEMPLATES = {"slurm": INFRA / "slurm" / "pretrain.sbatch", "k8s": INFRA / "k8s" / "pretrain-job.yaml"}
# Kubernetes object names (RFC 1123 labels; the Job name also prefixes pod host names)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
_PRESET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


class _Template(string.Template):
    delimiter = "@"


@dataclass(frozen=True)
class LaunchParams:
    """What a multi-node pretraining launch needs; :meth:`check` says what is wrong, by name."""

    nodes: int = 2
    gpus_per_node: int = 8
    image: str = "lmpipe:train"
    preset: str | None = None
    job_name: str = "lmpipe-pretrain"
    cpus_per_task: int = 8
    time_limit: str = "24:00:00"
    partition: str | None = None
    workdir: str = "/workspace"
    pvc: str = "lmpipe-workspace"
    mlflow_uri: str = "http://mlflow:5000"

    @property
    def params_file(self) -> str:
        return f"configs/{self.preset}.yaml" if self.preset else "params.yaml"

    def check(self) -> None:
        """Raise ValueError naming the first parameter that cannot work."""
        if self.nodes < 1:
            raise ValueError(f"nodes: must be at least 1 (got {self.nodes})")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node: must be at least 1 (got {self.gpus_per_node})")
        if self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task: must be at least 1 (got {self.cpus_per_task})")
        if not _DNS_LABEL.match(self.job_name):
            raise ValueError(f"job_name: {self.job_name!r} must be lower-case letters, digits and '-' (max 42)")
        if not _DNS_LABEL.match(self.pvc):
            raise ValueError(f"pvc: {self.pvc!r} is not a valid Kubernetes name")
        if self.preset is not None and not _PRESET.match(self.preset):
            raise ValueError(f"preset: {self.preset!r} must name a file configs/<preset>.yaml")
        if not _SLURM_TIME.match(self.time_limit):
            raise ValueError(f"time_limit: {self.time_limit!r} is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)")
        if not self.workdir.startswith("/") or any(c in self.workdir for c in "\"'$`\\ \n"):
            raise ValueError(f"workdir: {self.workdir!r} must be an absolute path without quotes or spaces")
        if not self.image or any(c.isspace() or c in "\"'$`\\" for c in self.image):
            raise ValueError(f"image: {self.image!r} must be a non-empty image reference or 'none'")


def _fill(kind: str, values: dict[str, object]) -> str:
    return _Template(TEMPLATES[kind].read_text()).substitute({k: str(v) for k, v in values.items()})


def render_slurm(params: LaunchParams) -> str:
    """The SLURM batch script for ``params``; raises ValueError for impossible parameters.

    ``image`` is an Apptainer image (``.sif`` path or a Docker reference, run with ``--nv``), or
    ``none`` to use the project's virtual environment on the shared filesystem.
    """
    params.check()
    if params.image == "none":
        launcher, comment = "", "lmpipe from the project's virtual environment on the shared filesystem"
        setup = f'source "{params.workdir}/.venv/bin/activate"'
    else:
        ref = params.image if params.image.endswith(".sif") else f"docker://{params.image}"
        launcher = f"apptainer exec --nv --bind {params.workdir} --pwd {params.workdir} {ref}"
        comment = f"lmpipe inside the training image {ref} (Apptainer, GPUs passed through with --nv)"
        setup = ""
    return _fill("slurm", {
        "job_name": params.job_name, "nodes": params.nodes, "gpus_per_node": params.gpus_per_node,
        "cpus_per_task": params.cpus_per_task, "time_limit": params.time_limit, "workdir": params.workdir,
        "partition_line": f"#SBATCH --partition={params.partition}" if params.partition else "",
        "mlflow_line": f'export MLFLOW_TRACKING_URI="{params.mlflow_uri}"' if params.mlflow_uri else "",
        "launcher": launcher, "launcher_comment": comment, "setup_line": setup,
        "params_file": params.params_file,
    })


def render_k8s(params: LaunchParams) -> str:
    """The Service + Indexed Job manifests for ``params``; raises ValueError for impossible parameters."""
    params.check()
    if params.image == "none":
        raise ValueError("image: Kubernetes needs a container image (e.g. lmpipe:train pushed to your registry)")
    return _fill("k8s", {
        "job_name": params.job_name, "nodes": params.nodes, "gpus_per_node": params.gpus_per_node,
        "cpus_per_node": params.cpus_per_task * params.gpus_per_node, "image": params.image,
        "pvc": params.pvc, "mlflow_uri": params.mlflow_uri, "params_file": params.params_file,
    })


RENDERERS = {"slurm": render_slurm, "k8s": render_k8s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a multi-node pretraining launch (SLURM or Kubernetes).")
    parser.add_argument("kind", choices=sorted(RENDERERS))
    defaults = LaunchParams()
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help="Machines (pretrain.num_nodes).")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node,
                        help="GPUs and processes per machine (pretrain.devices).")
    parser.add_argument("--image", default=defaults.image,
                        help="Training image (infra/Dockerfile); for SLURM a .sif path, or 'none' for the venv.")
    parser.add_argument("--preset", help="Use configs/PRESET.yaml instead of params.yaml.")
    parser.add_argument("--job-name", default=defaults.job_name)
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task, help="CPU cores per GPU process.")
    parser.add_argument("--time-limit", default=defaults.time_limit, help="SLURM wall-clock limit.")
    parser.add_argument("--partition", help="SLURM partition.")
    parser.add_argument("--workdir", default=defaults.workdir, help="Project checkout on the shared filesystem (SLURM).")
    parser.add_argument("--pvc", default=defaults.pvc, help="PersistentVolumeClaim holding the checkout (Kubernetes).")
    parser.add_argument("--mlflow-uri", default=defaults.mlflow_uri, help="MLflow tracking server the ranks log to.")
    parser.add_argument("-o", "--output", help="Write here (default: standard output).")
    args = parser.parse_args(argv)
    params = LaunchParams(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image, preset=args.preset,
        job_name=args.job_name, cpus_per_task=args.cpus_per_task, time_limit=args.time_limit,
        partition=args.partition, workdir=args.workdir, pvc=args.pvc, mlflow_uri=args.mlflow_uri,
    )
    try:
        text = RENDERERS[args.kind](params)
    except ValueError as err:
        print(f"render.py {args.kind}: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
