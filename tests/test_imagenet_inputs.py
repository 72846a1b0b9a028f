"""ImageNet-style inputs end to end: 224-px image folders with ImageNet statistics, torchvision weights from files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torchvision.datasets import ImageFolder

from tests.cli_helpers import run_cli
from wf_pipeline.data import build_data
from wf_pipeline.data.sources import IMAGENET_STATS, normalization_stats
from wf_pipeline.errors import WFError
from wf_pipeline.models import build_model
from wf_pipeline.recipe.schema import DataConfig, ModelConfig

# Solid colours survive any resize exactly, so the normalised pixel values are known in closed form.
COLOURS = {"red": (200, 30, 40), "teal": (20, 160, 150)}
# Non-square sizes of different aspect: the shorter side goes to 256, the centre crop is 224×224.
SIZES = [(300, 260), (260, 340), (512, 400)]


def _make_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for cls, rgb in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                w, h = SIZES[i % len(SIZES)]
                Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(root / split / cls / f"{i}.png")
        # A greyscale file must come out as RGB like the others.
        Image.fromarray(np.full((250, 250), 128, np.uint8), mode="L").save(root / split / "red" / "grey.png")
    return root


def _expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_STATS)
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std


def test_imagefolder_defaults_are_imagenet_224(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "images")
    data = build_data(DataConfig(dataset="imagefolder", root=str(root), fisher_pool=4, augment=False), seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 224)
    x, y = data.test_tensors()
    assert x.shape == (len(y), 3, 224, 224)
    assert data.folder_sets is not None
    classes = cast(ImageFolder, data.folder_sets[1]).classes
    grey = _expected((128, 128, 128))
    greys = 0
    for xi, yi in zip(x, y, strict=True):
        if torch.allclose(xi, grey, atol=1e-5):
            greys += 1  # the greyscale file, read as RGB
        else:
            assert torch.allclose(xi, _expected(COLOURS[classes[int(yi)]]), atol=1e-5)
    assert greys == 1
    fisher = [b for b in data.fisher_batches(batch_size=2)()]
    assert sum(len(b[1]) for b in fisher) == 4 and fisher[0][0].shape[1:] == (3, 224, 224)
    train_x, _ = next(iter(data.train_batches(0, batch_size=2)))
    assert train_x.shape == (2, 3, 224, 224)


def test_resize_and_crop_sizes(tmp_path: Path) -> None:
    """A striped image shows the crop: resize the shorter side to resize_size, keep the centre image_size."""
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        stripes = np.zeros((100, 200, 3), np.uint8)
        stripes[:, :50] = 255  # left quarter white: cut away by a centre crop of the 2:1 image
        Image.fromarray(stripes).save(root / split / "a" / "0.png")
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=48, resize_size=64, fisher_pool=1,
                     normalize=False, augment=False)
    x, _ = build_data(cfg, seed=0).test_tensors()
    assert x.shape == (1, 3, 48, 48)
    # Resized to 64×128; the centre 48 columns are 40..88, all right of the white quarter (0..32).
    assert float(x.max()) == 0.0


def test_bad_crop_settings_fail_at_load() -> None:
    with pytest.raises(ValidationError, match="resize_size"):
        DataConfig(dataset="imagefolder", image_size=224, resize_size=200)
    with pytest.raises(ValidationError, match="imagefolder only"):
        DataConfig(dataset="digits", resize_size=256)


def test_imagenet_normalization_for_tensor_datasets() -> None:
    assert normalization_stats(DataConfig(dataset="cifar10", normalization="imagenet"), 3) == IMAGENET_STATS
    assert normalization_stats(DataConfig(dataset="cifar10"), 3) != IMAGENET_STATS
    with pytest.raises(WFError, match="3-channel"):
        build_data(DataConfig(dataset="digits", normalization="imagenet"), seed=0)
    plain = build_data(DataConfig(dataset="digits", normalize=False, image_size=16), seed=0)
    x, _ = next(iter(plain.test_batches(batch_size=4)))
    assert x.shape == (4, 1, 16, 16) and float(x.min()) >= 0.0


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_torchvision_imagenet_weights_from_local_file(tmp_path: Path, name: str) -> None:
    import torchvision

    reference = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    loaded = build_model(ModelConfig(name=name, num_classes=1000, in_channels=3, weights=str(path))).eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reference(x), loaded(x))
    # Fine-tuning set-up: a 2-class head replaces the ImageNet one, everything else is the file's.
    two = build_model(ModelConfig(name=name, num_classes=2, in_channels=3, weights=str(path)))
    backbone = [k for k in reference.state_dict() if not k.startswith(("fc.", "classifier."))]
    assert all(torch.equal(reference.state_dict()[k], two.state_dict()[k]) for k in backbone)


def test_oneshot_on_a_224px_image_folder_with_local_weights(tmp_path: Path, capsys, monkeypatch) -> None:
    """`wf-pipeline oneshot` on generated 224-px images, MobileNetV2 from a local ImageNet-shaped file."""
    import torchvision

    root = _make_folder(tmp_path / "images", per_class=4)
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=1000).state_dict(), weights)
    recipe = {
        "name": "imagenet-style",
        "model": {"name": "mobilenet_v2", "num_classes": 2, "in_channels": 3, "weights": str(weights)},
        "data": {"dataset": "imagefolder", "root": str(root), "fisher_pool": 8, "batch_size": 4, "eval_batch_size": 8},
        # Only the last layers are pruned so the test stays small; everything else is the 224-px path.
        "pruning": {"method": "woodfisher", "layers": [r"^features\.18\.", r"^classifier\."],
                    "schedule": {"end_epoch": 0}, "woodfisher": {"num_grads": 8, "block_size": 16, "chunk_size": 4}},
        "finetune": {"epochs": 0},
        "output": {"root": str(tmp_path / "artifacts")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli(capsys, monkeypatch, "oneshot", str(path), "--sparsity", "0.5", "--method", "woodfisher")
    assert result.code == 0, result.err
    table = json.loads((tmp_path / "artifacts" / "imagenet-style-oneshot" / "oneshot" / "oneshot.json").read_text())
    (row,) = table["results"]
    assert abs(row["achieved_sparsity"] - 0.5) < 1e-3
    assert set(row["per_layer_sparsity"]) == {"features.18.0.weight", "classifier.1.weight"}
