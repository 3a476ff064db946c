from __future__ import annotations

from pathlib import Path

import pytest

from lmpipe.config import apply_override, load_params, parse_yaml
from lmpipe.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_are_valid(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.clean.near_dedup.enabled
    assert params.collect.sources[0].type == "synthetic"


def test_missing_sections_take_defaults(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "split: {val_fraction: 0.1}\n"))
    assert params.split.val_fraction == 0.1
    assert params.clean.quality.min_words == 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clean: {quality: {min_words: abc}}", "clean.quality.min_words: Input should be a valid integer"),
        ("clean: {quality: {min_wrds: 3}}", "clean.quality.min_wrds: unknown key (did you mean 'min_words'?)"),
        ("clen: {}", "clen: unknown section (did you mean 'clean'?)"),
        ("clean: {near_dedup: {threshold: 1.5}}", "clean.near_dedup.threshold: Input should be less than or equal to 1"),
        ("split: {val_fraction: 0.6, test_fraction: 0.5}", "val_fraction + test_fraction must be < 1"),
        ("collect: {sources: [{type: files, name: a}]}", "collect.sources.0.files.paths: Field required"),
        ("collect: {sources: [{type: ftp, name: a}]}", "collect.sources.0"),
        ("clean: {quality: {min_words: '50'}}", "clean.quality.min_words: Input should be a valid integer (got '50')"),
        ("clean: [1, 2]", "clean: must be a mapping"),
        ("pretrain: {max_time: 0}", "pretrain.max_time: Input should be greater than 0"),
        ("distill: {max_time: -5}", "distill.max_time: Input should be greater than 0"),
        ("pretrain: {val_every: 50}", "pretrain.val_every: renamed to 'eval_every': set pretrain.eval_every instead"),
        ("pretrain: {val_batches: 5}", "pretrain.val_batches: renamed to 'eval_batches': set pretrain.eval_batches"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, text))
    assert expected in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "clean: {quality: [\n"))


def test_overrides_use_dvc_syntax(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, ""), ["clean.near_dedup.threshold=0.7", "clean.language.keep=[en, zh]"])
    assert params.clean.near_dedup.threshold == 0.7
    assert params.clean.language.keep == ["en", "zh"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(write(tmp_path, ""), ["clean.near_dedup.threshold"])


def test_yaml_reads_exponent_floats() -> None:
    assert parse_yaml("lr: 3e-4") == {"lr": 3e-4}
    data: dict = {}
    apply_override(data, "a.b=1e-3")
    assert data == {"a": {"b": 1e-3}}


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "other.yaml")


def test_overrides_index_into_lists(tmp_path: Path) -> None:
    path = write(tmp_path, "collect: {sources: [{type: synthetic, name: s}]}\n")
    params = load_params(path, ["collect.sources.0.num_docs=10"])
    assert params.collect.sources[0].num_docs == 10
    with pytest.raises(ConfigError, match="not an index"):
        load_params(path, ["collect.sources.3.num_docs=10"])
    with pytest.raises(ConfigError, match="unknown kind"):
        load_params(path, ["collect.sources.0.kinds={poem: 1}"])


def _dvc_param_keys(dvc_yaml: Path, params: dict) -> list[str]:
    """Every params key the stages of dvc.yaml declare, with foreach stages expanded."""
    import yaml

    keys: list[str] = []
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):  # ${finetune.tasks}: a dict of params.yaml
                items = params
                for part in stage["foreach"].strip("${}").split("."):
                    items = items[part]
            for key in items:
                keys += [str(k).replace("${key}", str(key)) for k in stage["do"].get("params", [])]
        else:
            keys += [str(k) for k in stage.get("params", [])]
    return keys


@pytest.mark.parametrize("name", ["params.yaml", *sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))])
def test_every_dvc_params_key_is_in_the_params_file(repo_root: Path, name: str) -> None:
    # DVC refuses a stage whose params section is absent ("Parameters 'pretrain' are missing"), even
    # though lmpipe would fill in defaults: params.yaml and every preset must carry all of them.
    import yaml

    path = repo_root / name if name == "params.yaml" else repo_root / "configs" / name
    params = yaml.safe_load(path.read_text())
    load_params(path)
    for key in _dvc_param_keys(repo_root / "dvc.yaml", params):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: no '{key}' (dvc.yaml declares it)"
            node = node[part]
