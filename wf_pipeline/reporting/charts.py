"""PNG charts for the run report. Each function takes plain data and returns PNG bytes.

matplotlib's object API (`Figure` without pyplot) is used: no global backend state, no display needed,
safe to call from any thread or from a CLI run on a headless machine.
"""
from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from wf_pipeline.deploy.validate import LatencyResult
from wf_pipeline.reporting.metrics import EpochRecord, PruneRecord

PRUNED_COLOUR = "#d95f02"
DENSE_COLOUR = "#7570b3"
ACCENT = "#1b9e77"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def per_layer_sparsity_chart(torch_sparsity: dict[str, float], onnx_sparsity: dict[str, float] | None = None) -> bytes:
    """Horizontal bars per layer (PyTorch masks), with the sparsity read back from the ONNX file as markers."""
    names = list(torch_sparsity) or list(onnx_sparsity or {})
    height = max(2.5, 0.28 * len(names) + 1.2)
    fig = Figure(figsize=(7.5, height))
    ax = fig.add_subplot()
    positions = list(range(len(names)))
    if torch_sparsity:
        ax.barh(positions, [torch_sparsity[n] for n in names], color=ACCENT, label="PyTorch")
    if onnx_sparsity:
        points = [(i, onnx_sparsity[n]) for i, n in enumerate(names) if n in onnx_sparsity]
        if points:
            ax.scatter([v for _, v in points], [i for i, _ in points], marker="|", s=160, color="black",
                       label="read back from ONNX file", zorder=3)
    ax.set_yticks(positions, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of weights that are zero")
    ax.set_title("Per-layer sparsity", pad=24)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def accuracy_vs_sparsity_chart(results: list[dict[str, Any]], dense_accuracy: float | None) -> bytes:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for method in dict.fromkeys(str(r.get("method", "?")) for r in results):
        rows = sorted((r for r in results if str(r.get("method", "?")) == method), key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=method)
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title("One-shot accuracy vs sparsity (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _timeline(epochs: list[int]) -> list[int]:
    """Epoch numbers made monotonic: a history holding dense training then fine-tuning restarts at 0."""
    out, offset, last = [], 0, None
    for epoch in epochs:
        if last is not None and epoch + offset < last:
            offset = last + 1 - epoch
        out.append(epoch + offset)
        last = out[-1]
    return out


def training_curves_chart(epoch_records: list[EpochRecord], prune_records: list[PruneRecord]) -> bytes:
    """Test and train accuracy and train loss per epoch, sparsity on a second axis, pruning steps as vertical lines."""
    fig = Figure(figsize=(8, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    x = [e + 1 for e in _timeline([r.epoch for r in epoch_records])]
    accuracy = [(xi, r.test_accuracy) for xi, r in zip(x, epoch_records, strict=True) if r.test_accuracy is not None]
    if accuracy:
        ax_acc.plot(*zip(*accuracy, strict=True), marker="o", color=ACCENT, label="test accuracy")
    # measured on the training batches during the epoch (augmented): always there, test accuracy only where
    # evaluation.monitor asks for it (and at the end)
    train = [(xi, r.train_accuracy) for xi, r in zip(x, epoch_records, strict=True) if r.train_accuracy is not None]
    if train:
        ax_acc.plot(*zip(*train, strict=True), marker=".", linestyle="--", color=DENSE_COLOUR, alpha=0.8,
                    label="train accuracy (during the epoch)")
    prune_points = [(p.epoch, p) for p in prune_records]
    for epoch, _ in prune_points:
        ax_acc.axvline(epoch, color=PRUNED_COLOUR, alpha=0.35, linestyle=":")
    after = [(e, p.test_accuracy_after) for e, p in prune_points if p.test_accuracy_after is not None]
    if after:
        ax_acc.scatter(*zip(*after, strict=True), color=PRUNED_COLOUR, marker="v", zorder=3,
                       label="right after a pruning step")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    sparsity = [(xi, r.sparsity) for xi, r in zip(x, epoch_records, strict=True) if r.sparsity is not None]
    if sparsity:
        twin = ax_acc.twinx()
        # "pre": an epoch's record holds the sparsity it was trained at, reached at the epoch's start
        # (first x - 1, first value) draws the first epoch's segment too
        sparsity.insert(0, (sparsity[0][0] - 1, sparsity[0][1]))
        twin.step(*zip(*sparsity, strict=True), where="pre", color="grey", alpha=0.7, label="sparsity")
        twin.set_ylim(0, 1)
        twin.set_ylabel("sparsity")
    ax_acc.legend(fontsize=7, loc="best")
    ax_acc.set_title("Accuracy and sparsity")
    loss = [(xi, r.train_loss) for xi, r in zip(x, epoch_records, strict=True) if r.train_loss is not None]
    if loss:
        ax_loss.plot(*zip(*loss, strict=True), marker=".", color=DENSE_COLOUR)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def latency_distribution_chart(latency: list[LatencyResult]) -> bytes:
    """One panel per batch size: histograms of every timed run, pruned vs dense, with p50 lines."""
    fig = Figure(figsize=(4.2 * len(latency), 3.6))
    axes = fig.subplots(1, len(latency), squeeze=False)[0]
    for ax, entry in zip(axes, latency, strict=True):
        series = [("pruned", entry.pruned, PRUNED_COLOUR), ("dense", entry.dense, DENSE_COLOUR)]
        present = [(label, stats, colour) for label, stats, colour in series if stats and stats.runs_ms]
        all_runs = [v for _, stats, _ in present for v in stats.runs_ms]
        low, high = min(all_runs), max(all_runs)
        bins = 30 if high > low else 1
        for label, stats, colour in present:
            ax.hist(stats.runs_ms, bins=bins, range=(low, high) if high > low else None, alpha=0.55,
                    color=colour, label=f"{label} (p50 {stats.p50:.3f} ms)")
            ax.axvline(stats.p50, color=colour, linestyle="--")
        ratio = entry.ratio_p50
        title = f"batch {entry.batch_size}, {entry.threads} thread(s)"
        ax.set_title(title + (f"\nratio p50 {ratio:.3f}" if ratio is not None else ""), fontsize=9)
        ax.set_xlabel("ms per batch")
        ax.set_ylabel("runs")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def channels_per_layer_chart(layers: list[str], dense: list[int | None], pruned: list[int | None]) -> bytes:
    """Grouped horizontal bars: output channels of every layer in the dense and the pruned model."""
    height = max(2.5, 0.32 * len(layers) + 1.2)
    fig = Figure(figsize=(7.5, height))
    ax = fig.add_subplot()
    positions = list(range(len(layers)))
    bar = 0.4
    ax.barh([p - bar / 2 for p in positions], [d or 0 for d in dense], height=bar, color=DENSE_COLOUR, label="dense")
    ax.barh([p + bar / 2 for p in positions], [q or 0 for q in pruned], height=bar, color=PRUNED_COLOUR, label="pruned")
    ax.set_yticks(positions, layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Channels per layer", pad=24)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def time_split_chart(stages: list[tuple[str, float]]) -> bytes:
    """One stacked horizontal bar: seconds per stage of the run, labelled with their share."""
    fig = Figure(figsize=(8, 1.9))
    ax = fig.add_subplot()
    total = sum(seconds for _, seconds in stages) or 1.0
    colours = [ACCENT, PRUNED_COLOUR, DENSE_COLOUR, "#e7298a", "#66a61e", "#a6761d", "#999999"]
    left = 0.0
    for (label, seconds), colour in zip(stages, colours * 2, strict=False):  # at most 6 stages
        colour = "#bbbbbb" if label == "other" else colour
        ax.barh([0], [seconds], left=left, color=colour, label=f"{label} ({100 * seconds / total:.0f}%)")
        left += seconds
    ax.set_yticks([])
    ax.set_xlim(0, total)
    ax.set_xlabel("seconds")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(stages), 4), fontsize=8, frameon=False)
    return _png(fig)
