"""Block-diagonal inverse of the dampened empirical Fisher ``F = λI + (1/N) Σ g gᵀ``.

The flat weight vector (selected layers concatenated) is cut into blocks of ``B`` consecutive
weights; blocks never cross a layer boundary, and a layer's short last block is padded with
coordinates whose gradient is always zero. Those padded coordinates are decoupled (their Fisher
row is ``λ eᵢ``) and are dropped by every public accessor.

Three routes build the same matrix:

* ``fast`` — :class:`BlockGramAccumulator`: stream ``GᵀG`` per block with batched GEMMs into one
  ``K×B×B`` buffer, then invert it in place, a slice of blocks at a time, with a batched Cholesky.
  Peak memory ≈ the buffer (``d·B`` numbers) + one gradient chunk.
* ``woodbury`` — :class:`WoodburyAccumulator`: the textbook rank-one Sherman–Morrison recursion
  ``F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (N + gᵀF⁻¹g)``, one gradient at a time, batched over blocks
  (as the WoodFisher research code and SparseML do it). The reference; memory-bound and slow.
* ``lowrank`` — :func:`low_rank_inverse`: for ``N < B``, ``F⁻¹ = (1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` per
  block from the ``N×B`` gradient slice ``A``; needs all gradients at once (``N·d`` numbers).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from wf_pipeline.fisher.parallel import map_slices

Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]
ROUTES = ("fast", "woodbury", "lowrank")
# Blocks inverted per batched Cholesky call: ~4 MB of temporaries per slice and worker (measured no slower than 256).
INVERT_SLICE_BLOCKS = 64


class BlockLayout:
    """Where each flat weight lives in the padded ``(num_blocks, block_size)`` block view."""

    def __init__(self, sizes: Sequence[int], block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"layer sizes must be positive, got {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.block_size = int(block_size)
        self.blocks_per_layer = [math.ceil(n / block_size) for n in self.sizes]
        self.block_offsets = [0]
        self.flat_offsets = [0]
        for n, k in zip(self.sizes, self.blocks_per_layer):
            self.block_offsets.append(self.block_offsets[-1] + k)
            self.flat_offsets.append(self.flat_offsets[-1] + n)
        self.num_blocks = self.block_offsets[-1]
        self.dim = self.flat_offsets[-1]
        self.padded_dim = self.num_blocks * self.block_size
        self.is_padded = self.padded_dim != self.dim
        self._positions: dict[torch.device, Tensor] = {}

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Index into the padded flat vector (length ``K·B``) of each of the ``d`` real weights."""
        device = torch.device(device)
        if device not in self._positions:
            parts = [
                torch.arange(n, device=device) + k0 * self.block_size
                for n, k0 in zip(self.sizes, self.block_offsets)
            ]
            self._positions[device] = torch.cat(parts)
        return self._positions[device]

    def pad(self, flat: Tensor, fill: float | bool = 0) -> Tensor:
        """``(..., d)`` → ``(..., K, B)``; padded coordinates get `fill`."""
        lead = flat.shape[:-1]
        if flat.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got {flat.shape[-1]}")
        if not self.is_padded:
            return flat.reshape(*lead, self.num_blocks, self.block_size)
        out = torch.full((*lead, self.padded_dim), fill, dtype=flat.dtype, device=flat.device)
        out[..., self.positions(flat.device)] = flat
        return out.view(*lead, self.num_blocks, self.block_size)

    def unpad(self, blocked: Tensor) -> Tensor:
        """``(..., K, B)`` → ``(..., d)``, dropping the padded coordinates."""
        lead = blocked.shape[:-2]
        flat = blocked.reshape(*lead, self.padded_dim)
        return flat if not self.is_padded else flat[..., self.positions(blocked.device)]

    def write_layer(self, out: Tensor, layer: int, rows: Tensor) -> None:
        """Write one layer's gradient rows ``(n, size)`` into a block-major buffer ``(K, n, B)``."""
        n, B = rows.shape[0], self.block_size
        k0 = self.block_offsets[layer]
        full, rest = divmod(self.sizes[layer], B)
        if full:
            out[k0 : k0 + full].copy_(rows[:, : full * B].reshape(n, full, B).transpose(0, 1))
        if rest:
            out[k0 + full, :, :rest] = rows[:, full * B :]
            out[k0 + full, :, rest:] = 0

    def to_blocked(self, rows: Tensor) -> Tensor:
        """``(n, d)`` gradient rows → block-major ``(K, n, B)`` (zeros at padded coordinates).

        Block-major rows make the Gram of every block one batched GEMM with no further copy.
        """
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}")
        out = torch.empty(self.num_blocks, rows.shape[0], self.block_size, dtype=rows.dtype, device=rows.device)
        for layer, f0 in enumerate(self.flat_offsets[:-1]):
            self.write_layer(out, layer, rows[:, f0 : f0 + self.sizes[layer]])
        return out

    def valid(self, device: torch.device | str = "cpu") -> Tensor:
        """Bool ``(K, B)``: True at real (non-padded) coordinates."""
        return self.pad(torch.ones(self.dim, dtype=torch.bool, device=device), fill=False)

    def block_length(self, block: int) -> int:
        """Number of real weights in block `block` (``B`` except for a layer's short last block)."""
        for layer, (k0, k1) in enumerate(zip(self.block_offsets, self.block_offsets[1:])):
            if k0 <= block < k1:
                return min(self.block_size, self.sizes[layer] - (block - k0) * self.block_size)
        raise IndexError(f"block {block} out of range (0..{self.num_blocks - 1})")


def accumulation_dtype(num_samples: int, block_size: int, dtype: torch.dtype) -> torch.dtype:
    """Precision for the Gram buffer: fp64 when ``N < B`` in fp32.

    With fewer gradients than the block size each block is rank-deficient, so ``λI + GᵀG/N`` has
    eigenvalues as small as λ next to ones of order ``|g|²``; rounding the Gram to fp32 perturbs the
    λ-directions by ~1e-7·|g|², i.e. a relative error of ~1e-2 in the inverse at λ = 1e-5. Small N makes
    fp64 cheap (the accumulation costs ∝ N), so it is used automatically there.
    """
    if dtype == torch.float32 and num_samples < block_size:
        return torch.float64
    return dtype


class BlockFisherInverse:
    """The inverse blocks ``(K, B, B)`` of a block-diagonal dampened Fisher, with flat accessors."""

    def __init__(self, layout: BlockLayout, blocks: Tensor, damp: float, num_samples: int) -> None:
        expected = (layout.num_blocks, layout.block_size, layout.block_size)
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, expected {expected}")
        self.layout = layout
        self.blocks = blocks
        self.damp = float(damp)
        self.num_samples = int(num_samples)
        self.repaired_blocks = 0  # blocks that needed fp64 / extra jitter to factorise

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_gradients(
        cls,
        chunks: Tensor | Iterable[Tensor],
        block_size: int,
        damp: float,
        route: str = "fast",
        sizes: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        progress: Progress | None = None,
    ) -> "BlockFisherInverse":
        """Inverse of ``damp·I + (1/N) Σ g gᵀ`` (block-diagonal) from gradient rows.

        `chunks` is an ``(N, d)`` tensor or an iterable of ``(n_i, d)`` chunks; `sizes` gives the layer
        lengths along ``d`` (default: one layer). `dtype` defaults to the gradients' dtype.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
        chunk_list = [chunks] if isinstance(chunks, Tensor) else list(chunks)
        if not chunk_list:
            raise ValueError("no gradients given")
        first = chunk_list[0]
        layout = BlockLayout(sizes if sizes is not None else [first.shape[-1]], block_size)
        dtype = dtype or first.dtype
        if route == "lowrank":
            return low_rank_inverse(torch.cat(chunk_list), layout, damp, dtype=dtype)
        if route == "woodbury":
            total = sum(c.shape[0] for c in chunk_list)
            acc: BlockGramAccumulator | WoodburyAccumulator = WoodburyAccumulator(
                layout, damp, total, dtype=dtype, device=first.device
            )
        else:
            acc = BlockGramAccumulator(layout, dtype=dtype, device=first.device)
        for chunk in chunk_list:
            acc.add(chunk)
        return acc.inverse(damp, progress=progress)

    # ----------------------------------------------------------------- accessors
    @property
    def dim(self) -> int:
        return self.layout.dim

    def diag(self) -> Tensor:
        """``[F⁻¹]_qq`` for every real weight, flat ``(d,)``."""
        return self.layout.unpad(self.blocks.diagonal(dim1=-2, dim2=-1))

    def matvec(self, v: Tensor) -> Tensor:
        """``F⁻¹ v`` for ``v`` of shape ``(d,)`` or ``(m, d)``."""
        vp = self.layout.pad(v.to(self.blocks.dtype))
        if vp.dim() == 2:
            out = torch.bmm(self.blocks, vp.unsqueeze(-1)).squeeze(-1)
        else:
            out = torch.einsum("kbc,mkc->mkb", self.blocks, vp)
        return self.layout.unpad(out).to(v.dtype)

    def block(self, i: int) -> Tensor:
        """Block `i` of ``F⁻¹`` restricted to its real weights (``r×r`` for a short last block)."""
        r = self.layout.block_length(i)
        return self.blocks[i, :r, :r]

    def dense(self) -> Tensor:
        """The full ``d×d`` matrix (tests and small problems only)."""
        full = torch.block_diag(*self.blocks.unbind(0))
        pos = self.layout.positions(self.blocks.device)
        return full[pos][:, pos]

    def to(self, *args: object, **kwargs: object) -> "BlockFisherInverse":
        out = BlockFisherInverse(self.layout, self.blocks.to(*args, **kwargs), self.damp, self.num_samples)
        out.repaired_blocks = self.repaired_blocks
        return out


# ===================================================================== accumulators
class _StatisticsMixin:
    """Gradient sum and sample count, kept alongside every accumulator (WoodTaylor needs the mean)."""

    grad_sum: Tensor
    count: Tensor

    def _init_stats(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.grad_sum = torch.zeros(dim, dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def _add_stats(self, chunk: Tensor) -> None:
        self.grad_sum += chunk.sum(0)
        self.count += chunk.shape[0]

    def _add_blocked_stats(self, blocked: Tensor, layout: BlockLayout) -> None:
        self.grad_sum += layout.unpad(blocked.sum(1))
        self.count += blocked.shape[1]

    @property
    def num_samples(self) -> int:
        return int(round(float(self.count)))

    def mean_gradient(self) -> Tensor:
        if self.num_samples == 0:
            raise ValueError("no gradients accumulated")
        return self.grad_sum / self.num_samples


class BlockGramAccumulator(_StatisticsMixin):
    """Streams ``Σ g gᵀ`` per block (the fast route). Chunks and ranks can be added in any order."""

    def __init__(self, layout: BlockLayout, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.dtype = dtype
        self.gram = torch.zeros(layout.num_blocks, layout.block_size, layout.block_size, dtype=dtype, device=device)
        self._init_stats(layout.dim, dtype, device)

    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``."""
        self.add_blocked(self.layout.to_blocked(chunk.to(dtype=self.dtype, device=self.gram.device)))

    def add_blocked(self, blocked: Tensor) -> None:
        """Fold in block-major gradient rows ``(K, n, B)``: one batched GEMM into the buffer."""
        blocked = blocked.to(dtype=self.dtype, device=self.gram.device)
        if blocked.dim() != 3 or blocked.shape[0] != self.layout.num_blocks or blocked.shape[2] != self.layout.block_size:
            raise ValueError(f"expected block-major rows (K={self.layout.num_blocks}, n, B={self.layout.block_size})")
        self.gram.baddbmm_(blocked.mT, blocked)
        self._add_blocked_stats(blocked, self.layout)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum the statistics across processes in place (e.g. ``dist.all_reduce``)."""
        for stat in (self.gram, self.grad_sum, self.count):
            reduce_fn(stat)

    def inverse(self, damp: float, progress: Progress | None = None) -> BlockFisherInverse:
        """Invert ``damp·I + gram/N`` in place (the buffer becomes the inverse; do not add after)."""
        n = self.num_samples
        if n == 0:
            raise ValueError("no gradients accumulated")
        blocks = self.gram
        blocks.div_(n)
        blocks.diagonal(dim1=-2, dim2=-1).add_(damp)
        total = blocks.shape[0]
        repaired = sum(
            map_slices(
                lambda s, e: _cholesky_invert_(blocks[s:e], damp),
                total,
                INVERT_SLICE_BLOCKS,
                on_done=None if progress is None else (lambda e: progress("inverse", e, total)),
            )
        )
        self.gram = torch.empty(0)  # the buffer now belongs to the inverse
        result = BlockFisherInverse(self.layout, blocks, damp, n)
        result.repaired_blocks = repaired
        return result


def _invert_from_cholesky(chol: Tensor, out: Tensor) -> None:
    """``out = (L Lᵀ)⁻¹`` for a batch of Cholesky factors (LAPACK potri, batched)."""
    torch.cholesky_inverse(chol, out=out)


def _cholesky_invert_(mats: Tensor, damp: float) -> int:
    """Replace SPD matrices by their inverses; returns how many needed an fp64/jitter retry."""
    chol, info = torch.linalg.cholesky_ex(mats)
    bad = (info != 0).nonzero().squeeze(1)
    if not bad.numel():
        _invert_from_cholesky(chol, mats)
        return 0
    # Rounding in low precision can make λI + GᵀG/N look indefinite when λ is tiny: redo those blocks
    # in fp64, adding jitter only if even that fails.
    sub = mats[bad].double()
    eye = torch.eye(sub.shape[-1], dtype=sub.dtype, device=sub.device)
    jitter = 0.0
    for _ in range(8):
        sub_chol, sub_info = torch.linalg.cholesky_ex(sub + jitter * eye)
        if not sub_info.any():
            break
        jitter = damp if jitter == 0.0 else jitter * 10
    else:
        raise FloatingPointError("Fisher blocks are not positive definite even with added jitter; raise damp")
    sub_inv = torch.empty_like(sub)
    _invert_from_cholesky(sub_chol, sub_inv)
    good = (info == 0).nonzero().squeeze(1)
    if good.numel():
        good_inv = torch.empty_like(chol[good])
        _invert_from_cholesky(chol[good], good_inv)
        mats[good] = good_inv
    mats[bad] = sub_inv.to(mats.dtype)
    return int(bad.numel())


class WoodburyAccumulator(_StatisticsMixin):
    """The rank-one Woodbury (Sherman–Morrison) recursion, batched over blocks (reference route).

    ``num_samples`` (the final N) must be known up front because every update divides by it.
    """

    def __init__(
        self,
        layout: BlockLayout,
        damp: float,
        num_samples: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.layout = layout
        self.dtype = dtype
        self.damp = float(damp)
        self.expected = int(num_samples)
        eye = torch.eye(layout.block_size, dtype=dtype, device=device) / damp
        self.inv = eye.expand(layout.num_blocks, -1, -1).clone()
        self._init_stats(layout.dim, dtype, device)

    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``, one rank-one update each."""
        self.add_blocked(self.layout.to_blocked(chunk.to(dtype=self.dtype, device=self.inv.device)))

    def add_blocked(self, blocked: Tensor) -> None:
        """Fold in block-major gradient rows ``(K, n, B)``, one rank-one update each."""
        blocked = blocked.to(dtype=self.dtype, device=self.inv.device)
        if self.num_samples + blocked.shape[1] > self.expected:
            raise ValueError(f"more than the announced {self.expected} gradients")
        for i in range(blocked.shape[1]):
            g = blocked[:, i, :].unsqueeze(-1)  # (K, B, 1)
            u = torch.bmm(self.inv, g)  # F⁻¹g
            denom = self.expected + torch.bmm(g.mT, u)  # (K, 1, 1)
            self.inv.baddbmm_(u, (u / denom).mT, alpha=-1)
        self._add_blocked_stats(blocked, self.layout)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        raise ValueError("the rank-one Woodbury route cannot be summed across processes; use route 'fast'")

    def inverse(self, damp: float | None = None, progress: Progress | None = None) -> BlockFisherInverse:
        if damp is not None and damp != self.damp:
            raise ValueError(f"damp {damp} differs from the recursion's {self.damp}")
        if self.num_samples != self.expected:
            raise ValueError(f"recursion announced N={self.expected} but got {self.num_samples} gradients")
        if progress is not None:
            progress("inverse", self.layout.num_blocks, self.layout.num_blocks)
        return BlockFisherInverse(self.layout, self.inv, self.damp, self.expected)


def low_rank_inverse(
    grads: Tensor, layout: BlockLayout, damp: float, dtype: torch.dtype | None = None
) -> BlockFisherInverse:
    """``F⁻¹ = (1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` per block from all gradients ``(N, d)`` (cheap when N < B)."""
    dtype = dtype or grads.dtype
    n = grads.shape[0]
    padded = layout.pad(grads.to(dtype))  # (N, K, B)
    K, B = layout.num_blocks, layout.block_size
    out = torch.empty(K, B, B, dtype=dtype, device=grads.device)
    eye_b = torch.eye(B, dtype=dtype, device=grads.device)
    eye_n = torch.eye(n, dtype=dtype, device=grads.device)
    def invert(s: int, e: int) -> None:
        a = padded[:, s:e].transpose(0, 1)  # (k, N, B)
        small = torch.bmm(a, a.transpose(1, 2)) + (n * damp) * eye_n
        x = torch.cholesky_solve(a, torch.linalg.cholesky(small))  # (NλI + AAᵀ)⁻¹A
        out[s:e] = (eye_b - torch.bmm(a.transpose(1, 2), x)) / damp

    map_slices(invert, K, INVERT_SLICE_BLOCKS)
    return BlockFisherInverse(layout, out, damp, n)


class DiagonalAccumulator(_StatisticsMixin):
    """Σ g² per weight (the diagonal Fisher baseline)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.sq_sum = torch.zeros(dim, dtype=dtype, device=device)
        self._init_stats(dim, dtype, device)

    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``."""
        chunk = chunk.to(dtype=self.dtype, device=self.sq_sum.device)
        self.sq_sum += chunk.square().sum(0)
        self._add_stats(chunk)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        for stat in (self.sq_sum, self.grad_sum, self.count):
            reduce_fn(stat)

    def fisher_diag(self, damp: float) -> Tensor:
        """``damp + mean g²`` per weight."""
        if self.num_samples == 0:
            raise ValueError("no gradients accumulated")
        return damp + self.sq_sum / self.num_samples
