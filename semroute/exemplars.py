"""Reading and validating exemplar files and route configs.

Exemplar CSVs come in two shapes, told apart by the header:

* labelled: ``text,label`` with an optional ``weight`` column;
* outcomes: ``text`` followed by one column per target, each cell that target's quality score on
  the query (0..1; blank = unknown), like ``../shared/data/llmrouter/train.csv``.

semantic-router (aurelio-labs) route configs (JSON or YAML with ``routes: [{name, utterances}]``)
are read as labelled exemplars so its users can move over.

Every problem is collected (file:line and reason) before anything is raised, so a user fixes a
file in one pass.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from semroute.errors import ConfigError, ExemplarError, RowProblem
from semroute.types import OUT_OF_SCOPE, Exemplar, ExemplarKind, Route, RouteTable, Target
from semroute.yamlfile import StrictModel, line_of, read_yaml, validate

MAX_LABEL_CHARS = 128
_LABELLED_COLUMNS = ({"text", "label"}, {"text", "label", "weight"})

csv.field_size_limit(16 * 1024 * 1024)


@dataclass
class ExemplarSet:
    kind: ExemplarKind
    exemplars: list[Exemplar]
    targets: tuple[str, ...] = ()  # outcome columns, in file order
    warnings: list[str] = field(default_factory=list)
    dropped_duplicates: int = 0

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.exemplars if e.label})


def read_exemplars(paths: Sequence[Path]) -> ExemplarSet:
    """Read and validate exemplar files. Raises ExemplarError listing every bad row."""
    if not paths:
        raise ExemplarError([RowProblem("<arguments>", 0, "no exemplar files given")])
    problems: list[RowProblem] = []
    parts: list[tuple[Path, ExemplarKind, tuple[str, ...], list[Exemplar]]] = []
    targets: tuple[str, ...]
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in {".json", ".yaml", ".yml"}:
            kind, targets, rows = ExemplarKind.LABELLED, (), _read_aurelio(path, problems)
        else:
            kind, targets, rows = _read_csv(path, problems)
        parts.append((path, kind, targets, rows))

    kinds = {kind for _, kind, _, _ in parts}
    if len(kinds) > 1:
        listing = ", ".join(f"{p} ({k.value})" for p, k, _, _ in parts)
        problems.append(RowProblem(str(parts[0][0]), 1, f"mixed exemplar kinds: {listing}"))
    outcome_targets = [(p, t) for p, k, t, _ in parts if k is ExemplarKind.OUTCOMES]
    for path, columns in outcome_targets[1:]:
        if columns != outcome_targets[0][1]:
            problems.append(
                RowProblem(
                    str(path),
                    1,
                    f"target columns {list(columns)} differ from {outcome_targets[0][0]}'s "
                    f"{list(outcome_targets[0][1])}",
                )
            )
    if problems:
        raise ExemplarError(problems)

    kind = parts[0][1]
    rows = [row for _, _, _, part_rows in parts for row in part_rows]
    if not rows:
        raise ExemplarError([RowProblem(str(parts[0][0]), 1, "no exemplar rows")])
    result = ExemplarSet(kind=kind, exemplars=[], targets=parts[0][2])
    _dedupe(rows, result)
    return result


@dataclass(frozen=True)
class CsvTable:
    """A CSV file read the one way semroute reads them: UTF-8 (a BOM allowed), the header's
    names stripped, each record with the line it starts on (quoted fields may span lines),
    blank records left out."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]


def read_csv(path: Path) -> CsvTable:
    """Read ``path``; ExemplarError names file:line when it cannot be read, is not UTF-8 or has
    no header. Every exemplar, test, probe and price file goes through here."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExemplarError([RowProblem(str(path), 0, f"cannot read: {exc.strerror}")]) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ExemplarError([RowProblem(
            str(path), line, f"not UTF-8 (byte {exc.start}); re-save as UTF-8"
        )]) from None
    csv.field_size_limit(16 * 1024 * 1024)  # long prompts are legitimate cells
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise ExemplarError([RowProblem(str(path), 1, "empty file: a header row is needed")])
    rows = [
        (line, cells) for line, cells in _rows_with_lines(reader) if any(c.strip() for c in cells)
    ]
    return CsvTable(path, [h.strip() for h in header], rows)


def _read_csv(
    path: Path, problems: list[RowProblem]
) -> tuple[ExemplarKind, tuple[str, ...], list[Exemplar]]:
    try:
        table = read_csv(path)
    except ExemplarError as exc:
        problems.extend(exc.problems)
        return ExemplarKind.LABELLED, (), []
    header = table.header
    if not header or header[0] != "text":
        problems.append(
            RowProblem(
                str(path),
                1,
                f"header must start with `text` (labelled: `text,label[,weight]`; outcomes: "
                f"`text,<target>,...`), got {','.join(header)!r}",
            )
        )
        return ExemplarKind.LABELLED, (), []
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        problems.append(RowProblem(str(path), 1, f"duplicate column(s) {sorted(dupes)}"))
        return ExemplarKind.LABELLED, (), []
    if set(header) in _LABELLED_COLUMNS:
        return ExemplarKind.LABELLED, (), _labelled_rows(path, header, table.rows, problems)
    if "label" in header:
        problems.append(
            RowProblem(str(path), 1, f"unexpected columns for a labelled file: {header[1:]}")
        )
        return ExemplarKind.LABELLED, (), []
    if len(header) < 2 or any(not h for h in header[1:]):
        problems.append(RowProblem(str(path), 1, "outcome header needs named target columns"))
        return ExemplarKind.OUTCOMES, (), []
    targets = tuple(header[1:])
    return ExemplarKind.OUTCOMES, targets, _outcome_rows(path, targets, table.rows, problems)


def _rows_with_lines(reader: Any) -> Iterable[tuple[int, list[str]]]:
    """(first physical line of the record, cells); quoted fields may span lines."""
    start = reader.line_num + 1
    for cells in reader:
        yield start, cells
        start = reader.line_num + 1


def _labelled_rows(
    path: Path, header: list[str], records: list[tuple[int, list[str]]],
    problems: list[RowProblem],
) -> list[Exemplar]:
    col = {name: i for i, name in enumerate(header)}
    rows: list[Exemplar] = []
    for line, cells in records:
        where = f"{path}:{line}"
        if len(cells) != len(header):
            problems.append(
                RowProblem(str(path), line, f"{len(cells)} columns, header has {len(header)}")
            )
            continue
        text, label = cells[col["text"]], cells[col["label"]].strip()
        bad = _check_text(text) or _check_label(label)
        weight = 1.0
        if not bad and "weight" in col:
            bad, weight = _parse_weight(cells[col["weight"]])
        if bad:
            problems.append(RowProblem(str(path), line, bad))
            continue
        rows.append(Exemplar(text=text.strip(), label=label, weight=weight, source=where))
    return rows


def _outcome_rows(
    path: Path, targets: tuple[str, ...], records: list[tuple[int, list[str]]],
    problems: list[RowProblem],
) -> list[Exemplar]:
    rows: list[Exemplar] = []
    for line, cells in records:
        if len(cells) != len(targets) + 1:
            problems.append(
                RowProblem(str(path), line, f"{len(cells)} columns, header has {len(targets) + 1}")
            )
            continue
        bad = _check_text(cells[0])
        scores: dict[str, float | None] = {}
        for target, cell in zip(targets, cells[1:], strict=True):
            if bad:
                break
            cell = cell.strip()
            if cell == "":
                scores[target] = None
                continue
            try:
                value = float(cell)
            except ValueError:
                bad = f"column {target!r}: {cell[:20]!r} is not a number (expected 0..1 or blank)"
                break
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                bad = f"column {target!r}: score {value} outside 0..1"
                break
            scores[target] = value
        if not bad and all(v is None for v in scores.values()):
            bad = "no target has a score (all cells blank)"
        if bad:
            problems.append(RowProblem(str(path), line, bad))
            continue
        rows.append(Exemplar(text=cells[0].strip(), scores=scores, source=f"{path}:{line}"))
    return rows


def _check_text(text: str) -> str | None:
    if not text.strip():
        return "empty text"
    if "\x00" in text:
        return "text contains a NUL character"
    return None


def _check_label(label: str) -> str | None:
    if not label:
        return "empty label"
    if len(label) > MAX_LABEL_CHARS:
        return f"label longer than {MAX_LABEL_CHARS} characters"
    if any(c.isspace() for c in label) or not label.isprintable():
        return f"label {label!r} contains whitespace or control characters"
    return None


def _parse_weight(cell: str) -> tuple[str | None, float]:
    cell = cell.strip()
    if cell == "":
        return None, 1.0
    try:
        weight = float(cell)
    except ValueError:
        return f"weight {cell!r} is not a number", 1.0
    if not math.isfinite(weight) or weight <= 0:
        return f"weight {weight} must be a positive number", 1.0
    return None, weight


def _read_aurelio(path: Path, problems: list[RowProblem]) -> list[Exemplar]:
    """A semantic-router (aurelio-labs) route config: {routes: [{name, utterances: [...]}]}."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as exc:
        problems.append(RowProblem(str(path), 0, f"cannot read: {exc.strerror}"))
        return []
    except json.JSONDecodeError as exc:
        problems.append(RowProblem(str(path), exc.lineno, f"invalid JSON: {exc.msg}"))
        return []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problems.append(
            RowProblem(str(path), (mark.line + 1) if mark else 0, f"invalid YAML: {exc}")
        )
        return []
    routes = data.get("routes") if isinstance(data, dict) else data
    if not isinstance(routes, list):
        problems.append(
            RowProblem(str(path), 1, "expected `routes:` as a list of {name, utterances}")
        )
        return []
    rows: list[Exemplar] = []
    for i, route in enumerate(routes):
        where = f"routes[{i}]"
        if not isinstance(route, dict) or not isinstance(route.get("name"), str):
            problems.append(RowProblem(str(path), 0, f"{where}: needs a string `name`"))
            continue
        name = route["name"].strip()
        bad = _check_label(name)
        utterances = route.get("utterances")
        if bad or not isinstance(utterances, list):
            problems.append(
                RowProblem(str(path), 0, f"{where}: {bad or 'needs a list `utterances`'}")
            )
            continue
        for j, utterance in enumerate(utterances):
            if not isinstance(utterance, str) or _check_text(utterance):
                problems.append(
                    RowProblem(str(path), 0, f"{where}.utterances[{j}]: empty or not a string")
                )
                continue
            rows.append(
                Exemplar(
                    text=utterance.strip(), label=name, source=f"{path}:{where}.utterances[{j}]"
                )
            )
    return rows


def _dedupe(rows: list[Exemplar], result: ExemplarSet) -> None:
    """Drop exact duplicates; warn (keep both) when the same text carries different labels."""
    seen: dict[tuple[str, str, tuple[Any, ...]], Exemplar] = {}
    by_text: dict[str, Exemplar] = {}
    for row in rows:
        key = (row.text, row.label, tuple(sorted(row.scores.items())))
        if key in seen:
            result.dropped_duplicates += 1
            continue
        seen[key] = row
        first = by_text.get(row.text)
        if first is not None and first.label != row.label:
            result.warnings.append(
                f"{row.source}: same text as {first.source} but label {row.label!r} vs "
                f"{first.label!r}"
            )
        elif first is not None:
            result.warnings.append(f"{row.source}: same text as {first.source} with other scores")
        else:
            by_text[row.text] = row
        result.exemplars.append(row)
    if result.dropped_duplicates:
        result.warnings.append(f"dropped {result.dropped_duplicates} exact duplicate row(s)")


# ---- routes and targets ------------------------------------------------------------------------


def load_route_table(
    routes_file: Path | None,
    labels: Sequence[str],
    targets_file: Path | None = None,
    *,
    outcome_targets: Sequence[str] = (),
    default_route: str | None = None,
) -> RouteTable:
    """The route table for an exemplar set.

    Without a routes file every label (or outcome target) is its own route and target and no
    threshold applies; a labelled set also gets ``default_route`` (its own target, unless a
    label has that name) to fall back to once thresholds are calibrated. Exemplars labelled
    ``oos`` (``types.OUT_OF_SCOPE``) are out-of-scope examples, never a route; they need a
    default route. ``targets_file`` (a CSV
    like llmrouter/models.csv) sets or overrides target prices. Raises ConfigError naming the file and field.
    """
    targets: dict[str, Target] = {}
    routes: dict[str, Route] = {}
    fallback: str | None = None
    threshold: float | None = None
    if routes_file is not None:
        routes, targets, fallback, threshold = _parse_routes_yaml(routes_file)
    if targets_file is not None:
        for name, target in read_targets_csv(targets_file).items():
            local = targets[name].local if name in targets else target.local
            targets[name] = Target(name, target.input_cost, target.output_cost, local)

    if outcome_targets:
        for name in outcome_targets:
            targets.setdefault(name, Target(name))
            routes.setdefault(name, Route(name, (name,)))
    elif routes_file is None:
        for label in labels:
            if label == OUT_OF_SCOPE:
                continue
            targets.setdefault(label, Target(label))
            routes[label] = Route(label, (label,))
        if default_route:
            targets.setdefault(default_route, Target(default_route))
            routes.setdefault(default_route, Route(default_route, (default_route,)))
            fallback = default_route
    else:
        if OUT_OF_SCOPE in routes:
            raise ConfigError(
                f"{routes_file}: routes: {OUT_OF_SCOPE!r} is reserved for out-of-scope "
                "exemplars (they fall back to the default route); rename that route"
            )
        first_missing = [
            label for label in labels if label not in routes and label != OUT_OF_SCOPE
        ]
        if first_missing:
            raise ConfigError(
                f"{routes_file}: routes: exemplar label(s) {first_missing[:10]} have no route; "
                "add them under `routes:` or fix the labels"
            )
    if OUT_OF_SCOPE in labels and not outcome_targets and fallback is None:
        where = f"{routes_file}: " if routes_file is not None else ""
        raise ConfigError(
            f"{where}exemplars labelled {OUT_OF_SCOPE!r} are out-of-scope examples and need a "
            "default route to fall back to: set `default:` in the routes file"
            + ("" if routes_file is not None else " or pass --default-route NAME")
        )
    return RouteTable(
        routes=routes, targets=targets, default_route=fallback, threshold=threshold
    )


class _TargetSpec(StrictModel):
    input_cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    output_cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    local: bool = False
    description: str = ""


class _RouteSpec(StrictModel):
    targets: list[str] = Field(min_length=1)
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    description: str = ""


class _RoutesFile(StrictModel):
    version: Literal[1] = 1
    default: str | None = None
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    targets: dict[str, _TargetSpec | None] = Field(default_factory=dict)
    routes: dict[str, _RouteSpec] = Field(min_length=1)


def _parse_routes_yaml(
    path: Path,
) -> tuple[dict[str, Route], dict[str, Target], str | None, float | None]:
    """routes.yaml checked through ``semroute.yamlfile`` (every problem as file:line: field),
    then the cross-references: route names, each route's targets, the default route."""
    data, node = read_yaml(path, "routes file")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}:1: top level must be a mapping with `routes` and `targets`")
    spec = validate(data, node, _RoutesFile, path, "routes file")
    targets = {
        name: Target(name, t.input_cost, t.output_cost, t.local) if t else Target(name)
        for name, t in spec.targets.items()
    }
    problems: list[str] = []
    for name, route in spec.routes.items():
        bad_name = _check_label(name)
        if bad_name:
            problems.append(f"{path}:{line_of(node, ['routes', name])}: routes.{name}: {bad_name}")
        for i, target in enumerate(route.targets):
            if target not in targets:
                where = line_of(node, ["routes", name, "targets", i])
                problems.append(
                    f"{path}:{where}: routes.{name}.targets[{i}]: unknown target {target!r}; "
                    "define it under `targets:`"
                )
    if spec.default is not None and spec.default not in spec.routes:
        problems.append(
            f"{path}:{line_of(node, ['default'])}: default: {spec.default!r} is not one of the "
            "routes"
        )
    if problems:
        raise ConfigError(f"{path}: invalid routes file:\n  " + "\n  ".join(problems))
    routes = {
        name: Route(name, tuple(r.targets), r.threshold, r.description)
        for name, r in spec.routes.items()
    }
    return routes, targets, spec.default, spec.threshold


def read_targets_csv(path: Path) -> dict[str, Target]:
    """Targets and prices from a CSV: ``model,input_usd_per_1m_tokens,output_usd_per_1m_tokens``
    (extra columns ignored; an optional ``local`` column takes true/false)."""
    try:
        table = read_csv(path)
    except ExemplarError as exc:
        raise ConfigError(f"targets file {exc.problems[0]}") from exc
    needed = {"model", "input_usd_per_1m_tokens", "output_usd_per_1m_tokens"}
    if not needed <= set(table.header):
        raise ConfigError(f"{path}:1: header must include {sorted(needed)}")
    targets: dict[str, Target] = {}
    for line, cells in table.rows:
        row = dict(zip(table.header, cells, strict=False))
        try:
            costs = [float(row[c]) for c in ("input_usd_per_1m_tokens", "output_usd_per_1m_tokens")]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}:{line}: prices must be numbers") from exc
        if any(c < 0 or not math.isfinite(c) for c in costs):
            raise ConfigError(f"{path}:{line}: prices must be >= 0")
        local = str(row.get("local") or "").strip().lower() in {"1", "true", "yes"}
        name = (row["model"] or "").strip()
        if not name:
            raise ConfigError(f"{path}:{line}: empty model name")
        targets[name] = Target(name, costs[0], costs[1], local)
    return targets


def read_targets(path: Path) -> dict[str, Target]:
    """Targets from either a routes YAML or a prices CSV."""
    if path.suffix.lower() in {".yaml", ".yml"}:
        return _parse_routes_yaml(path)[1]
    return read_targets_csv(path)
