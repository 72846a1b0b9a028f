"""The recipe reference (every field, its type, default and meaning) as Markdown, from the schema itself.

    python scripts/recipe_reference.py            # print the table
    python scripts/recipe_reference.py --write    # rewrite the block of docs/recipe-reference.md
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from pydantic import BaseModel

from wf_pipeline.recipe.schema import Recipe


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("NoneType", "None")


def _is_model(annotation: object) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _union_forms(annotation: object) -> list[tuple[str, type[BaseModel]]]:
    """(key suffix, model) for each form of a union such as `Mapping | list[Piece]` (empty otherwise)."""
    forms = []
    for member in typing.get_args(annotation):
        member = typing.get_args(member)[0] if typing.get_origin(member) is typing.Annotated else member
        if _is_model(member):
            forms.append((".", member))
        elif typing.get_origin(member) is list and _is_model(typing.get_args(member)[0]):
            forms.append(("[].", typing.get_args(member)[0]))
    return forms


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if _is_model(annotation):
            out.extend(rows(annotation, key + "."))
            continue
        forms = _union_forms(annotation)
        if forms:
            kinds = " or ".join("a list of pieces" if suffix == "[]." else "a mapping" for suffix, _ in forms)
            out.append(f"| `{key}` | {kinds} | | {(field.description or '').replace('|', chr(92) + '|')} |")
            for suffix, form in forms:
                out.extend(rows(form, key + suffix))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        args = typing.get_args(annotation)
        literal = typing.get_origin(annotation) is typing.Literal
        kind = " \\| ".join(repr(a) for a in args) if literal else _type_name(annotation)
        kind = kind if "\\|" in kind else kind.replace("|", "\\|")
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | `{default}` | {description} |")
    return out


REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def table() -> str:
    return "\n".join(["| field | type | default | meaning |", "|---|---|---|---|", *rows(Recipe)])


def documented_table(path: Path = REFERENCE) -> str:
    """The table between the markers of `path`, as written there."""
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write(path: Path = REFERENCE) -> None:
    documented_table(path)  # the markers must be there
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs="?", const=REFERENCE, type=Path, metavar="PATH",
                        help=f"rewrite the table between the markers of PATH (default {REFERENCE.name} in docs/)")
    args = parser.parse_args()
    if args.write:
        write(args.write)
    else:
        print(table())
