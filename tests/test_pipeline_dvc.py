"""End to end through DVC, collect to register, with the commands a user runs.

One project (the shipped dvc.yaml and params.yaml with tiny training settings, the embedded
default plus a local ``files`` source) goes through, in order: a full ``dvc repro``; a no-change
``dvc repro`` that runs nothing but the ``inputs`` fingerprints; a commit (metrics and plots are in
git); a ``dvc exp run -S`` experiment with a changed param, after which ``dvc metrics diff`` and
``dvc plots diff`` show the change against the commit and ``dvc exp show --json`` lists it with
its metrics and params; an edit of the source file, which reruns collect and every data stage after it and
leaves training stale in ``dvc status`` (the data-refresh deployment test runs a whole chain); a
new file matching the source's glob; and a failed validation that ``split`` refuses however it is
started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ALL_STAGES = ("inputs", "collect", "clean", "validate", "split", "tokenizer", "tokenize", "pretrain",
              "finetune@sft", "finetune@cls", "finetune@ner", "distill@student", "distill@baseline", "evaluate",
              "register")

PARAGRAPHS = [
    "The harbour town woke slowly in the grey morning. Fishermen carried their nets down to the water while the "
    "baker opened his shutters and the smell of fresh bread drifted along the narrow street. Children ran past the "
    "church on their way to school, and an old dog watched them from the steps of the post office, too tired to "
    "follow. By nine o'clock the first boats had left the harbour and the gulls had gone with them.",
    "Our team spent the autumn rebuilding the old water mill at the edge of the village. The wheel had not turned "
    "for thirty years, and most of the wooden paddles had rotted away. We cut new ones from oak, replaced the iron "
    "axle and cleared the channel that feeds the mill from the river. When the sluice gate was finally opened, the "
    "wheel creaked, hesitated and then began to turn, and everyone who had helped stood on the bank and cheered.",
    "A good loaf of bread needs only flour, water, salt and time. Mix the flour and water and let the dough rest "
    "for half an hour before you add the salt, then fold it every thirty minutes for the next few hours. Shape it "
    "gently, leave it to rise in a cool place overnight, and bake it in a very hot oven the next morning. The crust "
    "should be dark and crisp, and the inside should be soft, open and full of flavour.",
]
APPENDED = (
    "In the spring the library moved into the old railway station. The waiting room became a reading room, the "
    "ticket office became the front desk, and the platform was turned into a garden where people could sit with a "
    "book on warm afternoons. Trains no longer stop there, but on most days the building is busier than it ever "
    "was when it was still a station, and the librarians say that nobody misses the noise of the engines."
)
NEW_FILE = (
    "The museum's new exhibition tells the story of the canal that once carried coal from the hills to the coast. "
    "Visitors can walk through a reconstructed lock keeper's cottage, read the letters that the workers sent home "
    "to their families, and watch a short film about the families who lived on the narrow boats for most of the "
    "year. The curators spent two years collecting photographs and tools from people whose parents worked there."
)

TINY = {
    "collect": {"sources": [
        {"type": "synthetic", "name": "synthetic", "num_docs": 600, "noise_fraction": 0.15, "entity_fraction": 0.1,
         "weight": 100.0},
        {"type": "files", "name": "local", "paths": ["corpus/*.txt"], "weight": 1.0}]},
    "validate": {"min_docs": 50},
    "split": {"val_fraction": 0.15, "test_fraction": 0.15},
    "tokenizer": {"vocab_size": 512},
    "pretrain": {"preset": "tiny", "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 128},
                 "max_steps": 12, "micro_batch_size": 8, "warmup_steps": 2, "eval_every": 6, "eval_batches": 2,
                 "checkpoint_every": 6, "sample_tokens": 4, "progress": False},
    "distill": {"student": {"model": {"n_layer": 1, "n_embd": 16, "n_head": 2}, "init": "auto"},
                "max_steps": 6, "micro_batch_size": 8, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2,
                "checkpoint_every": 0, "progress": False},
    # the baselines and lm-eval have tests of their own (tests/evaluate): off here, where evaluate runs thrice
    "evaluate": {"max_tokens": 4000, "sample_tokens": 4, "baselines": {"enabled": False}, "lm_eval": {"enabled": False},
                 "speed": {"batch_sizes": [1], "new_tokens": 4, "repeats": 1, "warmup": 0, "threads": 1}},
}
TASK = {"max_steps": 4, "micro_batch_size": 8, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 0,
        "progress": False}


def run(project: Path, *args: str, ok: bool = True) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1"}
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    proc = subprocess.run([exe, *args[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def ran(output: str) -> set[str]:
    return {stage for stage in ALL_STAGES if f"Running stage '{stage}'" in output}


def set_params(project: Path, **changes: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in changes.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    for task in params["finetune"]["tasks"].values():
        task.update(TASK)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    run(root, "dvc", "config", "core.analytics", "false")
    return root


def commit(project: Path, message: str) -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", message)


def test_full_repro_then_a_no_change_repro_runs_nothing(project: Path) -> None:
    assert ran(run(project, "dvc", "repro")) == set(ALL_STAGES)
    assert (project / "metrics" / "register.json").is_file() and (project / "reports" / "report.html").is_file()
    again = run(project, "dvc", "repro")
    assert ran(again) == {"inputs"}, again
    status = run(project, "dvc", "status")
    assert "collect" not in status and "changed deps" not in status, status
    commit(project, "first run")
    tracked = run(project, "git", "ls-files", "metrics", "plots", "dvc.lock").split()
    assert {"metrics/evaluate.json", "metrics/pretrain.json", "plots/pretrain_loss.csv", "dvc.lock"} <= set(tracked)


def test_an_experiment_with_a_changed_param_shows_in_metrics_diff_plots_diff_and_exp_show(project: Path) -> None:
    out = run(project, "dvc", "exp", "run", "-S", "evaluate.max_tokens=1500")
    assert ran(out) == {"inputs", "evaluate", "register"}, out
    # the experiment's results are in the workspace: compare them with the committed run
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json"))
    changed = diff["metrics/evaluate.json"]
    assert any(entry["diff"] not in (0, None) for entry in changed.values()), changed
    plot = json.loads(run(project, "dvc", "plots", "diff", "--json"))["data"]["val_bits_per_byte"][0]
    assert {"workspace", "HEAD"} <= set(plot["revisions"])
    teacher = {row["rev"]: row["val"] for row in plot["content"]["data"]["values"] if row["model"] == "teacher"}
    assert teacher["workspace"] != teacher["HEAD"], teacher

    shown = json.loads(run(project, "dvc", "exp", "show", "--json"))
    [experiment] = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    data = experiment["revs"][0]["data"]
    assert data["metrics"]["metrics/evaluate.json"]["data"], data
    assert data["params"]["params.yaml"]["data"]["evaluate"]["max_tokens"] == 1500
    run(project, "git", "checkout", "--", ".")
    run(project, "dvc", "checkout", "-q")


def test_editing_the_source_file_reruns_collect_and_everything_downstream(project: Path) -> None:
    with open(project / "corpus" / "a.txt", "a") as handle:
        handle.write("\n" + APPENDED + "\n")
    assert "always changed" in run(project, "dvc", "status")
    # the data half reruns (tokenize is the last data stage); training is then stale, and says so
    assert ran(run(project, "dvc", "repro", "tokenize")) == {"inputs", "collect", "clean", "validate", "split",
                                                               "tokenizer", "tokenize"}
    status = run(project, "dvc", "status")
    for stage in ("pretrain", "finetune@sft", "distill@student", "evaluate"):
        assert f"{stage}:" in status, status


def test_a_new_file_matching_the_glob_reruns_collect(project: Path) -> None:
    (project / "corpus" / "b.txt").write_text(NEW_FILE + "\n")
    assert ran(run(project, "dvc", "repro", "collect")) == {"inputs", "collect"}
    assert "clean" in run(project, "dvc", "status")  # its input data/raw changed


def test_split_refuses_after_a_failed_validation_however_it_is_run(project: Path) -> None:
    set_params(project, **{"validate.min_docs": 1_000_000})
    out = run(project, "dvc", "repro", "split", ok=False)
    assert "Running stage 'validate'" in out and "Running stage 'split'" not in out
    assert json.loads((project / "metrics" / "validate.json").read_text())["success"] is False
    by_hand = run(project, "lmpipe", "split", ok=False)
    assert "lmpipe split: error:" in by_hand and "validation failed" in by_hand
    single = run(project, "dvc", "repro", "--single-item", "split", ok=False)
    assert "validation failed" in single
