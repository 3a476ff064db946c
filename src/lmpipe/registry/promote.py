"""Promotion: the gate, ``champion`` / ``previous`` aliases, manual promote and rollback.

Aliases of a registered model (MLflow model registry):
- ``candidate``: the newest registered version (set by the register stage);
- ``champion``: the version to serve (``models:/<name>@champion``);
- ``previous``: the champion before the current one (what a rollback returns to).

The gate compares a version's metrics with the champion's, metric by metric, with the rules of
``register.gate``. Metrics live on each version as tags ``lmpipe.metric.<name>`` (written at
registration from the metrics files), so the comparison needs nothing but the registry. A missing
or NaN metric never passes, on either side. The first version of a model (no champion yet) is
promoted only when every metric beats its absolute floor, tags ``lmpipe.floor.<name>`` written at
registration: what a model that ignores its input reaches (the unigram entropy of the data for a
language model, the majority class for a classifier; see ``register.KIND_FLOORS``). A metric
without a floor does not pass: such a first version is promoted by hand (``--force``).

The champions so far are kept, oldest first, in the registered model's tag
``lmpipe.champion_history``, so repeated rollbacks walk back one champion at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lmpipe.errors import LmpipeError
from lmpipe.registry.config import GateRule, RegisterConfig

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
METRIC_TAG = "lmpipe.metric."
FLOOR_TAG = "lmpipe.floor."
HISTORY_TAG = "lmpipe.champion_history"


class RegistryError(LmpipeError):
    """A registry operation cannot be done as asked (unknown model or version, no previous champion)."""


@dataclass
class GateCheck:
    metric: str
    direction: str
    threshold: float  # smallest acceptable improvement (negative: an allowed drop)
    candidate: float | None
    champion: float | None
    passed: bool
    reason: str


@dataclass
class Decision:
    """What a promotion (or rollback) did and why."""

    name: str
    version: int
    action: str  # promote | rollback
    champion_before: int | None
    passed: bool
    moved: bool
    forced: bool = False
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def message(self) -> str:
        head = f"{self.name} v{self.version}: "
        if self.action == "rollback":
            head = f"{self.name}: rollback to v{self.version}: "
        verdict = "champion" if self.moved else ("already champion" if self.passed else "not promoted")
        return head + verdict + (f" ({'; '.join(self.reasons)})" if self.reasons else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


# ------------------------------------------------------------------------------------- the gate


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def evaluate_gate(candidate: Mapping[str, float | None], champion: Mapping[str, float | None] | None,
                  rules: Mapping[str, GateRule],
                  floors: Mapping[str, float | None] | None = None) -> tuple[bool, list[GateCheck]]:
    """Check ``candidate`` metrics against ``champion`` ones (None: there is no champion yet).

    ``improvement`` is champion - candidate for lower-is-better metrics and candidate - champion
    for higher-is-better ones; a rule passes when it is at least the rule's threshold. Without a
    champion, each metric must be strictly better than its absolute floor in ``floors`` (a
    missing floor fails). Every rule is checked (all reasons are reported); the gate passes only
    when all pass and there is at least one rule.
    """
    checks = []
    for metric, rule in sorted(rules.items()):
        new = candidate.get(metric)
        old = champion.get(metric) if champion is not None else None
        threshold = rule.allowed_change()
        if not _finite(new):
            reason = f"candidate {metric} is {'missing' if new is None else new}"
            checks.append(GateCheck(metric, rule.direction, threshold, new, old, False, reason))
            continue
        assert new is not None
        if champion is None:
            floor = (floors or {}).get(metric)
            if not _finite(floor):
                checks.append(GateCheck(metric, rule.direction, threshold, new, None, False,
                                        f"{metric} {new:.6g}: no champion yet and no absolute floor to clear "
                                        "(promote with force)"))
                continue
            assert floor is not None
            beats = new < floor if rule.direction == "lower" else new > floor
            word = "beats" if beats else "does not beat"
            checks.append(GateCheck(metric, rule.direction, threshold, new, None, beats,
                                    f"{metric} {new:.6g} {word} the absolute floor {floor:.6g} "
                                    f"({rule.direction} is better; no champion yet)"))
            continue
        if not _finite(old):
            reason = f"champion {metric} is {'missing' if old is None else old}: cannot compare (promote with force)"
            checks.append(GateCheck(metric, rule.direction, threshold, new, old, False, reason))
            continue
        assert old is not None
        improvement = old - new if rule.direction == "lower" else new - old
        passed = improvement >= threshold
        need = (f"must improve by >= {threshold:g}" if threshold >= 0 else f"may drop by <= {-threshold:g}")
        word = "better" if improvement > 0 else "worse" if improvement < 0 else "equal"
        reason = (f"{metric} {new:.6g} vs champion {old:.6g} ({rule.direction} is better): "
                  f"{word} by {abs(improvement):.4g}, {need}")
        checks.append(GateCheck(metric, rule.direction, threshold, new, old, passed, reason))
    if not checks:
        return False, [GateCheck("-", "-", 0.0, None, None, False, "no gate metrics for this model")]
    return all(c.passed for c in checks), checks


# ---------------------------------------------------------------------------------- registry IO


def client_for(client: Any | None = None) -> Any:
    """``client`` or an ``MlflowClient`` on the current tracking URI."""
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def version_metrics(version: Any, prefix: str = METRIC_TAG) -> dict[str, float | None]:
    """The gate metrics recorded on a model version (tags ``lmpipe.metric.*``; with
    ``prefix=FLOOR_TAG`` their absolute floors)."""
    out: dict[str, float | None] = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(prefix):
            try:
                out[key[len(prefix):]] = float(value)
            except ValueError:
                out[key[len(prefix):]] = None
    return out


def _aliases(client: Any, name: str) -> tuple[dict[str, int], Any]:
    """(alias -> version, the registered model) of ``name``; RegistryError if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        raise RegistryError(f"no registered model {name!r} in the registry ({_first_line(err)})") from None
    return {alias: int(version) for alias, version in (model.aliases or {}).items()}, model


def _get_version(client: Any, name: str, version: int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        raise RegistryError(f"{name} has no version {version} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _history(model: Any, aliases: Mapping[str, int]) -> list[int]:
    raw = (model.tags or {}).get(HISTORY_TAG, "")
    history = [int(v) for v in raw.split(",") if v.strip().isdigit()]
    if not history:  # aliases set by hand: rebuild what can be known
        history = [aliases[a] for a in (PREVIOUS, CHAMPION) if a in aliases]
    return history


def _rules_for(version: Any, name: str, cfg: RegisterConfig | None,
               rules: Mapping[str, GateRule] | None) -> dict[str, GateRule]:
    """Rules for ``name``: the given ones, else the model's metrics in params, else every recorded metric with a rule."""
    if rules is not None:
        return dict(rules)
    if cfg is None:
        return {}
    spec = cfg.spec_for(name)
    metrics = list(spec.metrics) if spec is not None else list(version_metrics(version))
    return {m: cfg.gate[m] for m in metrics if m in cfg.gate}


def _move_champion(client: Any, name: str, version: int, old: int | None, history: list[int]) -> None:
    """champion -> version, previous -> old champion (alias moves first, so a crash in between
    leaves champion where it was)."""
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, str(old))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(str(v) for v in [*history, version]))


def _record(client: Any, decision: Decision) -> None:
    """Leave the decision on the version, so the registry UI shows why it moved or not."""
    verdict = "passed" if decision.passed else "failed"
    if decision.forced and decision.moved and not decision.passed:
        verdict = "forced"
    client.set_model_version_tag(decision.name, str(decision.version), f"lmpipe.{decision.action}", verdict)
    client.set_model_version_tag(decision.name, str(decision.version), f"lmpipe.{decision.action}_reason",
                                 "; ".join(decision.reasons)[:5000])
    (log.info if decision.moved or decision.passed else log.warning)("%s", decision.message)


# ------------------------------------------------------------------------------------ promotion


def promote_if_better(name: str, version: int, rules: Mapping[str, GateRule] | None = None, *,
                      cfg: RegisterConfig | None = None, client: Any | None = None) -> Decision:
    """Move ``champion`` to ``version`` of ``name`` when it passes the gate against the champion.

    Rules: ``rules``, else those of the model's metrics in ``cfg`` (register.gate). Reads the
    registry; writes the aliases (on a pass) and tags ``lmpipe.promote`` / ``lmpipe.promote_reason``
    on the version (always). Returns the decision; a failed gate is a normal outcome, not an error.
    Raises RegistryError for an unknown model or version.
    """
    return promote(name, version, rules=rules, cfg=cfg, force=False, client=client)


def promote(name: str, version: int, *, rules: Mapping[str, GateRule] | None = None,
            cfg: RegisterConfig | None = None, force: bool = False, client: Any | None = None) -> Decision:
    """``lmpipe promote NAME --version N [--force]``: the gate of :func:`promote_if_better`;
    ``force`` moves ``champion`` whatever the metrics say (recorded as ``forced``)."""
    client = client_for(client)
    aliases, model = _aliases(client, name)
    candidate = _get_version(client, name, version)
    champion_version = aliases.get(CHAMPION)
    decision = Decision(name, int(version), "promote", champion_version, passed=False, moved=False, forced=force)
    if champion_version == int(version):
        decision.passed = True
        decision.reasons.append("this version is the champion already")
        log.info("%s", decision.message)
        return decision
    champion = _get_version(client, name, champion_version) if champion_version is not None else None
    passed, checks = evaluate_gate(version_metrics(candidate), version_metrics(champion) if champion else None,
                                   _rules_for(candidate, name, cfg, rules), version_metrics(candidate, FLOOR_TAG))
    decision.passed, decision.checks = passed, checks
    decision.reasons = [c.reason for c in checks if not c.passed] if not passed else [c.reason for c in checks]
    if champion is None and passed:
        decision.reasons.insert(0, "first champion of this model")
    if champion is not None and passed:
        _warn_data_change(candidate, champion, decision)
    if passed or force:
        if force and not passed:
            decision.reasons.insert(0, "forced past the gate")
        _move_champion(client, name, int(version), champion_version, _history(model, aliases))
        decision.moved = True
    _record(client, decision)
    return decision


def _warn_data_change(candidate: Any, champion: Any, decision: Decision) -> None:
    """Metrics measured on other evaluation data are not strictly comparable: say so."""
    key = "lmpipe.data_fingerprint"
    new, old = (candidate.tags or {}).get(key), (champion.tags or {}).get(key)
    if new and old and new != old:
        decision.reasons.append(f"note: evaluated on other data than champion v{champion.version} "
                                f"({new[:12]} vs {old[:12]})")


def rollback(name: str, *, force: bool = False, client: Any | None = None) -> Decision:
    """``lmpipe rollback NAME``: make the ``previous`` champion the champion again.

    Checks (skipped with ``force``): a previous champion exists and still has its gate metrics
    present and finite. The metric comparison of the gate is not applied: the previous champion
    lost to the current one by design, and a rollback is the decision that the current one is bad.
    ``previous`` moves one step further back along ``lmpipe.champion_history`` (or is removed),
    and the rolled-back version is tagged ``lmpipe.rolled_back``. Raises RegistryError when there is
    nothing to roll back to.
    """
    client = client_for(client)
    aliases, model = _aliases(client, name)
    current = aliases.get(CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion: nothing to roll back")
    history = [v for v in _history(model, aliases) if v != current] + [current]
    target = aliases.get(PREVIOUS) or (history[-2] if len(history) > 1 else None)
    if target is None or target == current:
        raise RegistryError(f"{name} has no previous champion to roll back to (champion is v{current})")
    version = _get_version(client, name, target)
    decision = Decision(name, target, "rollback", current, passed=True, moved=False, forced=force)
    metrics = version_metrics(version)
    bad = sorted(m for m, v in metrics.items() if not _finite(v))
    if not metrics or bad:
        decision.passed = False
        problem = "no gate metrics" if not metrics else "non-finite " + ", ".join(bad)
        decision.reasons.append(f"v{target} has {problem}" + ("" if force else " (roll back with force)"))
        if not force:
            _record(client, decision)
            return decision
    trail = history[: history.index(target) + 1] if target in history else [target]
    client.set_registered_model_alias(name, CHAMPION, str(target))
    if len(trail) > 1:
        client.set_registered_model_alias(name, PREVIOUS, str(trail[-2]))
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(str(v) for v in trail))
    client.set_model_version_tag(name, str(current), "lmpipe.rolled_back", "true")
    decision.moved = True
    decision.reasons.append(f"v{current} rolled back")
    _record(client, decision)
    return decision


def promote_candidates(cfg: RegisterConfig, client: Any | None = None) -> list[Decision]:
    """``lmpipe promote`` with no name: the gate for the ``candidate`` of every configured model
    that has one (models never registered are skipped with a log line)."""
    client = client_for(client)
    decisions = []
    for spec in cfg.models:
        name = spec.registered_name(cfg.name_prefix)
        try:
            aliases, _ = _aliases(client, name)
        except RegistryError:
            log.info("%s: not registered yet; run `lmpipe register` first", name)
            continue
        if CANDIDATE not in aliases:
            log.info("%s: no candidate version", name)
            continue
        decisions.append(promote_if_better(name, aliases[CANDIDATE], cfg=cfg, client=client))
    return decisions
