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
from collections.abc import Callable, Iterator
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


GENERATORS: dict[str, Callable[[], str]] = {"config": config_reference}

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\w+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.DOTALL)


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        generator = GENERATORS.get(match.group(2))
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
