"""Speed of the block-diagonal inverse Fisher: fast GEMM route vs the rank-one Woodbury recursion.

Layers are those of the bundled ResNet-20 (1×28×28 input, d ≈ 270k prunable weights), N gradients,
block size B. Measured in one run on this machine:

* the fast route (batched GEMM accumulation of GᵀG per block + batched Cholesky inversion), in a
  fresh subprocess so its peak memory (VmHWM, reset after imports) can be read,
* the rank-one Woodbury recursion over the same gradients (``--quick``: all blocks but a tenth of
  the gradients, the time extrapolated linearly in N, and said so),
* their ratio, and the fraction of this machine's GEMM peak (a large ``torch.mm``, same run) that
  the fast route reaches on its essential FLOPs ``K·(2·N·B² + B³)``,
* agreement of both routes with an fp64 reference on a subset of blocks,
* the whole WoodFisher pruning step of the bundled ResNet-20 (gradients, inverse, OBS).

The route timings use synthetic Gaussian gradient chunks, generated outside the timed region (they
are identical inputs for both routes); the pruning step uses real per-sample gradients.
Ends with one JSON object on the last line of stdout.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads; export it to override): with GNU
OpenMP's default spin-waiting, 2-thread PyTorch runs 10-100x slower on this shared 2-core machine
whenever another process holds a core (measured: 200 ResNet-20 per-sample gradients 9.6 s vs 0.55 s).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any

import torch  # noqa: E402

from benchmarks._shared import load_average, set_threads  # noqa: E402

ROUTE_SEED = 1234


# ----------------------------------------------------------------------------- helpers
def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes, or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs '5'); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def gemm_peak_gflops(size: int, repeats: int) -> float:
    """Best-of-`repeats` fp32 GEMM throughput of a square torch.mm."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def resnet20_layer_sizes() -> tuple[list[int], int, str]:
    """Prunable layer sizes, total model bytes (params + buffers) and where the model came from."""
    from wf_pipeline.pruning.selection import select_prunable

    model, source = load_bundled_model()
    params = select_prunable(model, [".*"], [])
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return [p.numel() for p in params.values()], model_bytes, source


def load_bundled_model() -> tuple[torch.nn.Module, str]:
    try:
        from wf_pipeline.models import load_default_model

        return load_default_model(), "bundled pretrained ResNet-20 (Fashion-MNIST)"
    except Exception as exc:  # the checkpoint may not be shipped yet: same shapes, random weights
        from wf_pipeline.models.cifar_resnet import resnet20

        torch.manual_seed(0)
        model = resnet20(num_classes=10, in_channels=1).eval()
        return model, f"random-init ResNet-20 (bundled model unavailable: {exc})"


def blocked_chunks(layout: Any, num_grads: int, chunk_size: int, blocks: int | None = None) -> Iterator[torch.Tensor]:
    """Deterministic synthetic block-major gradient chunks (K, n, B); zero at padded coordinates."""
    valid = layout.valid().unsqueeze(1)  # (K, 1, B)
    k = layout.num_blocks if blocks is None else blocks
    done = 0
    while done < num_grads:
        n = min(chunk_size, num_grads - done)
        g = torch.Generator().manual_seed(ROUTE_SEED + done)
        chunk = torch.randn(layout.num_blocks, n, layout.block_size, generator=g).mul_(1e-2)
        chunk.mul_(valid)
        yield chunk[:k].contiguous() if blocks is not None else chunk
        del chunk
        done += n


# ----------------------------------------------------------------------------- fast route (child)
def run_fast_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: time the fast route and report its peak memory as JSON."""
    from wf_pipeline.fisher.inverse import BlockGramAccumulator, BlockLayout

    set_threads(args.threads)
    reset_ok = reset_peak_rss()
    baseline = proc_status_bytes("VmRSS") or 0
    sizes = json.loads(args.sizes)
    layout = BlockLayout(sizes, args.block_size)
    runs = []
    for _ in range(args.repeats):
        acc = BlockGramAccumulator(layout)
        accumulate = 0.0
        for chunk in blocked_chunks(layout, args.num_grads, args.chunk_size):
            t0 = time.perf_counter()
            acc.add_blocked(chunk)
            accumulate += time.perf_counter() - t0
            del chunk
        t0 = time.perf_counter()
        inverse = acc.inverse(args.damp)
        invert = time.perf_counter() - t0
        runs.append({"accumulate_s": accumulate, "invert_s": invert, "total_s": accumulate + invert,
                     "repaired_blocks": inverse.repaired_blocks})
        del acc, inverse
    peak = proc_status_bytes("VmHWM") or 0
    print(json.dumps({"runs": runs, "peak_bytes": peak - baseline if reset_ok else None,
                      "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "peak_reset": reset_ok}))


def run_fast_route(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-fast", "--sizes", json.dumps(sizes),
           "--num-grads", str(args.num_grads), "--block-size", str(args.block_size),
           "--chunk-size", str(args.chunk_size), "--damp", str(args.damp), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- woodbury route
def run_woodbury_route(
    args: argparse.Namespace, layout: Any, blocks: int, num_grads: int | None = None
) -> tuple[float, torch.Tensor]:
    """Time the rank-one recursion over the first `blocks` blocks (N gradients unless `num_grads`)."""
    from wf_pipeline.fisher.inverse import BlockLayout, WoodburyAccumulator

    n = num_grads or args.num_grads
    sub_layout = BlockLayout([blocks * layout.block_size], layout.block_size)
    acc = WoodburyAccumulator(sub_layout, args.damp, n)
    elapsed = 0.0
    for chunk in blocked_chunks(layout, n, args.chunk_size, blocks=blocks):
        t0 = time.perf_counter()
        acc.add_blocked(chunk)
        elapsed += time.perf_counter() - t0
    return elapsed, acc.inverse().blocks


def best_woodbury_threads(args: argparse.Namespace, layout: Any) -> int:
    """The rank-one route is matrix-vector bound: give it whichever thread count is faster here."""
    from wf_pipeline.fisher.parallel import torch_threads

    timings = {}
    for threads in sorted({1, args.threads}):
        with torch_threads(threads):
            timings[threads] = run_woodbury_route(args, layout, min(layout.num_blocks, 256), num_grads=50)[0]
    return min(timings, key=timings.__getitem__)


def reference_blocks(args: argparse.Namespace, layout: Any, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of the first `blocks` dampened Fisher blocks, via the fast accumulator in `dtype`."""
    from wf_pipeline.fisher.inverse import BlockGramAccumulator, BlockLayout

    acc = BlockGramAccumulator(BlockLayout([blocks * layout.block_size], layout.block_size), dtype=dtype)
    for chunk in blocked_chunks(layout, args.num_grads, args.chunk_size, blocks=blocks):
        acc.add_blocked(chunk)
    return acc.inverse(args.damp).blocks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- pruning step
def fisher_pool(model_source: str, in_shape: tuple[int, ...]) -> tuple[Any, str]:
    try:
        from wf_pipeline.data import build_data
        from wf_pipeline.recipe.schema import DataConfig

        bundle = build_data(DataConfig(dataset="fashion_mnist", augment=False, fisher_pool=5000), seed=0)
        return bundle.fisher_batches(batch_size=100), "Fashion-MNIST Fisher pool (5000 training images)"
    except Exception as exc:
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(2000, *in_shape, generator=g)
        ys = torch.randint(0, 10, (2000,), generator=g)
        return ((lambda: [(xs[i : i + 100], ys[i : i + 100]) for i in range(0, 2000, 100)]),
                f"random inputs (data unavailable: {exc})")


def run_pruning_step(args: argparse.Namespace) -> dict[str, Any]:
    from wf_pipeline.pruning import MaskSet, PruneSettings, prune_step, select_prunable

    model, model_source = load_bundled_model()
    batches, data_source = fisher_pool(model_source, (1, 28, 28))
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    settings = PruneSettings(method="woodfisher", num_grads=args.num_grads, block_size=args.block_size,
                             chunk_size=args.chunk_size, damp=args.damp)
    report = prune_step(model, params, masks, args.sparsity, settings, batches)
    return {"model": model_source, "data": data_source, "sparsity": report.achieved_sparsity,
            "timings_s": report.timings, "predicted_loss_increase": report.predicted_loss_increase}


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="rank-one route on a tenth of the gradients, extrapolated")
    parser.add_argument("--num-grads", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--sparsity", type=float, default=0.5, help="target of the whole pruning step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=None, help="fast-route repetitions (best is reported)")
    parser.add_argument("--check-blocks", type=int, default=64, help="blocks compared against the fp64 reference")
    parser.add_argument("--child-fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.child_fast:
        run_fast_child(args)
        return
    set_threads(args.threads)
    from wf_pipeline.fisher.inverse import BlockLayout

    print(f"fisher_speed: {'quick' if args.quick else 'full'} run, {args.threads} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    load = load_average()
    print(f"  load average at start: {load:.2f} (the CPU is shared; timings move with it)")
    peak = gemm_peak_gflops(2048 if args.quick else 4096, 3 if args.quick else 5)
    print(f"GEMM peak (torch.mm fp32): {peak:.1f} GFLOP/s")

    sizes, model_bytes, model_source = resnet20_layer_sizes()
    layout = BlockLayout(sizes, args.block_size)
    N, B, K = args.num_grads, args.block_size, layout.num_blocks
    print(f"layers: {model_source}; d = {layout.dim} weights in {len(sizes)} layers, K = {K} blocks of B = {B}, "
          f"N = {N}")

    fast = run_fast_route(args, sizes)
    best = min(fast["runs"], key=lambda r: r["total_s"])
    flops = K * (2 * N * B * B + B**3)
    roofline_s = flops / (peak * 1e9)
    fraction = roofline_s / best["total_s"]
    print(f"fast route: {best['total_s']:.3f} s (accumulate {best['accumulate_s']:.3f} s at "
          f"{2 * N * B * B * K / best['accumulate_s'] / 1e9:.1f} GFLOP/s, invert {best['invert_s']:.3f} s); "
          f"runs: {[round(r['total_s'], 3) for r in fast['runs']]}")
    print(f"  GEMM roofline for K(2NB²+B³) = {flops / 1e9:.1f} GFLOP: {roofline_s:.3f} s -> "
          f"{fraction:.0%} of peak ({best['total_s'] / roofline_s:.2f}x the roofline; target <= 2x)")

    chunk_bytes = args.chunk_size * layout.padded_dim * 4
    buffer_bytes = layout.padded_dim * B * 4
    target_bytes = 1.3 * (buffer_bytes + model_bytes + chunk_bytes)
    if fast["peak_bytes"] is not None:
        print(f"  peak memory above baseline: {fast['peak_bytes'] / 2**20:.1f} MiB vs target "
              f"1.3 x (d·B·4 {buffer_bytes / 2**20:.1f} + model {model_bytes / 2**20:.1f} + chunk "
              f"{chunk_bytes / 2**20:.1f} MiB) = {target_bytes / 2**20:.1f} MiB")
    else:
        print("  peak memory: VmHWM could not be reset in this environment; not measured")

    from wf_pipeline.fisher.parallel import torch_threads

    wood_threads = best_woodbury_threads(args, layout)
    # --quick: all K blocks (so the K·B·B working set, and its cache behaviour, is the full run's) but
    # a tenth of the gradients; the recursion's cost is exactly linear in N.
    wood_grads = max(50, N // 10) if args.quick else N
    with torch_threads(wood_threads):
        wood_s, wood_inv = run_woodbury_route(args, layout, K, num_grads=wood_grads)
    wood_total = wood_s * N / wood_grads
    extrapolated = wood_grads < N
    note = (f" (measured with {wood_grads} of {N} gradients on all blocks, extrapolated linearly in N)"
            if extrapolated else "")
    speedup = wood_total / best["total_s"]
    print(f"rank-one Woodbury route ({wood_threads} thread(s), the faster here): {wood_total:.2f} s{note}; "
          f"{2 * 2 * N * B * B * K / wood_total / 1e9:.2f} GFLOP/s")
    print(f"  speed-up fast vs rank-one: {speedup:.0f}x (target >= 50x)")

    check = min(K, args.check_blocks)
    if extrapolated:  # the agreement check needs the recursion over all N gradients
        with torch_threads(wood_threads):
            wood_inv = run_woodbury_route(args, layout, check)[1]
    ref = reference_blocks(args, layout, check, torch.float64)
    fast32 = reference_blocks(args, layout, check, torch.float32)
    err_fast = rel_err(fast32, ref)
    err_wood = rel_err(wood_inv[:check], ref)
    print(f"  agreement with the fp64 inverse on {check} blocks (λ={args.damp}): fast fp32 {err_fast:.2e}, "
          f"rank-one fp32 {err_wood:.2e}")

    step = run_pruning_step(args)
    t = step["timings_s"]
    print(f"whole WoodFisher pruning step ({step['model']}; {step['data']}), N={N}, to {step['sparsity']:.2f}: "
          f"total {t['total']:.2f} s = gradients {t['gradients']:.2f} + inverse {t['inverse']:.2f} "
          f"(of which accumulating GᵀG {t.get('accumulate', 0.0):.2f}) + OBS {t['obs']:.2f}")

    result = {
        "benchmark": "fisher_speed",
        "mode": "quick" if args.quick else "full",
        "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load,
        "d": layout.dim, "num_blocks": K, "block_size": B, "num_grads": N, "damp": args.damp,
        "layers_from": model_source,
        "gemm_peak_gflops": peak,
        "fast_s": best["total_s"], "fast_accumulate_s": best["accumulate_s"], "fast_invert_s": best["invert_s"],
        "fast_runs_s": [r["total_s"] for r in fast["runs"]],
        "roofline_s": roofline_s, "fraction_of_gemm_peak": fraction, "x_roofline": best["total_s"] / roofline_s,
        "woodbury_s": wood_total, "woodbury_threads": wood_threads, "woodbury_extrapolated": extrapolated,
        "woodbury_grads_measured": wood_grads,
        "speedup_vs_rank_one": speedup,
        "peak_bytes": fast["peak_bytes"], "peak_target_bytes": target_bytes,
        "peak_within_target": None if fast["peak_bytes"] is None else fast["peak_bytes"] <= target_bytes,
        "rel_err_fast_fp32_vs_fp64": err_fast, "rel_err_rank_one_fp32_vs_fp64": err_wood,
        "pruning_step": step,
        "targets": {"speedup_ge_50": speedup >= 50, "within_2x_roofline": best["total_s"] <= 2 * roofline_s},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
