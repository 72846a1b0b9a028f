"""Fast, deterministic batch iterators over in-memory image tensors.

torch's DataLoader with per-sample transforms costs more than the model on 2 CPU cores for 28x28 images,
so in-memory datasets are batched and augmented here as whole tensors.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Preprocess:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: bool
    image_size: int | None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Standard CIFAR-style augmentation on a whole batch: pad-and-crop shifts plus optional horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    # Gather each sample's crop through index arithmetic, avoiding a per-sample Python loop.
    rows = (shifts[:, 0].view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (shifts[:, 1].view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
    batch_idx = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


class TensorBatches:
    """(x, y) batches over tensors; the order depends only on (seed, epoch), so a resumed run sees the same data."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        preprocess: Preprocess,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        flip: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        max_batches: int | None = None,
        skip_batches: int = 0,
    ) -> None:
        self.images, self.labels, self.preprocess = images, labels, preprocess
        self.batch_size, self.shuffle, self.augment, self.flip = batch_size, shuffle, augment, flip
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.drop_last, self.max_batches, self.skip_batches = drop_last, max_batches, skip_batches

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        # Each rank takes an equal strided share so every rank runs the same number of steps.
        per_rank = n // self.world_size if self.world_size > 1 else n
        return order[self.rank :: self.world_size][:per_rank]

    def __len__(self) -> int:
        n = len(self._indices())
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def __iter__(self) -> Iterator[Batch]:
        indices = self._indices()
        aug_gen = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch * 31 + self.rank)
        for b in range(len(self)):
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.preprocess(self.images[idx])
            if self.augment:
                # Draw the augmentation even for skipped batches so resumed runs stay on the same random stream.
                x = random_crop_flip(x, aug_gen, pad=max(1, x.shape[-1] // 8), flip=self.flip)
            if b < self.skip_batches:
                continue
            yield x, self.labels[idx]
