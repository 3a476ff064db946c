"""How long a no-change ``dvc repro`` takes, against ``dvc status`` in the same project.

    python benchmarks/repro_nochange.py --project DIR [--repeat 5]
    python benchmarks/repro_nochange.py --build [--repeat 5]

``--project``: a project where ``dvc repro`` has already run to the end (e.g. the checkout after
``make run``). ``--build``: make one under benchmarks/.scratch/ first: the shipped dvc.yaml and
params.yaml (the embedded default, full size) with training shortened to a few steps, since the
number of steps changes neither the number of stages nor the size of what DVC hashes.

Times ``dvc repro`` with nothing changed (DVC checks every stage's deps, runs the always-changed
``inputs`` stage, whose fingerprints come out byte-identical, and so runs nothing else) and, as
the reference, ``dvc status`` (the same hash checks, no stage run). Prints the median of
``--repeat`` runs of each and their ratio. Target: repro <= 10 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = {
    "pretrain": {"max_steps": 20, "eval_every": 10, "checkpoint_every": 10},
    "distill": {"max_steps": 10, "eval_every": 5, "checkpoint_every": 0},
    "evaluate": {"speed": {"batch_sizes": [1], "new_tokens": 8, "repeats": 1, "warmup": 0, "threads": 1}},
}


def sh(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *args[1:]], cwd=project,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def build(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SHORT.items():
        params[section].update(values)
    for task in params["finetune"]["tasks"].values():
        task.update({"max_steps": 10, "eval_every": 5})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    started = time.perf_counter()
    sh(root, "dvc", "repro")
    print(f"built {root} in {time.perf_counter() - started:.0f} s")
    return root


def timed(project: Path, *args: str) -> float:
    started = time.perf_counter()
    out = sh(project, *args)
    elapsed = time.perf_counter() - started
    ran = [line for line in out.splitlines() if line.startswith("Running stage") and "'inputs'" not in line]
    if ran:
        raise SystemExit(f"not a no-change run: {ran}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="A project where dvc repro has run to the end.")
    parser.add_argument("--build", action="store_true", help="Build one under benchmarks/.scratch/ first.")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.build:
        project = build(REPO / "benchmarks" / ".scratch" / "repro")
    elif args.project:
        project = args.project.resolve()
    else:
        parser.error("give --project DIR or --build")
    timed(project, "dvc", "repro")  # warm the OS cache and DVC's state database
    repro = [timed(project, "dvc", "repro") for _ in range(args.repeat)]
    status = [timed(project, "dvc", "status") for _ in range(args.repeat)]
    r, s = statistics.median(repro), statistics.median(status)
    print(f"no-change dvc repro: median {r:.2f} s (min {min(repro):.2f}, max {max(repro):.2f}) over {args.repeat}")
    print(f"dvc status (reference): median {s:.2f} s (min {min(status):.2f}, max {max(status):.2f})")
    print(f"ratio repro / status: {r / s:.2f}; target repro <= 10 s: {'met' if r <= 10 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
