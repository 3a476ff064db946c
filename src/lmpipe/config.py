"""Typed configuration from ``params.yaml``.

One pydantic model per stage section, defined next to the stage's code (``lmpipe/<area>/config.py``)
and named in the stage registry (:mod:`lmpipe.stages`); :func:`load_params` imports only the
sections it is asked for, so a stage loads its own config code and no other stage's. Every model forbids unknown keys and validates types
strictly (YAML already gives typed values, so ``"5"`` for an integer is a mistake, not a
conversion), and errors name the key path: ``params.yaml: clean.quality.min_words: ...``.

Overrides use the same syntax as ``dvc exp run -S``: ``section.key=value`` with a YAML value.
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmpipe.errors import ConfigError


class Section(BaseModel):
    """Base for every config model: unknown keys and wrong types are errors.

    ``moved_keys`` (old key -> its new name, in the same section) keeps a renamed key known: a
    params.yaml still naming the old one gets an error that names the new one.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=False)
    moved_keys: ClassVar[dict[str, str]] = {}


def moved_keys_of(model: type[BaseModel]) -> dict[str, str]:
    """Every renamed key of ``model`` and of the groups it inherits, old -> new."""
    return {old: new for cls in reversed(model.__mro__) for old, new in vars(cls).get("moved_keys", {}).items()}


class TrackingConfig(Section):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log each stage as an MLflow run.")
    experiment: str = Field("lmpipe", description="MLflow experiment name.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default sqlite:///mlflow.db at the project root. "
        "The MLFLOW_TRACKING_URI environment variable wins over both.",
    )
    system_metrics: bool = Field(
        True, description="Log CPU, memory, disk and network use (GPU with nvidia-ml-py) of the training "
        "stages (pretrain, finetune, distill) as system/* metrics of their runs, every 10 s.",
    )


def section_model(name: str) -> type[Section]:
    """The model of one params section, imported on demand (see :mod:`lmpipe.stages`).

    Only the named section's module is imported, so loading the params of one stage never loads
    another stage's code. Raises KeyError for a name that is not a section.
    """
    from lmpipe.stages import section_classes

    module, _, attr = section_classes()[name].partition(":")
    model: type[Section] = getattr(importlib.import_module(module), attr)
    return model


def _section_models() -> dict[str, type[Section]]:
    """Every section name -> model (imports every area's config: for ``lmpipe params`` and tests)."""
    from lmpipe.stages import section_classes

    return {name: section_model(name) for name in section_classes()}


class Params:
    """All sections of params.yaml, validated. Access a section as an attribute: ``params.clean``."""

    def __init__(self, sections: dict[str, Section], source: str) -> None:
        self._sections = sections
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def section(self, name: str) -> Section:
        return self._sections[name]

    def to_dict(self) -> dict[str, Any]:
        return {name: model.model_dump(mode="json") for name, model in self._sections.items()}


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root (fixed by dvc.yaml)."""

    root: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def clean(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    @property
    def tokenizer(self) -> Path:
        return self.root / "artifacts" / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.root / "data" / "tokens"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


# YAML 1.1 (PyYAML) reads "1e-3" as a string; YAML 1.2 and every user read it as a float.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key in path")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, part, override)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    value = parse_yaml(raw, f"override {key}")
    if isinstance(node, list):
        index = int(parts[-1]) if parts[-1].isdigit() else None
        if index is None or index >= len(node):
            raise ConfigError(f"override {override!r}: {parts[-1]} is not an index of the list")
        node[index] = value
    else:
        node[parts[-1]] = value


def _list_item(items: list[Any], part: str, override: str) -> Any:
    """``sources.0.name``: a numeric path part indexes a list (e.g. collect.sources)."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {override!r}: {part} is not an index of a {len(items)}-item list")
    item = items[int(part)]
    if not isinstance(item, dict):
        raise ConfigError(f"override {override!r}: item {part} is not a section")
    return item


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk a model class along an error location; return the model that owns the last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            # discriminated-union tag (e.g. 'files') in the location: look it up among members
            return None
        current = _unwrap(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/list/dict wrappers to reach a model class when there is exactly one."""
    while True:
        origin = get_origin(annotation)
        if origin is None:
            return annotation
        args = [a for a in get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
        if len(args) == 1:
            annotation = args[0]
            continue
        if origin is dict and args:
            annotation = args[-1]
            continue
        return annotation


def format_validation_error(err: ValidationError, section: str, model: type[BaseModel], source: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        path = ".".join([section, *(str(p) for p in loc)])
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            hint = ""
            moved = moved_keys_of(owner).get(str(loc[-1])) if owner is not None else None
            if moved:
                new_path = ".".join([section, *(str(p) for p in loc[:-1]), moved])
                lines.append(f"{source}: {path}: renamed to '{moved}': set {new_path} instead")
                continue
            if owner is not None:
                known = list(owner.model_fields)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"{source}: {path}: unknown key{hint}")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: {path}: {item['msg']}{shown}")
    return "; ".join(lines)


def load_params(
    path: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    sections: list[str] | None = None,
) -> Params:
    """Read and validate params.yaml (missing sections take their defaults).

    Raises ConfigError naming the file and key path for unknown keys, wrong types and
    impossible values.
    """
    path = Path(path)
    if path.is_file():
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    elif path.name == "params.yaml" and not path.exists():
        data = {}
    else:
        raise ConfigError(f"{path}: params file not found")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides or []:
        apply_override(data, override)
    from lmpipe.stages import section_classes

    names = list(section_classes())
    unknown = [key for key in data if key not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join(names)})"
        raise ConfigError(f"{path}: {unknown[0]}: unknown section{hint}")
    validated: dict[str, Section] = {}
    wanted = sections or names
    for name in names:
        if name not in wanted:
            continue
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: {name}: must be a mapping, got {type(raw).__name__}")
        model = section_model(name)
        try:
            validated[name] = model.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, name, model, str(path))) from None
    return Params(validated, str(path))


def describe_model(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every key of a section, nested ones too."""
    rows: list[tuple[str, str, str, str]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}"
        members = _union_models(info.annotation)
        if members:
            rows.append((f"{key}[]", "list", "", info.description or ""))
            for member in members:
                tag = member.model_fields["type"].annotation
                label = get_args(tag)[0] if get_args(tag) else member.__name__
                doc = (member.__doc__ or "").strip().splitlines()
                rows.append((f"{key}[type={label}]", member.__name__, "", doc[0] if doc else ""))
                rows.extend(r for r in describe_model(member, f"{key}[type={label}]") if not r[0].endswith(".type"))
            continue
        inner = _unwrap(info.annotation)
        type_name = _type_name(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and get_origin(info.annotation) is None:
            rows.append((key, type_name, "", info.description or ""))
            rows.extend(describe_model(inner, key))
            continue
        default = "" if info.is_required() else repr(info.get_default(call_default_factory=True))
        if len(default) > 60:
            default = default[:57] + "..."
        rows.append((key, type_name, default, info.description or ""))
    return rows


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    """Members of a (list of a) discriminated union of models, e.g. collect.sources."""
    while get_origin(annotation) in (list, Annotated):
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(members) > 1 and all("type" in m.model_fields for m in members):
            return members
    return []


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    if text:
        return text
    return re.sub(r"\b(typing|lmpipe\.[\w.]+)\.", "", str(annotation)).replace("NoneType", "None")
