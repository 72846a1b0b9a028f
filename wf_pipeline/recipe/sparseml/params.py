"""Which parameters of a model a SparseML `params` entry names, with SparseML's own matching rules.

SparseML (``get_named_layers_and_params_by_regex``) matches every parameter of every module by its full
name: a plain entry must equal the name, a ``re:`` entry must ``re.match`` it (anchored at the start
only), ``__ALL_PRUNABLE__`` means the weights of all conv/linear layers and ``__ALL__`` every parameter.
An entry that matches nothing is an error there (``params_strict``), and so it is here. wf-pipeline
prunes conv/linear weights only, so what an entry matches beyond them (BatchNorm weights, biases) is
reported rather than silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wf_pipeline.recipe.param_catalog import ModelParams

ALL_PRUNABLE = "__ALL_PRUNABLE__"
ALL = "__ALL__"


@dataclass
class EntryMatch:
    """What one `params` entry selects in the model."""

    entry: str
    prunable: list[str]  # conv/linear weights: pruned by wf-pipeline as by SparseML
    other: list[str]  # matched by SparseML but never pruned by wf-pipeline (norm weights, biases, ...)

    @property
    def explicit(self) -> bool:
        return not self.entry.startswith("re:") and self.entry not in (ALL, ALL_PRUNABLE)


def match_entry(entry: str, model: ModelParams) -> EntryMatch:
    """The parameters a single SparseML `params` entry selects, split into prunable and not."""
    if entry == ALL_PRUNABLE:
        return EntryMatch(entry, model.prunable, [])
    if entry == ALL:
        names = list(model.params)
    elif entry.startswith("re:"):
        pattern = re.compile(entry[3:])
        names = [name for name in model.params if pattern.match(name)]
    else:
        names = [entry] if entry in model.params else []
    return EntryMatch(
        entry,
        [name for name in names if model.params[name].prunable],
        [name for name in names if not model.params[name].prunable],
    )


def entry_pattern(entry: str) -> str:
    """Our `pruning.layers` regex for one SparseML entry: it selects, among conv/linear weights under
    ``re.search`` (what the pruning stage uses), exactly the names SparseML's rule selects."""
    if entry in (ALL, ALL_PRUNABLE):
        return ".*"
    if entry.startswith("re:"):
        flags, body = split_global_flags(entry[3:])
        open_ended = body.endswith(".*") or (body.endswith("$") and not body.endswith("\\$"))
        return flags + f"^(?:{body})" + ("" if open_ended else ".*")
    return f"^{re.escape(entry)}$"


_GLOBAL_FLAGS = re.compile(r"(?:\(\?[aiLmsux]+\))+")


def split_global_flags(body: str) -> tuple[str, str]:
    """('(?i)', 'conv.*') for '(?i)conv.*': Python takes global flags only at the start of a pattern, so a
    pattern wrapped in a group keeps its leading flags in front of the group."""
    match = _GLOBAL_FLAGS.match(body)
    return (match.group(0), body[match.end():]) if match else ("", body)


def describe_names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def layer_patterns(entries: list[str], selected: list[str], model: ModelParams) -> list[str]:
    """Patterns for `entries` that select exactly `selected` among the model's prunable weights.

    The per-entry patterns do by construction; if a corner of regex syntax ever made them differ, the
    exact names are used instead, so the translation never prunes a different set.
    """
    patterns: list[str] = []
    for entry in entries:
        pattern = entry_pattern(entry)
        if pattern not in patterns:
            patterns.append(pattern)
    if ".*" in patterns:
        patterns = [".*"]
    compiled = [re.compile(p) for p in patterns]
    chosen = [name for name in model.prunable if any(p.search(name) for p in compiled)]
    if chosen == [name for name in model.prunable if name in set(selected)]:
        return patterns
    return [f"^{re.escape(name)}$" for name in selected]


def select_with(patterns: list[str], skip: list[str], min_layer_params: int, model: ModelParams) -> list[str]:
    """What the pruning stage will select with these settings (mirrors `select_prunable`)."""
    keep = [re.compile(p) for p in patterns]
    drop = [re.compile(p) for p in skip]
    return [
        name
        for name in model.prunable
        if any(p.search(name) for p in keep)
        and not any(p.search(name) for p in drop)
        and model.params[name].numel >= min_layer_params
    ]
