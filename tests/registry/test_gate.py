"""The promotion gate's arithmetic and the ``register`` config's validation (no MLflow needed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from lmpipe.registry.config import GateRule, ModelSpec, RegisterConfig
from lmpipe.registry.promote import evaluate_gate
from lmpipe.registry.register import lookup

LOWER = {"val_bpb": GateRule(direction="lower", min_improvement=0.01)}
HIGHER_DROP = {"accuracy": GateRule(direction="higher", max_drop=0.01)}


def test_lower_is_better_needs_the_minimum_improvement() -> None:
    assert evaluate_gate({"val_bpb": 1.48}, {"val_bpb": 1.50}, LOWER)[0]
    passed, checks = evaluate_gate({"val_bpb": 1.495}, {"val_bpb": 1.50}, LOWER)
    assert not passed
    assert "must improve by >= 0.01" in checks[0].reason and "better by 0.005" in checks[0].reason
    assert not evaluate_gate({"val_bpb": 1.6}, {"val_bpb": 1.5}, LOWER)[0]


def test_max_drop_allows_a_small_regression_only() -> None:
    assert evaluate_gate({"accuracy": 0.795}, {"accuracy": 0.80}, HIGHER_DROP)[0]
    passed, checks = evaluate_gate({"accuracy": 0.78}, {"accuracy": 0.80}, HIGHER_DROP)
    assert not passed and "may drop by <= 0.01" in checks[0].reason


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_missing_or_nan_metric_never_passes(bad: float | None) -> None:
    assert not evaluate_gate({"val_bpb": bad}, {"val_bpb": 1.5}, LOWER)[0]
    assert not evaluate_gate({"val_bpb": bad}, None, LOWER)[0], "not even as the first model"
    passed, checks = evaluate_gate({"val_bpb": 1.0}, {"val_bpb": bad}, LOWER)
    assert not passed and "champion val_bpb" in checks[0].reason


def test_first_model_must_beat_its_absolute_floor() -> None:
    """No champion yet: finite is not enough, each metric must beat what a model that ignores its
    input reaches (unigram bits/byte 4.2, majority class 0.6 here); a metric without a floor fails."""
    rules = {**LOWER, **HIGHER_DROP}
    floors = {"val_bpb": 4.2, "accuracy": 0.6}
    passed, checks = evaluate_gate({"val_bpb": 9.0, "accuracy": 0.1}, None, rules, floors)
    assert not passed and [c.passed for c in checks] == [False, False]
    assert "val_bpb 9 does not beat the absolute floor 4.2" in checks[1].reason
    assert not evaluate_gate({"val_bpb": 4.2}, None, LOWER, floors)[0], "equal to the floor is not better"
    assert not evaluate_gate({"accuracy": 0.6}, None, HIGHER_DROP, floors)[0]
    passed, checks = evaluate_gate({"val_bpb": 1.3, "accuracy": 0.8}, None, rules, floors)
    assert passed and all("beats the absolute floor" in c.reason for c in checks)
    passed, checks = evaluate_gate({"val_bpb": 1.3}, None, LOWER)
    assert not passed and "no absolute floor" in checks[0].reason


def test_every_rule_must_pass_and_every_failure_is_reported() -> None:
    rules = {**LOWER, **HIGHER_DROP}
    passed, checks = evaluate_gate({"val_bpb": 1.0, "accuracy": 0.5}, {"val_bpb": 1.5, "accuracy": 0.9}, rules)
    assert not passed
    assert [c.passed for c in checks] == [False, True]  # sorted by metric: accuracy, val_bpb
    assert not evaluate_gate({}, {}, {})[0], "a model without gate metrics is never promoted automatically"


@given(champion=st.floats(0.1, 10), delta=st.floats(-1, 1), margin=st.floats(0, 0.5))
def test_gate_is_monotonic_in_the_candidate(champion: float, delta: float, margin: float) -> None:
    """If a candidate passes, any candidate at least as good passes too."""
    rule = {"m": GateRule(direction="lower", min_improvement=margin)}
    if evaluate_gate({"m": champion + delta}, {"m": champion}, rule)[0]:
        assert evaluate_gate({"m": champion + delta - 0.01}, {"m": champion}, rule)[0]


def test_rule_takes_one_threshold() -> None:
    with pytest.raises(ValidationError, match="either min_improvement or max_drop"):
        GateRule(direction="lower", min_improvement=0.1, max_drop=0.1)
    with pytest.raises(ValidationError):
        GateRule.model_validate({"direction": "down"})


def test_every_model_metric_needs_a_gate_rule() -> None:
    with pytest.raises(ValidationError, match="bleu have no rule under register.gate"):
        RegisterConfig.model_validate({"models": [{"stage": "distill", "metrics": {"bleu": "metrics/d.json:bleu"}}]})


def test_model_specs_are_checked() -> None:
    with pytest.raises(ValidationError, match="needs its task name"):
        ModelSpec.model_validate({"stage": "finetune", "metrics": {"accuracy": "m.json:a"}})
    with pytest.raises(ValidationError, match="is not 'FILE:KEY'"):
        ModelSpec.model_validate({"stage": "pretrain", "metrics": {"val_bpb": "metrics/pretrain.json"}})
    with pytest.raises(ValidationError, match="listed more than once"):
        RegisterConfig.model_validate({"models": [{"stage": "pretrain", "metrics": {"val_bpb": "a.json:x"}}] * 2})


def test_names_and_default_directories() -> None:
    cfg = RegisterConfig()
    names = [spec.registered_name(cfg.name_prefix) for spec in cfg.models]
    assert names == ["lmpipe-pretrain", "lmpipe-finetune-sft", "lmpipe-finetune-cls", "lmpipe-distill"]
    assert [spec.directory() for spec in cfg.models] == ["models/pretrain", "models/finetune/sft", "models/finetune/cls",
                                                         "models/distill"]
    assert cfg.spec_for("lmpipe-finetune-cls") is cfg.models[2]


def test_metric_keys_reach_nested_objects() -> None:
    data = {"pretrain": {"val_bpb": 1.2}, "a.b": 3}
    assert lookup(data, "pretrain.val_bpb") == 1.2
    assert lookup(data, "a.b") == 3
    assert lookup(data, "pretrain.missing") is None
