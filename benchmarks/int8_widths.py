"""Which widths suit ONNX Runtime's INT8 convolutions: one 3x3 conv pair per width, FP32 vs INT8, interleaved.

Why the structured ResNet-20 gained little from INT8: its first stage was pruned to 8 channels, and
ONNX Runtime's fast x86 INT8 convolution (MLAS's symmetric indirect conv) needs at least 16 output
channels; below that the generic INT8 path runs, slower than FP32. Above it, INT8 time grows with the
input channels while output channels are computed in blocks (64 on AVX-512 VNNI), so the INT8 gain
over FP32 grows with width. This script measures that on the machine it runs on:

* per width c: two c->c 3x3 convs (+ReLU) at 28x28 (the first stage of the Fashion-MNIST ResNet-20),
  FP32 and INT8 (static QDQ, per-channel symmetric weights, uint8 activations, the pipeline's own
  quantizer), p50 per conv at batch 32 and 1, 1 intra-op thread, every model timed interleaved;
* the same at width 16 with int8 (symmetric) activations, the other activation type ORT offers;
* the floor for a channel-pruned ResNet-20 (Fashion-MNIST, 28x28) in INT8: the network with every width
  at 16, the narrowest the fast INT8 kernel takes, against the dense network, FP32 and INT8.

    python benchmarks/int8_widths.py            # widths 4..64, 28x28
    python benchmarks/int8_widths.py --quick    # fewer widths and rounds
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import wf_pipeline  # noqa: E402,F401  - first: it sets OMP_WAIT_POLICY before torch loads
from benchmarks._shared import log, machine, set_threads  # noqa: E402


def conv_pair_files(width: int, size: int, work: Path, activations: str) -> tuple[Path, Path]:
    import torch
    from torch import nn

    from wf_pipeline.deploy.export import export_onnx
    from wf_pipeline.deploy.quantize import quantize_model
    from wf_pipeline.recipe.schema import QuantizeConfig

    torch.manual_seed(width)
    model = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())
    fp32 = export_onnx(model.eval(), torch.zeros(2, width, size, size), work / f"c{width}.onnx",
                       sparse_storage=False).path
    rng = np.random.default_rng(width)
    calibration = [rng.standard_normal((16, width, size, size)).astype(np.float32) for _ in range(2)]
    cfg = QuantizeConfig(enabled=True, activations=activations, slow_int8_convs="int8")
    int8 = quantize_model(fp32, work / f"c{width}.{activations}.onnx", calibration, cfg).path
    return fp32, int8


def narrow_resnet20_files(work: Path) -> dict[str, Path]:
    """Dense ResNet-20 and the same network with every conv 16 wide, each FP32 and INT8 (random weights)."""
    import torch

    from wf_pipeline.deploy.export import export_onnx
    from wf_pipeline.deploy.quantize import quantize_model
    from wf_pipeline.models.cifar_resnet import resnet20
    from wf_pipeline.recipe.schema import QuantizeConfig

    files = {}
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((32, 1, 28, 28)).astype(np.float32) for _ in range(2)]
    for label, stage_widths in (("dense", (16, 32, 64)), ("all widths 16", (16, 16, 16))):
        torch.manual_seed(0)
        model = resnet20(num_classes=10, in_channels=1)
        model.layer2, model.layer3 = (_stage(16 if i == 0 else stage_widths[i], stage_widths[i + 1])
                                      for i in range(2))
        model.fc = torch.nn.Linear(stage_widths[2], 10)
        fp32 = export_onnx(model.eval(), torch.zeros(2, 1, 28, 28), work / f"resnet20-{label[:3]}.onnx",
                           sparse_storage=False).path
        files[f"ResNet-20 {label} FP32"] = fp32
        files[f"ResNet-20 {label} INT8"] = quantize_model(fp32, fp32.with_suffix(".int8.onnx"), calibration,
                                                          QuantizeConfig(enabled=True)).path
    return files


def _stage(in_planes: int, planes: int):
    from torch import nn

    from wf_pipeline.models.cifar_resnet import BasicBlock

    return nn.Sequential(BasicBlock(in_planes, planes, 2), BasicBlock(planes, planes, 1), BasicBlock(planes, planes, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=28, help="image side of the feature map")
    args = parser.parse_args()
    set_threads(1)
    from wf_pipeline.deploy.latency import measure_interleaved
    from wf_pipeline.deploy.ort_session import create_session

    started = time.perf_counter()
    widths = [8, 16, 32, 48] if args.quick else [4, 8, 12, 16, 24, 32, 48, 64]
    rounds = {32: 10 if args.quick else 40, 1: 30 if args.quick else 200}
    work = Path(tempfile.mkdtemp(prefix="wf-int8-widths-"))
    files: dict[str, Path] = {}
    for width in widths:
        files[f"{width} FP32"], files[f"{width} INT8"] = conv_pair_files(width, args.size, work, "uint8")
    _, files["16 INT8 s8s8"] = conv_pair_files(16, args.size, work, "int8")
    results: dict[str, dict[str, float]] = {name: {} for name in files}
    for batch in (32, 1):
        log(f"[int8-widths] batch {batch}: {len(files)} models interleaved")
        # One session per model; inputs differ in width, so each model is timed with its own input in turn.
        sessions = {name: create_session(path, threads=1) for name, path in files.items()}
        for name in files:
            width = int(name.split()[0])
            x = np.random.default_rng(0).standard_normal((batch, width, args.size, args.size)).astype(np.float32)
            partner = name.replace("INT8 s8s8", "FP32").replace("INT8", "FP32") if "INT8" in name else None
            group = {name: sessions[name]} if partner is None else {name: sessions[name], partner: sessions[partner]}
            stats = measure_interleaved(group, x, warmup=3, repeats=rounds[batch])
            results[name][f"batch_{batch}_ms_per_conv"] = stats[name].p50 / 2
    rows = []
    for width in widths:
        fp32, int8 = results[f"{width} FP32"], results[f"{width} INT8"]
        rows.append({"width": width, **{f"fp32_{k}": v for k, v in fp32.items()},
                     **{f"int8_{k}": v for k, v in int8.items()},
                     "int8_over_fp32_b32": int8["batch_32_ms_per_conv"] / fp32["batch_32_ms_per_conv"],
                     "int8_over_fp32_b1": int8["batch_1_ms_per_conv"] / fp32["batch_1_ms_per_conv"]})
    print("| width | FP32 ms/conv b32 | INT8 ms/conv b32 | INT8/FP32 b32 | INT8/FP32 b1 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['fp32_batch_32_ms_per_conv']:.3f} | {r['int8_batch_32_ms_per_conv']:.3f} "
              f"| {r['int8_over_fp32_b32']:.2f} | {r['int8_over_fp32_b1']:.2f} |")
    floor = narrow_resnet20_files(work)
    floor_ms: dict[str, dict[int, float]] = {name: {} for name in floor}
    for batch in (32, 1):
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        stats = measure_interleaved({n: create_session(p, threads=1) for n, p in floor.items()}, x, warmup=3,
                                    repeats=rounds[batch])
        for name, stat in stats.items():
            floor_ms[name][batch] = stat.p50
    dense = floor_ms["ResNet-20 dense FP32"]
    floor_ratios = {name: {str(b): ms[b] / dense[b] for b in ms} for name, ms in floor_ms.items()}
    for name, ratios in floor_ratios.items():
        print(f"{name}: {ratios['32']:.3f}x dense FP32 at batch 32, {ratios['1']:.3f}x at batch 1")
    s8 = results["16 INT8 s8s8"]["batch_32_ms_per_conv"]
    u8 = results["16 INT8"]["batch_32_ms_per_conv"]
    print(f"width 16, int8 activations (s8s8) vs uint8 (u8s8) at batch 32: {s8 / u8:.2f}x")
    print(json.dumps({"benchmark": "int8_widths", "quick": args.quick, "size": args.size, "machine": machine(),
                      "seconds": round(time.perf_counter() - started, 1), "rows": rows,
                      "s8s8_over_u8s8_width16_b32": s8 / u8, "resnet20_floor_ratios": floor_ratios}))


if __name__ == "__main__":
    main()
