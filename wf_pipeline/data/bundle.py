"""The three disjoint roles of data in a run: training, the Fisher pool (taken from training data), and test."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from wf_pipeline.data import sources
from wf_pipeline.data.loaders import Batch, Preprocess, TensorBatches
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import DataConfig


def _subset(split: sources.TensorSplit, count: int | None, seed: int) -> sources.TensorSplit:
    if count is None or count >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return sources.TensorSplit(split.images[idx], split.labels[idx])


def limited_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` samples of every class (limited-data Fisher), chosen deterministically."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


@dataclass
class DataBundle:
    cfg: DataConfig
    seed: int
    num_classes: int
    in_channels: int
    image_size: int
    train_split: sources.TensorSplit | None = None
    test_split: sources.TensorSplit | None = None
    fisher_split: sources.TensorSplit | None = None
    preprocess: Preprocess | None = None
    flip: bool = True
    folder_sets: tuple[Dataset, Dataset, Dataset] | None = None  # imagefolder: train(aug), test, fisher(no aug)
    fisher_indices: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_train(self) -> int:
        if self.train_split is not None:
            return len(self.train_split)
        assert self.folder_sets is not None
        return len(self.folder_sets[0])  # type: ignore[arg-type]  # torch's Dataset does not declare __len__

    def sample_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)

    def train_batches(self, epoch: int, batch_size: int | None = None, *, rank: int = 0, world_size: int = 1,
                      max_batches: int | None = None, skip_batches: int = 0) -> Iterable[Batch]:
        bs = batch_size or self.cfg.batch_size
        if self.train_split is not None:
            return TensorBatches(self.train_split.images, self.train_split.labels, self.preprocess, bs,  # type: ignore[arg-type]
                                 shuffle=True, augment=self.cfg.augment, flip=self.flip, seed=self.seed, epoch=epoch,
                                 rank=rank, world_size=world_size, drop_last=True, max_batches=max_batches,
                                 skip_batches=skip_batches)
        return _folder_loader(self.folder_sets[0], bs, self.cfg.num_workers, shuffle=True,  # type: ignore[index]
                              seed=self.seed * 100_003 + epoch, rank=rank, world_size=world_size,
                              max_batches=max_batches, skip_batches=skip_batches)

    def test_batches(self, batch_size: int | None = None) -> Iterable[Batch]:
        bs = batch_size or self.cfg.eval_batch_size
        if self.test_split is not None:
            return TensorBatches(self.test_split.images, self.test_split.labels, self.preprocess, bs)  # type: ignore[arg-type]
        return _folder_loader(self.folder_sets[1], bs, self.cfg.num_workers, shuffle=False, seed=0)  # type: ignore[index]

    def fisher_batches(self, batch_size: int = 100, *, rank: int = 0,
                       world_size: int = 1) -> Callable[[], Iterable[Batch]]:
        """A factory of fresh iterables over the Fisher pool (shuffled anew each call, deterministically)."""
        calls = {"n": 0}

        def make() -> Iterable[Batch]:
            calls["n"] += 1
            if self.fisher_split is not None:
                return TensorBatches(self.fisher_split.images, self.fisher_split.labels, self.preprocess, batch_size,  # type: ignore[arg-type]
                                     shuffle=True, seed=self.seed + 1, epoch=calls["n"], rank=rank,
                                     world_size=world_size)
            pool = Subset(self.folder_sets[2], self.fisher_indices.tolist())  # type: ignore[index, union-attr]
            return _folder_loader(pool, batch_size, self.cfg.num_workers, shuffle=True, seed=self.seed + calls["n"],
                                  rank=rank, world_size=world_size)

        return make

    def calibration_batches(self, count: int, batch_size: int = 64) -> list[torch.Tensor]:
        """`count` training images (a seeded sample, no augmentation, test preprocessing) for INT8 calibration.

        Drawn from the training split only: the test images stay unseen by everything that shapes the model.
        """
        generator = torch.Generator().manual_seed(self.seed + 5)
        if self.train_split is not None:
            chosen = torch.randperm(len(self.train_split), generator=generator)[:count].sort().values
            images, labels = self.train_split.images[chosen], self.train_split.labels[chosen]
            batches = TensorBatches(images, labels, self.preprocess, batch_size)  # type: ignore[arg-type]
            return [x for x, _ in batches]
        plain_train = self.folder_sets[2]  # type: ignore[index]  # the training images without augmentation
        chosen = torch.randperm(len(plain_train), generator=generator)[:count].sort().values  # type: ignore[arg-type]
        return [x for x, _ in DataLoader(Subset(plain_train, chosen.tolist()), batch_size=batch_size,
                                         num_workers=self.cfg.num_workers)]

    def test_tensors(self, limit: int | None = None) -> Batch:
        """The (preprocessed) test set as two tensors, for ONNX Runtime accuracy and parity checks."""
        xs, ys, seen = [], [], 0
        for x, y in self.test_batches():
            xs.append(x)
            ys.append(y)
            seen += len(y)
            if limit is not None and seen >= limit:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        return (x[:limit], y[:limit]) if limit is not None else (x, y)


def _folder_loader(ds: Dataset, batch_size: int, workers: int, *, shuffle: bool, seed: int, rank: int = 0,
                   world_size: int = 1, max_batches: int | None = None, skip_batches: int = 0) -> Iterable[Batch]:
    n = len(ds)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    order = order[rank::world_size][: n // world_size]
    if max_batches is not None:
        order = order[: max_batches * batch_size]
    order = order[skip_batches * batch_size :]
    return DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, num_workers=workers)


def build_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset the recipe names and split it deterministically by `seed`."""
    if cfg.dataset == "imagefolder":
        train_set, test_set, fisher_set = sources.load_imagefolder(cfg)
        gen = torch.Generator().manual_seed(seed)
        pool = torch.randperm(len(fisher_set), generator=gen)[: cfg.fisher_pool]
        if cfg.fisher_samples_per_class:
            targets = torch.tensor(fisher_set.targets)[pool]
            pool = pool[limited_per_class(targets, cfg.fisher_samples_per_class, seed)]
        x0, _ = test_set[0]
        return DataBundle(cfg, seed, len(train_set.classes), x0.shape[0], x0.shape[-1],
                          folder_sets=(train_set, test_set, fisher_set), fisher_indices=pool)
    if cfg.dataset == "fashion_mnist":
        train, test = sources.load_fashion_mnist(cfg)
    elif cfg.dataset == "cifar10":
        train, test = sources.load_cifar10(cfg)
    elif cfg.dataset == "digits":
        train, test = sources.load_digits(cfg, seed)
    else:  # pragma: no cover - the schema's Literal prevents this
        raise WFError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    train = _subset(train, cfg.train_subset, seed)
    test = _subset(test, cfg.test_subset, seed + 1)
    # The Fisher pool is a seeded sample of the training set: never the test set.
    fisher = _subset(train, cfg.fisher_pool, seed + 2)
    if cfg.fisher_samples_per_class:
        idx = limited_per_class(fisher.labels, cfg.fisher_samples_per_class, seed + 3)
        fisher = sources.TensorSplit(fisher.images[idx], fisher.labels[idx])
    channels = int(train.images.shape[1])
    mean, std = sources.normalization_stats(cfg, channels) if cfg.normalize else sources.STATS[cfg.dataset]
    preprocess = Preprocess(mean, std, cfg.normalize, cfg.image_size)
    num_classes = int(max(train.labels.max(), test.labels.max()).item()) + 1
    size = cfg.image_size or int(train.images.shape[-1])
    return DataBundle(cfg, seed, num_classes, channels, size, train, test, fisher, preprocess,
                      flip=cfg.dataset != "digits")
