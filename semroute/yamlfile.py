"""Reading operator YAML files (backends.yaml, rules.yaml, routes.yaml) into checked records.

One path for all of them: the file is parsed, validated against a pydantic model (strict types,
unknown fields refused), and every problem is reported at once as ``file:line: field.path:
what is wrong``, the line found by walking the YAML node tree to the field. Semantic checks a
model cannot express (a regular expression that does not compile, a duplicate name) are raised
from the models' validators as ``ValueError`` and reported the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from semroute.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of the file models: strict types (``"yes"`` is not a bool), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    """The parsed document and its node tree. Raises ConfigError naming the file (and the line
    of a syntax error) when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {exc}") from exc


def load_model(path: Path, model: type[M], what: str) -> M:
    """``path`` read and validated as ``model``; ConfigError lists every problem with its line."""
    data, node = read_yaml(path, what)
    return validate(data, node, model, path, what)


def validate(data: Any, node: yaml.Node | None, model: type[M], path: Path, what: str) -> M:
    """``data`` validated as ``model`` (see ``load_model``)."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = [_problem(error, node, model, path) for error in exc.errors()]
        raise ConfigError(f"{path}: invalid {what}:\n  " + "\n  ".join(problems)) from None


def line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int:
    """The 1-based line of the deepest node on ``loc`` that exists (1 for the document)."""
    line = 1 if node is None else node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(getattr(key, "value", "")) == str(part):
                    line = key.start_mark.line + 1
                    child = value
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _problem(error: Any, node: yaml.Node | None, model: type[BaseModel], path: Path) -> str:
    # pydantic appends validator names (e.g. "function-after[...]") to loc: keep the data path.
    loc = [p for p in error["loc"] if isinstance(p, int) or "[" not in str(p)]
    field = _dotted(loc)
    where = f"{path}:{line_of(node, loc)}: {field or '(top level)'}"
    return f"{where}: {_message(error, loc, model)}"


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: Any, loc: Sequence[str | int], model: type[BaseModel]) -> str:
    kind = error["type"]
    got = error.get("input")
    ctx = error.get("ctx") or {}
    shown = repr(got) if len(repr(got)) <= 64 else repr(got)[:64] + "..."
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        allowed = _allowed(model, loc[:-1])
        return "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return f"must be an integer, got {shown}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number, got {shown}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {shown}"
    if kind in ("string_type", "string_too_short"):
        return f"must be a non-empty string, got {shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {type(got).__name__}"
    if kind in ("list_type", "tuple_type", "too_short"):
        return f"must be a non-empty list, got {shown}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values())) if ctx else "?"
        return f"must be {op} {bound}, got {shown}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _allowed(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names the model accepts at ``loc`` (for "unknown field" messages). A part of
    ``loc`` that is not a field (a key of ``dict[str, Model]``, a list index) stays on the model
    the previous field stepped into."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None) or {}
        info = fields.get(part) if isinstance(part, str) else None
        if info is not None:
            current = _model_in(info.annotation)
    return sorted(getattr(current, "model_fields", None) or {})


def _model_in(annotation: Any) -> Any:
    """The model class inside an annotation such as ``dict[str, M]``, ``list[M]`` or ``M``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
