"""Read each supported dataset from local files into tensors (or a torchvision Dataset for image folders)."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import DataConfig
from wf_pipeline.runtime.atomic_io import atomic_path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
# Per-channel statistics of each dataset's training split, used to normalise inputs.
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3050,), (0.3840,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGENET_STATS = STATS["imagefolder"]
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256  # torchvision's ImageNet evaluation: shorter side to 256, centre crop 224


def normalization_stats(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the recipe asks for; ImageNet's need three channels."""
    if cfg.normalization == "imagenet" or cfg.dataset == "imagefolder":
        if channels != 3:
            raise WFError(
                f"data.normalization: ImageNet statistics need 3-channel images, {cfg.dataset} has {channels}",
                "use normalization: dataset for grey images (model.in_channels adapts the stem)",
            )
        return IMAGENET_STATS
    return STATS[cfg.dataset]


def crop_sizes(cfg: DataConfig) -> tuple[int, int]:
    """(resize, crop) for image folders: ImageNet's 256 → 224, scaled when image_size differs."""
    crop = cfg.image_size or IMAGENET_SIZE
    resize = cfg.resize_size or round(crop * IMAGENET_RESIZE / IMAGENET_SIZE)
    if resize < crop:
        raise WFError(f"data.resize_size ({resize}) is smaller than the crop ({crop})",
                      "set data.resize_size >= data.image_size (or leave it unset)")
    return resize, crop


@dataclass
class TensorSplit:
    """Images as uint8/float tensors (N, C, H, W) with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def cache_dir() -> Path:
    return Path(os.environ.get("WF_PIPELINE_CACHE", Path.home() / ".cache" / "wf-pipeline"))


def _fashion_raw_folder(cfg: DataConfig) -> Path:
    """Find Fashion-MNIST files and lay them out as torchvision expects (<root>/FashionMNIST/raw)."""
    candidates = [Path(cfg.root).expanduser()] if cfg.root else [DEBIAN_FASHION_MNIST, Path("data")]
    for folder in candidates:
        for sub in (folder, folder / "FashionMNIST" / "raw"):
            if all((sub / name).exists() for name in FASHION_FILES):
                return sub.parent.parent if sub.name == "raw" else _stage_raw(sub, uncompress=False)
            if all((sub / f"{name}.gz").exists() for name in FASHION_FILES):
                return _stage_raw(sub, uncompress=True)
    if cfg.download:
        return Path(cfg.root or "data")
    raise WFError(
        f"data.root: Fashion-MNIST files not found in {', '.join(map(str, candidates))}",
        "run `apt-get install dataset-fashion-mnist`, point data.root at the IDX files, "
        "or set data.download: true where a network exists",
    )


def _stage_raw(folder: Path, uncompress: bool) -> Path:
    # One staging folder per source (path, sizes, mtimes), so two sources never share stale files.
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file())
    key = hashlib.sha256(f"{folder.resolve()}|{stamp}".encode()).hexdigest()[:16]
    root = cache_dir() / "datasets" / f"fashion-mnist-{key}"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        target = raw / name
        if target.exists():
            continue
        with atomic_path(target) as tmp:
            if uncompress:
                with gzip.open(folder / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copyfile(folder / name, tmp)
    return root


def load_fashion_mnist(cfg: DataConfig) -> tuple[TensorSplit, TensorSplit]:
    from torchvision.datasets import FashionMNIST

    root = _fashion_raw_folder(cfg)
    splits = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=cfg.download)
        splits.append(TensorSplit(ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return splits[0], splits[1]


def load_cifar10(cfg: DataConfig) -> tuple[TensorSplit, TensorSplit]:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root or "data").expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=cfg.download)
        except RuntimeError as exc:
            raise WFError(f"data.root: CIFAR-10 not found under {root} ({exc})",
                          "place the extracted cifar-10-batches-py folder there, "
                          "or set data.download: true where a network exists") from exc
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(TensorSplit(images, torch.tensor(ds.targets, dtype=torch.long)))
    return splits[0], splits[1]


def load_digits(cfg: DataConfig, seed: int) -> tuple[TensorSplit, TensorSplit]:
    """sklearn's 8x8 digits (shipped inside the wheel): a deterministic 80/20 split for tiny runs."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train_idx, test_idx = order[:cut], order[cut:]
    return TensorSplit(images[train_idx], labels[train_idx]), TensorSplit(images[test_idx], labels[test_idx])


def load_imagefolder(cfg: DataConfig):  # -> tuple[Dataset, Dataset]
    """ImageFolder layout: <root>/train/<class>/*.jpg and <root>/val (or test)/<class>/*.jpg."""
    from torchvision import datasets, transforms

    if not cfg.root:
        raise WFError("data.root: imagefolder needs a root folder",
                      "set data.root to a folder with train/ and val/ subfolders")
    root = Path(cfg.root).expanduser()
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise WFError(f"data.root: {root} must contain train/ and val/ (or test/) class folders",
                      "arrange images as <root>/train/<class>/x.jpg and <root>/val/<class>/y.jpg")
    resize, size = crop_sizes(cfg)
    mean, std = normalization_stats(cfg, 3)  # ImageFolder's loader converts every image to RGB
    norm = [transforms.Normalize(mean, std)] if cfg.normalize else []
    evaluation = [transforms.Resize(resize), transforms.CenterCrop(size)]
    train_tf = transforms.Compose(
        ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if cfg.augment else evaluation)
        + [transforms.ToTensor(), *norm]
    )
    test_tf = transforms.Compose([*evaluation, transforms.ToTensor(), *norm])

    def folder(path: Path, transform):  # noqa: ANN001, ANN202
        try:
            return datasets.ImageFolder(str(path), transform)
        except FileNotFoundError as exc:  # no class folders, or no images in them
            raise WFError(f"data.root: {path} holds no images in class folders ({str(exc).splitlines()[0][:120]})",
                          "arrange images as <root>/train/<class>/x.jpg and <root>/val/<class>/y.jpg") from exc

    # The Fisher pool comes from the training images with the evaluation transform (no random crops).
    return folder(root / "train", train_tf), folder(test_dir, test_tf), folder(root / "train", test_tf)
