"""The validation gate between ``validate`` and ``split``.

``validate`` records its verdict in ``metrics/validate.json`` together with the fingerprint of the
``data/clean`` it judged; ``split`` refuses to run unless that record exists, passed, and names the
``data/clean`` that is there now. The check lives in the stage, not in the flow or in ``dvc.yaml``,
so it holds however split is started: ``lmpipe split`` by hand, ``dvc repro --single-item split``,
or a Prefect flow run with ``--stages split``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpipe.config import Paths
from lmpipe.errors import DataError
from lmpipe.io import fingerprint_path, write_json

RESULT = Path("metrics") / "validate.json"


def record_validation(paths: Paths, success: bool, suites: dict[str, Any]) -> Path:
    """Write the verdict on the current data/clean to metrics/validate.json; return its path."""
    path = paths.root / RESULT
    write_json(path, {"success": success, "data": {"clean": fingerprint_path(paths.clean)}, "suites": suites})
    return path


def require_validated(paths: Paths) -> None:
    """Raise DataError (one line: what is wrong, what to run) unless data/clean passed validation as it is now."""
    path = paths.root / RESULT
    shown = RESULT.as_posix()
    if not path.is_file():
        raise DataError("no validation result: run `lmpipe validate` first; split runs only on validated data",
                        path=shown)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"unreadable validation result ({err}): rerun `lmpipe validate`", path=shown) from None
    recorded = (result.get("data") or {}).get("clean") if isinstance(result, dict) else None
    if recorded != fingerprint_path(paths.clean):
        raise DataError("the validation result is for other data than data/clean holds now: rerun `lmpipe validate`",
                        path=shown)
    if result.get("success") is not True:
        raise DataError("validation failed for this data/clean (see reports/validation/index.html): fix the data "
                        "or the clean/validate params, then rerun `lmpipe validate`; split refuses unvalidated data",
                        path=shown)
