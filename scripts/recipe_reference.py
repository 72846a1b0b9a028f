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


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.extend(rows(annotation, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        args = typing.get_args(annotation)
        kind = " \\| ".join(repr(a) for a in args) if typing.get_origin(annotation) is typing.Literal else _type_name(annotation)
        kind = kind if "\\|" in kind else kind.replace("|", "\\|")
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | `{default!r}` | {description} |")
    return out


if __name__ == "__main__":
    print("| field | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(rows(Recipe)))
