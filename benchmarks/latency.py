"""ORT latency and file size: the default dense model vs the same model at 90% sparsity, in one run.

Exports the default ResNet-20 (1x28x28 Fashion-MNIST) dense, prunes a copy to 90% by global
magnitude, exports it with compact storage (the shipped form: bitmask + values, see
wf_pipeline/deploy/sparse_storage.py) and its dense-storage twin, then prints:
  - ONNX Runtime p50/p90 latency per batch size for the dense model, the pruned compact-storage file
    and the pruned dense-storage file, all timed interleaved (alternating single runs) so drift
    cancels; the ratio pruned/dense;
  - every file's size and gzip size, and whether it passes onnx.checker's full check: the dense
    model, the pruned dense-storage twin, the shipped compact file, and the earlier storage (COO
    sparse initializers, int64 linear indices) written from the same twin for comparison;
    the compact/dense-storage ratio (target <= 0.35).
Last stdout line: one JSON object with all figures.

Usage: python benchmarks/latency.py [--quick] [--threads N] [--batch-sizes 1 32] [--keep DIR]
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

from benchmarks._shared import machine_line
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.deploy.latency import measure_interleaved
from wf_pipeline.deploy.ort_session import create_session
from wf_pipeline.deploy.sparse_storage import to_sparse_initializers
from wf_pipeline.errors import WFError

TARGET_RATIO = 0.35


def load_model() -> tuple[torch.nn.Module, str]:
    """The bundled pretrained model; an untrained ResNet-20 of the same shape if the checkpoint is absent."""
    from wf_pipeline.models import load_default_model

    try:
        return load_default_model(), "pretrained default (builtin:resnet20-fmnist)"
    except WFError as exc:
        from wf_pipeline.models import build_model
        from wf_pipeline.recipe.schema import ModelConfig

        print(f"note: {exc.message}; using an untrained ResNet-20 of the same architecture "
              "(latency and sizes depend on shape and sparsity, per-layer sparsity on the weights)")
        torch.manual_seed(0)
        return build_model(ModelConfig(name="resnet20", num_classes=10, in_channels=1)).eval(), "untrained resnet20"


def prune_global_magnitude(model: torch.nn.Module, sparsity: float) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Global magnitude pruning of every conv/linear weight with the project's pruning API."""
    from wf_pipeline.pruning import PruneSettings, prune_step
    from wf_pipeline.pruning.masks import MaskSet
    from wf_pipeline.pruning.selection import select_prunable

    pruned = copy.deepcopy(model)
    params = select_prunable(pruned, [".*"], [])
    masks = MaskSet.dense(params)
    prune_step(pruned, params, masks, sparsity, PruneSettings(method="magnitude"))
    return pruned.eval(), {name: mask.clone() for name, mask in masks.masks.items()}


def gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def passes_full_check(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def write_sparse_initializer_file(dense_storage: Path, out: Path, threshold: float) -> Path:
    """The earlier storage of the same weights, written only to compare sizes (the checker rejects it)."""
    legacy, _ = to_sparse_initializers(onnx.load(str(dense_storage)), threshold)
    out.write_bytes(legacy.SerializeToString())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed runs (about a minute)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--keep", type=Path, default=None, help="write the ONNX files here instead of a temp dir")
    args = parser.parse_args()
    warmup, repeats = (5, 40) if args.quick else (30, 300)

    model, model_source = load_model()
    pruned, masks = prune_global_magnitude(model, args.sparsity)
    sample = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        started = time.perf_counter()
        dense = export_onnx(model, sample, folder / "dense.onnx", sparse_storage=False)
        export_dense_s = time.perf_counter() - started
        started = time.perf_counter()
        sparse = export_onnx(pruned, sample, folder / "pruned.onnx", masks=masks, sparse_storage=True)
        export_sparse_s = time.perf_counter() - started
        assert sparse.dense_path is not None
        legacy = write_sparse_initializer_file(sparse.dense_path, folder / "pruned.sparse_initializers.onnx", 0.5)
        files = {"dense model": dense.path, "pruned, dense storage": sparse.dense_path,
                 "pruned, compact storage (shipped)": sparse.path, "pruned, sparse initializers (earlier)": legacy}
        sizes = {label: {"bytes": path.stat().st_size, "gzip_bytes": gzip_size(path),
                         "full_check": passes_full_check(path)}
                 for label, path in files.items()}

        load_s = {}
        sessions = {}
        timed = (("dense", dense.path), ("pruned_compact_storage", sparse.path),
                 ("pruned_dense_storage", sparse.dense_path))
        for key, path in timed:
            started = time.perf_counter()
            sessions[key] = create_session(path, threads=args.threads)
            load_s[key] = time.perf_counter() - started

        latency = []
        for batch_size in args.batch_sizes:
            batch = torch.randn(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(batch_size)).numpy()
            stats = measure_interleaved(sessions, batch, warmup=warmup, repeats=repeats)
            latency.append({
                "batch_size": batch_size,
                **{f"{key}_p50_ms": s.p50 for key, s in stats.items()},
                **{f"{key}_p90_ms": s.p90 for key, s in stats.items()},
                "ratio_p50_pruned_vs_dense": stats["pruned_compact_storage"].p50 / stats["dense"].p50,
                "ratio_p50_compact_vs_dense_storage":
                    stats["pruned_compact_storage"].p50 / stats["pruned_dense_storage"].p50,
            })

    storage_ratio = sparse.file_bytes / sparse.dense_file_bytes
    legacy_bytes = sizes["pruned, sparse initializers (earlier)"]["bytes"]
    print(f"model: {model_source}; pruned to {args.sparsity:.0%} by global magnitude "
          f"(sparsity matches masks: {sparse.sparsity_matches})")
    print(f"ORT {args.threads} thread(s), {warmup} warm-up + {repeats} timed runs per model, interleaved; "
          f"{machine_line()}")
    for row in latency:
        print(f"batch {row['batch_size']:>3}: dense p50 {row['dense_p50_ms']:.3f} ms | pruned (compact storage) p50 "
              f"{row['pruned_compact_storage_p50_ms']:.3f} ms | pruned (dense storage) p50 "
              f"{row['pruned_dense_storage_p50_ms']:.3f} ms | "
              f"ratio pruned/dense {row['ratio_p50_pruned_vs_dense']:.3f}")
    for label, size in sizes.items():
        check = "passes" if size["full_check"] else "FAILS"
        print(f"{label:>38}: {size['bytes'] / 1e3:8.1f} kB   gzip {size['gzip_bytes'] / 1e3:8.1f} kB   "
              f"full check {check}")
    verdict = "meets" if storage_ratio <= TARGET_RATIO else "MISSES"
    print(f"compact storage / dense storage = {storage_ratio:.3f} ({verdict} the <= {TARGET_RATIO} target); "
          f"compact / dense model file = {sparse.file_bytes / dense.file_bytes:.3f}; "
          f"compact / sparse initializers = {sparse.file_bytes / legacy_bytes:.3f}")
    print(f"export: dense {export_dense_s:.2f} s, sparse {export_sparse_s:.2f} s; "
          f"session load: {', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in load_s.items())}")
    print(json.dumps({
        "benchmark": "latency",
        "quick": args.quick,
        "model": model_source,
        "sparsity": args.sparsity,
        "threads": args.threads,
        "warmup": warmup,
        "repeats": repeats,
        "latency": latency,
        "sizes": sizes,
        "storage_format": sparse.storage_format,
        "compact_to_dense_storage_ratio": storage_ratio,
        "sparse_initializers_to_dense_storage_ratio": legacy_bytes / sparse.dense_file_bytes,
        "compact_to_sparse_initializers_ratio": sparse.file_bytes / legacy_bytes,
        "target_ratio": TARGET_RATIO,
        "meets_target": storage_ratio <= TARGET_RATIO,
        "shipped_passes_full_check": sizes["pruned, compact storage (shipped)"]["full_check"],
        "sparsity_matches": sparse.sparsity_matches,
        "compact_weights": len(sparse.compact_weights),
        "generated_names": sparse.generated_names,
        "export_seconds": {"dense": export_dense_s, "sparse": export_sparse_s},
        "session_load_seconds": load_s,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
