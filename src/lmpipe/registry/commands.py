"""``lmpipe promote``, ``lmpipe rollback`` and ``lmpipe export-hf``: people's commands on the registry.

Kept out of :mod:`lmpipe.cli` so that a stage's process never imports registry or export code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lmpipe.errors import LmpipeError

log = logging.getLogger("lmpipe")


def command(args: argparse.Namespace) -> int:
    """Run ``args.command`` (promote / rollback / export-hf); returns the exit code."""
    from lmpipe.config import Paths, load_params
    from lmpipe.tracking import setup_mlflow

    root = Path(args.root).resolve()
    if args.command == "export-hf":
        from lmpipe.registry.export_hf import run_export

        result = run_export(Paths(root), args.model, args.out)
        log.info("export-hf done: %s", json.dumps(result, default=str))
        return 0
    params = load_params(root / args.params, args.overrides, sections=["tracking", "register"])
    setup_mlflow(params.tracking, root)
    from lmpipe.registry import promote as registry

    if args.command == "rollback":
        decision = registry.rollback(args.name, force=args.force)
        print(decision.message)
        return 0 if decision.moved else 2
    if args.name is None:
        for decision in registry.promote_candidates(params.register):
            print(decision.message)
        return 0
    if args.version is None:
        raise LmpipeError("promote NAME needs --version N (or no NAME to gate every candidate)")
    decision = registry.promote(args.name, args.version, cfg=params.register, force=args.force)
    print(decision.message)
    return 0 if decision.moved or decision.passed else 2
