"""Every loader on small data: datasets from local files, models by name, weights from local files."""
from __future__ import annotations

import gzip
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wf_pipeline.data import build_data
from wf_pipeline.data.sources import DEBIAN_FASHION_MNIST, FASHION_FILES
from wf_pipeline.errors import WFError
from wf_pipeline.models import build_model
from wf_pipeline.recipe.schema import DataConfig, ModelConfig


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n_train: int = 60, n_test: int = 20) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_reads_debian_layout_gz_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WF_PIPELINE_CACHE", str(tmp_path / "cache"))
    _fake_fashion(tmp_path / "fm")
    config = DataConfig(dataset="fashion_mnist", root=str(tmp_path / "fm"), fisher_pool=30, batch_size=16)
    data = build_data(config, seed=3)
    assert data.test_split is not None and data.fisher_split is not None
    assert (data.num_train, len(data.test_split), len(data.fisher_split)) == (60, 20, 30)
    assert data.in_channels == 1 and data.image_size == 28 and data.num_classes == 10
    x, y = next(iter(data.train_batches(0)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long


def test_fashion_mnist_missing_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WFError, match="data.root"):
        build_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / f"{FASHION_FILES[0]}.gz").exists(),
                    reason="Debian dataset not installed")
def test_fashion_mnist_debian_package_full_size() -> None:
    data = build_data(DataConfig(dataset="fashion_mnist", fisher_pool=1000), seed=0)
    assert data.test_split is not None and data.fisher_split is not None
    assert data.num_train == 60_000 and len(data.test_split) == 10_000 and len(data.fisher_split) == 1000


def test_splits_are_deterministic_and_fisher_pool_is_training_data() -> None:
    a = build_data(DataConfig(dataset="digits", fisher_pool=100), seed=5)
    b = build_data(DataConfig(dataset="digits", fisher_pool=100), seed=5)
    assert a.fisher_split is not None and b.fisher_split is not None
    assert a.test_split is not None and a.train_split is not None
    assert torch.equal(a.fisher_split.images, b.fisher_split.images)
    xa, _ = next(iter(a.train_batches(2)))
    xb, _ = next(iter(b.train_batches(2)))
    assert torch.equal(xa, xb)
    # The Fisher pool never contains test images.
    test_rows = {bytes(img.numpy().tobytes()) for img in a.test_split.images}
    train_rows = {bytes(img.numpy().tobytes()) for img in a.train_split.images}
    fisher_rows = {bytes(img.numpy().tobytes()) for img in a.fisher_split.images}
    assert fisher_rows <= train_rows
    assert len(fisher_rows & (test_rows - train_rows)) == 0


def test_limited_data_fisher_pool_has_k_per_class() -> None:
    data = build_data(DataConfig(dataset="digits", fisher_samples_per_class=3), seed=0)
    assert data.fisher_split is not None
    counts = torch.bincount(data.fisher_split.labels, minlength=10)
    assert counts.tolist() == [3] * 10


def test_training_batches_shard_across_ranks_without_overlap() -> None:
    data = build_data(DataConfig(dataset="digits", batch_size=8, augment=False), seed=0)
    rank0 = torch.cat([y for _, y in data.train_batches(1, rank=0, world_size=2)])
    rank1 = torch.cat([y for _, y in data.train_batches(1, rank=1, world_size=2)])
    assert len(rank0) == len(rank1)


def test_resume_skip_batches_matches_uninterrupted_stream() -> None:
    data = build_data(DataConfig(dataset="digits", batch_size=32), seed=1)
    full = list(data.train_batches(4))
    tail = list(data.train_batches(4, skip_batches=3))
    assert len(tail) == len(full) - 3
    for (xf, yf), (xt, yt) in zip(full[3:], tail, strict=True):
        assert torch.equal(xf, xt) and torch.equal(yf, yt)


def test_cifar10_from_local_folder(tmp_path: Path, monkeypatch) -> None:
    import pickle

    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    # Real CIFAR files carry fixed MD5 sums; our tiny stand-ins cannot, so only that check is bypassed.
    import torchvision.datasets.cifar as cifar_module

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda *args, **kwargs: True)
    data = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), fisher_pool=8, batch_size=4), seed=0)
    assert data.test_split is not None
    assert data.num_train == 20 and len(data.test_split) == 4
    x, _ = next(iter(data.train_batches(0)))
    assert x.shape == (4, 3, 32, 32)


def test_cifar10_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WFError, match="CIFAR-10"):
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    config = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, batch_size=4, fisher_pool=4)
    data = build_data(config, seed=0)
    assert data.num_classes == 2 and data.in_channels == 3 and data.image_size == 16
    x, y = next(iter(data.train_batches(0)))
    assert x.shape == (4, 3, 16, 16)
    xs = list(data.fisher_batches(batch_size=2)())
    assert sum(len(b[1]) for b in xs) == 4


def test_digits_tiny_dataset() -> None:
    data = build_data(DataConfig(dataset="digits"), seed=0)
    assert data.test_split is not None
    assert data.num_classes == 10 and data.image_size == 8 and data.num_train + len(data.test_split) == 1797


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "mobilenetv1", "resnet18", "mobilenet_v2"])
def test_models_by_name_adapt_channels_and_classes(name: str) -> None:
    kwargs = {"small_input": True} if name == "mobilenetv1" else {}
    model = build_model(ModelConfig(name=name, num_classes=7, in_channels=1, kwargs=kwargs)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_weights_from_local_state_dict(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    loaded = build_model(ModelConfig(name="resnet18", num_classes=1000, in_channels=3, weights=str(path)))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # Fine-tuning setup: grey inputs and 10 classes from the same ImageNet-shaped file.
    adapted: Any = build_model(ModelConfig(name="resnet18", num_classes=10, in_channels=1, weights=str(path)))
    assert adapted.fc.out_features == 10
    assert torch.allclose(adapted.conv1.weight[:, 0], reference.conv1.weight.sum(1))
    assert torch.equal(adapted.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_ddp_prefixed_checkpoint_loads(tmp_path: Path) -> None:
    model: Any = build_model(ModelConfig(name="resnet20", in_channels=1))
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded: Any = build_model(ModelConfig(name="resnet20", in_channels=1, weights=str(path)))
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": nn.Linear(2, 2)}, path)  # a module object, not tensors: needs full unpickling
    with pytest.raises(WFError, match="model.weights"):
        build_model(ModelConfig(name="resnet20", in_channels=1, weights=str(path)))


def test_unknown_torchvision_weights_name() -> None:
    with pytest.raises(WFError, match="torchvision weights"):
        build_model(ModelConfig(name="resnet18", weights="ResNet18_Weights.NOPE"))


def test_user_factory_module_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(num_classes=10, in_channels=3, hidden=4):
            return nn.Sequential(nn.Conv2d(in_channels, hidden, 3), nn.Flatten(), nn.LazyLinear(num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = ModelConfig(name="my_models:tiny", num_classes=3, in_channels=1, kwargs={"hidden": 2})
    with pytest.raises(WFError, match="--trust-recipe-code"):  # user code runs only when trusted
        build_model(config)
    assert "my_models" not in sys.modules
    model: Any = build_model(config, trust_code=True)  # the factory's nn.Sequential
    assert model[0].out_channels == 2 and model(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    sys.modules.pop("my_models", None)
    with pytest.raises(WFError, match="no callable"):
        build_model(ModelConfig(name="my_models:absent"), trust_code=True)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / f"{FASHION_FILES[0]}.gz").exists(),
                    reason="Debian dataset not installed")
def test_bundled_default_checkpoint_is_accurate() -> None:
    from wf_pipeline.models import load_default_model
    from wf_pipeline.training.epoch import evaluate

    model = load_default_model()
    data = build_data(DataConfig(dataset="fashion_mnist", test_subset=2000), seed=0)
    accuracy, _ = evaluate(model, data.test_batches(), torch.device("cpu"))
    assert accuracy > 0.92


def test_bundled_checkpoint_is_small_and_documented() -> None:
    import json

    from wf_pipeline.models import BUILTIN_CHECKPOINTS

    path = BUILTIN_CHECKPOINTS["resnet20-fmnist"]
    assert path.stat().st_size <= 2 * 1024 * 1024
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["test_accuracy"] >= 0.92 and info["dataset"] == "fashion_mnist"
