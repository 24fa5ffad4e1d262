"""Generated README sections, so the documentation cannot drift from the code.

``python -m poolwatch.reference --write README.md`` rewrites every block between
``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``; the test suite fails when
the README differs from what this module generates.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from poolwatch.config import Config


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "PosixPath": "path",
            "Path": "path",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _is_duration(field: FieldInfo) -> bool:
    return any("_parse_duration" in repr(m) for m in field.metadata)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(see below)"
        return f"`{value!r}`" if value not in ([], {}) else "`[]`" if value == [] else "`{}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "—"
    return f"`{field.default}`"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _model_of(arg)
        if inner is not None:
            return inner
    return None


def config_rows(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        type_name = _type_name(annotation)
        if _is_duration(field):
            type_name = "duration"
        yield path, type_name, _default(field), (field.description or "").replace("|", "\\|")
        nested = _model_of(annotation)
        if nested is not None:
            list_like = typing.get_origin(annotation) is list
            dict_like = typing.get_origin(annotation) is dict
            if dict_like:  # a map of models repeats a model documented elsewhere
                continue
            yield from config_rows(nested, f"{path}{'[].' if list_like else '.'}")


def config_reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{path}` | {kind} | {default} | {text} |" for path, kind, default, text in config_rows()]
    return "\n".join(lines)


#: Where each non-PgBouncer family's data comes from (longest matching prefix wins).
_SOURCES = (
    ("pg_stat_activity", "`pg_stat_activity` (client backends)"),
    ("pg_stat_database", "`pg_stat_database`"),
    ("pg_settings", "`pg_settings`"),
    ("pg_connections", "`pg_stat_activity` + `pg_settings`"),
    ("pg_up", "the PostgreSQL collection"),
    ("poolwatch_probe", "`SELECT 1` checks"),
    ("poolwatch_check", "the pool doctor"),
    ("poolwatch_pools", "PgBouncer `SHOW POOLS` (cardinality guard)"),
    ("poolwatch_", "poolwatch itself"),
)

#: Families that exist only after something happened (a failure), so a healthy scrape lacks them.
CONDITIONAL: dict[str, tuple[str, tuple[str, ...], str]] = {
    "poolwatch_probe_failures": (
        "counter",
        ("target", "kind", "database", "reason"),
        "SELECT 1 checks that failed, by reason",
    ),
}


def _source_of(name: str) -> str:
    for prefix, source in _SOURCES:
        if name.startswith(prefix):
            return source
    return ""


def _sample_name(name: str, kind: str) -> str:
    return name + {"counter": "_total", "info": "_info"}.get(kind, "")


def metrics_reference(scraped: Iterable[Any]) -> str:
    """The metrics table: PgBouncer's from the column table (every version), the rest from ``scraped``
    families of a real collection (``prometheus_client`` Metric objects), plus ``CONDITIONAL``."""
    from poolwatch.sources.pgbouncer_columns import metrics_reference as pgbouncer_rows

    rows: dict[str, tuple[str, str, str, str]] = {}
    for row in pgbouncer_rows():
        since = f" (PgBouncer {row.since}+)" if row.since not in ("1.12", "1.8") else ""
        rows[row.name] = (row.type, ", ".join(row.labels), row.help + since, row.source)
    for family in scraped:
        name = _sample_name(family.name, family.type)
        if name.startswith("pgbouncer_") and name in rows:
            continue
        labels: list[str] = []
        for sample in family.samples:
            labels += [k for k in sample.labels if k not in labels and k != "le"]
        labels.sort(key=lambda label: label != "target")  # stable: target first, the rest as scraped
        source = _source_of(name) or ("PgBouncer admin console" if name.startswith("pgbouncer_") else "")
        rows[name] = (family.type, ", ".join(labels), family.documentation, source)
    for base, (kind, labels_, text) in CONDITIONAL.items():
        rows.setdefault(_sample_name(base, kind), (kind, ", ".join(labels_), text, _source_of(base)))
    lines = ["| metric | type | labels | meaning | source |", "|---|---|---|---|---|"]
    for name in sorted(rows, key=lambda n: (not n.startswith("pgbouncer_"), not n.startswith("pg_"), n)):
        kind, labels_text, text, source = rows[name]
        cell = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {kind} | {labels_text} | {cell} | {source} |")
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[], str]] = {"config": config_reference}

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\w+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.DOTALL)


def render(text: str, extra: dict[str, str] | None = None) -> str:
    """``text`` with every generated block rewritten; ``extra`` supplies blocks made elsewhere
    (the metrics table needs a live scrape, which the test suite has)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if extra is not None and name in extra:
            return f"{match.group(1)}{extra[name]}\n{match.group(4)}"
        generator = GENERATORS.get(name)
        if generator is None:
            return match.group(0)
        return f"{match.group(1)}{generator()}\n{match.group(4)}"

    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolwatch.reference")
    parser.add_argument("--write", metavar="README", type=Path, help="rewrite the generated blocks in place")
    parser.add_argument("section", nargs="?", choices=sorted(GENERATORS), help="print one section")
    args = parser.parse_args(argv)
    if args.write:
        original = args.write.read_text(encoding="utf-8")
        updated = render(original)
        if updated != original:
            args.write.write_text(updated, encoding="utf-8")
        return 0
    print(GENERATORS[args.section or "config"]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
