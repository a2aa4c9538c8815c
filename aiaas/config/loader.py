"""The one config loader: YAML file → validated model, or a ConfigError listing every problem.

Every problem is one line ``• field.path (line N): message``; unknown keys get a did-you-mean
(as SkyPilot's schema validation does). Files without ``kind:`` that hold ``applications:`` are
Ray Serve config files and are checked with Serve's own schema.
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from aiaas import errors

if TYPE_CHECKING:
    from ray.serve.schema import ServeDeploySchema

#: kind → "module:Class". Loaded lazily so validating one kind never imports another's deps.
KINDS: dict[str, str] = {
    "cluster": "aiaas.config.cluster:ClusterConfig",
    "dataset": "aiaas.config.dataset:DatasetConfig",
    "train": "aiaas.config.train:TrainConfig",
    "finetune": "aiaas.config.finetune:FinetuneConfig",
    "monitoring": "aiaas.config.monitoring:MonitoringConfig",
    "optimize": "aiaas.config.optimize:OptimizeConfig",
    "tune": "aiaas.config.tune:TuneConfig",
}

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Read a YAML file that must hold a mapping.

    Returns:
        The parsed mapping and its node tree (for line numbers in messages).

    Raises:
        ConfigError: The file is missing, unreadable, not YAML, empty or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.ConfigError(
            f"{path}: no such file", "Check the path; shipped configs live under configs/."
        ) from None
    except IsADirectoryError:
        raise errors.ConfigError(f"{path}: is a directory, not a YAML file") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise errors.ConfigError(
            f"{path}: cannot be read ({exc.__class__.__name__}: {exc})",
            "Make the file readable UTF-8 text.",
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise errors.ConfigError(
            f"{path}: not valid YAML{where}: {problem}",
            "Fix the YAML syntax (indentation, ':' after keys, quotes).",
        ) from None
    if data is None:
        raise errors.ConfigError(f"{path}: the file is empty", "Start it with 'kind: <kind>'.")
    if not isinstance(data, dict):
        raise errors.ConfigError(
            f"{path}: expected a mapping of keys to values at the top, got {type(data).__name__}",
            "Start the file with 'kind: <kind>' followed by that kind's fields.",
        )
    return data, node


def load(path: str | Path, model: type[M] | None = None) -> M:
    """Load and validate one config file.

    Args:
        path: The YAML file.
        model: The schema the file must have (e.g. ``ClusterConfig``); None accepts any kind.

    Raises:
        ConfigError: Every problem in the file, one per line.
    """
    path = Path(path)
    data, node = read_mapping(path)
    kind = _kind_of(path, data)
    kind_model = model_for_kind(path, kind)
    if model is not None and kind_model is not model:
        wanted = model.model_fields["kind"].annotation
        wanted_kind = typing.get_args(wanted)[0] if typing.get_args(wanted) else model.__name__
        raise errors.ConfigError(
            f"{path}: is a '{kind}' config, but this command needs a '{wanted_kind}' config",
            f"Pass a file with 'kind: {wanted_kind}'.",
        )
    try:
        return kind_model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise errors.ConfigError(format_problems(path, kind, exc, kind_model, node)) from None


def check(path: str | Path) -> str:
    """Validate a config file of any kind, including Ray Serve config files.

    Returns:
        What the file is, e.g. ``"cluster"`` or ``"serve"``.

    Raises:
        ConfigError: Every problem in the file.
    """
    path = Path(path)
    data, node = read_mapping(path)
    if "kind" not in data and "applications" in data:
        _check_serve(path, data, node)
        return "serve"
    load(path)
    return str(data["kind"])


def load_serve(path: str | Path) -> ServeDeploySchema:
    """Load a Ray Serve config file: Serve's own schema, then each of our apps' ``Args``.

    Returns:
        The validated schema (imports Ray).

    Raises:
        ConfigError: Every problem in the file.
    """
    path = Path(path)
    data, node = read_mapping(path)
    return _check_serve(path, data, node)


def model_for_kind(path: Path, kind: str) -> type[BaseModel]:
    """The schema class of a kind, imported on first use."""
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        raise errors.ConfigError(
            f"{path}: unknown kind '{kind}'; {guess}known kinds: {', '.join(sorted(KINDS))}"
        )
    module_name, class_name = KINDS[kind].split(":")
    model: type[BaseModel] = getattr(importlib.import_module(module_name), class_name)
    return model


def format_problems(
    path: Path,
    what: str,
    exc: ValidationError,
    model: type[BaseModel] | None,
    node: yaml.Node | None,
) -> str:
    """Turn a pydantic ValidationError into the user-facing list of problems."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        lines.append(f"  • {_where(_without_tags(loc, node), node)}: {_message(error, loc, model)}")
    count = len(lines)
    header = f"{path}: not a valid {what} config ({count} problem{'s' if count != 1 else ''}):"
    return "\n".join([header, *lines])


def _kind_of(path: Path, data: dict[str, Any]) -> str:
    kind = data.get("kind")
    if kind is None:
        raise errors.ConfigError(
            f"{path}: missing 'kind:'",
            f"Add 'kind: <kind>' at the top; known kinds: {', '.join(sorted(KINDS))} "
            "(Ray Serve files have 'applications:' instead).",
        )
    if not isinstance(kind, str):
        raise errors.ConfigError(f"{path}: 'kind' must be a string such as 'cluster'")
    return kind


def _check_serve(path: Path, data: dict[str, Any], node: yaml.Node | None) -> ServeDeploySchema:
    # Serve's own schema, so a file that passes here is one `serve deploy` accepts; then each
    # app's `args` against the app's own `Args` model, which Serve would only check on the
    # cluster, after the deploy was accepted.
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise errors.ConfigError(format_problems(path, "Ray Serve", exc, None, node)) from None
    lines = []
    for index, app in enumerate(schema.applications):
        args_model = app_args_model(app.import_path)
        if args_model is None:
            continue
        try:
            args_model.model_validate(app.args or {})
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                loc = ("applications", index, "args", *error["loc"])
                lines.append(
                    f"  • {_where(loc, node)}: {_message(error, tuple(error['loc']), args_model)}"
                )
    if lines:
        count = len(lines)
        header = (
            f"{path}: not a valid Ray Serve config ({count} problem{'s' if count != 1 else ''}):"
        )
        raise errors.ConfigError("\n".join([header, *lines]))
    return schema


def app_args_model(import_path: str) -> type[BaseModel] | None:
    """The ``Args`` model of one of our Serve apps (``serve_apps.x:build_app``), else None
    (Serve reports an unknown import path itself, on deploy)."""
    from aiaas.serving import apps

    kind = apps.by_import_path(import_path)
    return kind.args if kind is not None else None


def _where(loc: tuple[Any, ...], node: yaml.Node | None) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    line = _line_of(loc, node)
    text = text or "(top level)"
    return f"{text} (line {line})" if line else text


def _without_tags(loc: tuple[Any, ...], node: yaml.Node | None) -> tuple[Any, ...]:
    # pydantic names the member of a tagged union in the location (source.chat.path); the user
    # wrote source.path with type: chat. A part that is no key of its mapping but the value of
    # the mapping's 'type' is such a tag.
    kept: list[Any] = []
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode) and isinstance(part, str):
            values = {getattr(key, "value", None): value for key, value in current.value}
            if part not in values and getattr(values.get("type"), "value", None) == part:
                continue
            current = values.get(part)
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            current = current.value[part] if part < len(current.value) else None
        else:
            current = None
        kept.append(part)
    return tuple(kept)


def _line_of(loc: tuple[Any, ...], node: yaml.Node | None) -> int | None:
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            match = [(k, v) for k, v in current.value if getattr(k, "value", None) == str(part)]
            if not match:
                return current.start_mark.line + 1
            key, current = match[0]
            if (
                part == loc[-1]
                and current is not None
                and current.start_mark.line != key.start_mark.line
            ):
                # A nested block: point at its key, where the user looks for it.
                return key.start_mark.line + 1
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(current.value):
                return current.start_mark.line + 1
            current = current.value[part]
        else:
            break
    return current.start_mark.line + 1 if current is not None else None


def _message(error: Any, loc: tuple[Any, ...], model: type[BaseModel] | None) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if close:
            return f"unknown field; did you mean '{close[0]}'?"
        if allowed:
            return f"unknown field; allowed fields: {', '.join(allowed)}"
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        current = _step_into(current, part)
        if current is None:
            return []
    current = _model_in(current)
    return list(current.model_fields) if current is not None else []


def _step_into(annotation: Any, part: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and isinstance(part, str):
        for member in typing.get_args(annotation):  # a tagged union's member, named by its tag
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and part in typing.get_args(tag.annotation):
                return member
    model = _model_in(annotation)
    if model is not None and isinstance(part, str):
        field = model.model_fields.get(part)
        return field.annotation if field else None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, set) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
