"""Print the recipe reference (every field, its type, default and meaning) as Markdown, from the schema itself."""
from __future__ import annotations

import typing

from pydantic import BaseModel

from wf_pipeline.recipe.schema import Recipe


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("NoneType", "None")


def _is_model(annotation: object) -> bool:
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
        kind = " \\| ".join(repr(a) for a in args) if typing.get_origin(annotation) is typing.Literal else _type_name(annotation)
        kind = kind if "\\|" in kind else kind.replace("|", "\\|")
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | `{default}` | {description} |")
    return out


if __name__ == "__main__":
    print("| field | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(rows(Recipe)))
