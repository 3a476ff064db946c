"""``lmpipe <stage>``: the one entry point DVC stages, Prefect tasks and people all call.

The CLI is thin: load and validate params.yaml (plus ``-S key=value`` overrides), open the stage's
MLflow run, call the stage's ``run(cfg, paths)``, log its summary. ``--help`` of each stage lists
every key of its config section, generated from the pydantic models (no second list of options).

Exit codes: 0 success, 2 user error (bad config, bad data; one line, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmpipe import __version__
from lmpipe.errors import LmpipeError
from lmpipe.stages import STAGES, StageSpec

log = logging.getLogger("lmpipe")


# Other commands: name -> (module with ``command(args) -> int``, help). Imported only when run, so
# a stage's process never loads registry or export code it does not use.
COMMANDS: dict[str, tuple[str, str]] = {
    "promote": ("lmpipe.registry.commands", "Promote a registered model version to champion (gate applies unless --force)."),
    "rollback": ("lmpipe.registry.commands", "Move champion back to the previous champion."),
    "export-hf": ("lmpipe.registry.commands", "Export a model as a Hugging Face transformers directory (verified)."),
    "lm-eval": ("lmpipe.evaluate.harness", "Run lm-evaluation-harness on a model's HF export (evaluate.lm_eval keys)."),
    "lineage": ("lmpipe.lineage", "Check (or --write) the code deps of every stage in dvc.yaml against its imports."),
}


def _stage_help(stage: StageSpec) -> str:
    from lmpipe.config import describe_model, section_model

    if stage.section is None:
        return "Reads the params sections of the stages it serves; no keys of its own."
    model = section_model(stage.section)
    rows = describe_model(model, stage.section)
    width = max(len(r[0]) for r in rows) if rows else 0
    lines = [f"params.yaml keys (section '{stage.section}'), override with -S KEY=VALUE:", ""]
    for key, type_name, default, desc in rows:
        head = f"  {key.ljust(width)}  {type_name}" + (f" = {default}" if default else "")
        lines.append(head)
        if desc:
            lines.extend(textwrap.wrap(desc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    doc = (model.__doc__ or "").strip().splitlines()
    if doc:
        lines.insert(0, doc[0] + "\n")
    return "\n".join(lines)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--params", default="params.yaml", help="Params file (default: params.yaml).")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override a params key, e.g. -S clean.near_dedup.threshold=0.7 (repeatable).",
    )
    parser.add_argument("--root", default=".", help="Project root holding data/, models/ ... (default: .).")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")


class _LazyHelpParser(argparse.ArgumentParser):
    """Builds the (import-heavy) per-key epilog only when --help is asked for."""

    epilog_factory: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_factory is not None and not self.epilog:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmpipe",
        description="From raw text to a small language model: each stage reads params.yaml and writes its outputs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages run in this order: " + " -> ".join(STAGES) + ". `lmpipe STAGE --help` lists its keys.",
    )
    parser.add_argument("--version", action="version", version=f"lmpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LazyHelpParser)
    sp = sub.add_parser("run", add_help=False,
                        help="Run the pipeline as the Prefect flow (pipelines/flow.py; see `lmpipe run --help`).")
    sp.add_argument("flow_args", nargs=argparse.REMAINDER)
    for stage in STAGES.values():
        sp = sub.add_parser(stage.name, help=stage.help, description=stage.help,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.epilog_factory = (lambda s=stage: _stage_help(s))  # type: ignore[attr-defined]
        _common(sp)
        if stage.name == "finetune":
            sp.add_argument("--task", help="Run only this task of finetune.tasks (what `dvc repro finetune@TASK` does).")
    sp = sub.add_parser("promote", help=COMMANDS["promote"][1],
                        description="Without NAME: run the gate for every model's candidate. With NAME --version N: "
                        "promote that version if it passes the gate against the current champion (or always, with --force).")
    _common(sp)
    sp.add_argument("name", nargs="?", help="Registered model name, e.g. lmpipe-pretrain.")
    sp.add_argument("--version", type=int, help="Version to promote.")
    sp.add_argument("--force", action="store_true", help="Move champion even if the gate fails (recorded as forced).")
    sp = sub.add_parser("rollback", help=COMMANDS["rollback"][1], description=COMMANDS["rollback"][1])
    _common(sp)
    sp.add_argument("name", help="Registered model name.")
    sp.add_argument("--force", action="store_true", help="Roll back even if the previous version fails checks.")
    sp = sub.add_parser("export-hf", help=COMMANDS["export-hf"][1],
                        description="Export a model as a Hugging Face transformers directory; the export is loaded "
                        "back with transformers and its logits compared before it is kept.")
    _common(sp)
    sp.add_argument("--model", default="models/pretrain", help="Model directory (default: models/pretrain).")
    sp.add_argument("--out", help="Output directory (default: artifacts/hf/<model dir name>).")
    sp = sub.add_parser("lm-eval", help=COMMANDS["lm-eval"][1], description="Export evaluate.lm_eval.model to a "
                        "transformers directory and run lm-evaluation-harness offline on tasks written from the "
                        "project's data; writes metrics/lm_eval.json and reports/lm_eval.json, logged to MLflow.")
    _common(sp)
    sp = sub.add_parser("lineage", help=COMMANDS["lineage"][1],
                        description="Every stage's code deps in dvc.yaml must be exactly the lmpipe modules it can "
                        "import (found from the source, transitively) plus its resources. Without --write: print the "
                        "differences and exit 2 when there are any. With --write: rewrite them in dvc.yaml.")
    _common(sp)
    sp.add_argument("--write", action="store_true", help="Rewrite the code deps in dvc.yaml.")
    sp = sub.add_parser("serve", add_help=False,
                        help="Serve the scheduled Prefect deployments from this machine (see `lmpipe serve --help`).")
    sp.add_argument("serve_args", nargs=argparse.REMAINDER)
    sp = sub.add_parser("params", help="Print the validated params (all sections, defaults filled in).",
                        description="Print the validated params (all sections, defaults filled in).")
    _common(sp)
    sp.add_argument("section", nargs="?", help="Only this section.")
    return parser


def stage_config(stage: StageSpec, params_path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load the params a stage reads: its own section (or, for ``inputs``, all sections) and tracking."""
    from lmpipe.config import load_params

    sections = ["tracking", "engine", stage.section] if stage.section else None
    return load_params(params_path, overrides, sections=sections)


def run_stage(name: str, params_path: str = "params.yaml", overrides: list[str] | None = None,
              root: str | Path = ".", task: str | None = None) -> dict[str, Any]:
    """Run one stage as the CLI does (params, MLflow run, summary). Returns the stage's summary."""
    from lmpipe import engine
    from lmpipe.config import Paths
    from lmpipe.io import sweep_staging
    from lmpipe.tracking import stage_run

    stage = STAGES[name]
    root = Path(root).resolve()
    if os.environ.get("RANK", "0") == "0":  # one sweeper: other ranks may start while rank 0 stages
        sweep_staging(root)  # staging dirs of killed stages (lmpipe.io)
    params = stage_config(stage, root / params_path if not Path(params_path).is_absolute() else params_path,
                          overrides)
    cfg = params.section(stage.section) if stage.section else params
    paths = Paths(root)
    module = importlib.import_module(stage.module)
    tracking = params.tracking
    if os.environ.get("RANK", "0") != "0" or stage.section is None:
        # under torchrun/SLURM only rank 0 records the run; `inputs` runs on every `dvc repro`
        # and has nothing to track
        tracking = tracking.model_copy(update={"enabled": False})
    with stage_run(name, tracking, root) as tracker:
        if stage.section:
            tracker.log_params(cfg.model_dump(mode="json"))
        with engine.use(params.engine):
            if task is not None:
                summary: dict[str, Any] = module.run_task(cfg, task, paths)
            else:
                summary = module.run(cfg, paths)
        tracker.log_metrics({k: v for k, v in summary.items() if k != "artifacts"})
        for artifact in summary.get("artifacts", []):
            tracker.log_artifact(artifact)
    return summary


def _project_script(command: str, script: str, argv: list[str]) -> int:
    """``lmpipe serve`` / ``lmpipe run``: ``main(argv)`` of pipelines/SCRIPT of the project in the
    current directory (the script stays the implementation; the CLI only finds and calls it)."""
    import importlib.util

    path = Path.cwd() / "pipelines" / script
    spec = importlib.util.spec_from_file_location(f"lmpipe_{path.stem}", path) if path.is_file() else None
    if spec is None or spec.loader is None:
        print(f"lmpipe {command}: error: {path}: not found; run it from the project root", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    try:
        spec.loader.exec_module(module)
        return int(module.main(argv) or 0)
    except LmpipeError as err:
        print(f"lmpipe {command}: error: {err}", file=sys.stderr)
        return 2


def _setup_logging(debug: bool) -> None:
    """rich's handler on a terminal; elsewhere (the flow's log, CI, a file) plain one-line records,
    which rich would wrap at 80 columns."""
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "fsspec", "numba", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to the deployments script
        return _project_script("serve", "deployments.py", argv[1:])
    if argv[:1] == ["run"]:  # and everything after `run` to the flow
        return _project_script("run", "flow.py", argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.debug)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "params":
            from lmpipe.config import load_params

            params = load_params(Path(args.root) / args.params, args.overrides)
            data = params.to_dict()
            if args.section:
                if args.section not in data:
                    raise LmpipeError(f"no section '{args.section}' (sections: {', '.join(data)})")
                data = data[args.section]
            print(json.dumps(data, indent=2))
            return 0
        if args.command in COMMANDS:
            return int(importlib.import_module(COMMANDS[args.command][0]).command(args))
        summary = run_stage(args.command, args.params, args.overrides, args.root, getattr(args, "task", None))
        shown = {k: v for k, v in summary.items() if k != "artifacts"}
        log.info("%s done: %s", args.command, json.dumps(shown, default=str))
        return 0
    except LmpipeError as err:
        if args.debug:
            log.exception("%s failed", args.command)
        print(f"lmpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
