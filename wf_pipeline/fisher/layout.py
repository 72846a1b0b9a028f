"""Where each weight of the flat vector lives in the block-diagonal Fisher's padded ``(K, B)`` block view.

The flat weight vector (selected layers concatenated) is cut into blocks of ``B`` consecutive weights; blocks
never cross a layer boundary, and a layer's short last block is padded with coordinates whose gradient is
always zero (dropped by every public accessor of the inverse).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from wf_pipeline.fisher.conditioning import FisherStatisticsError


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
        for n, k in zip(self.sizes, self.blocks_per_layer, strict=True):
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
                for n, k0 in zip(self.sizes, self.block_offsets, strict=False)  # offsets: one more
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

    def layer_of_block(self, block: int) -> int:
        for layer, k1 in enumerate(self.block_offsets[1:]):
            if block < k1:
                return layer
        raise IndexError(f"block {block} out of range (0..{self.num_blocks - 1})")

    def block_length(self, block: int) -> int:
        """Number of real weights in block `block` (``B`` except for a layer's short last block)."""
        for layer, (k0, k1) in enumerate(zip(self.block_offsets, self.block_offsets[1:], strict=False)):
            if k0 <= block < k1:
                return min(self.block_size, self.sizes[layer] - (block - k0) * self.block_size)
        raise IndexError(f"block {block} out of range (0..{self.num_blocks - 1})")


def non_finite_error(layout: BlockLayout, blocks: Tensor) -> FisherStatisticsError:
    """The error naming the selected layers of the blocks `blocks` whose Fisher statistics hold NaN or Inf."""
    layers = sorted({layout.layer_of_block(int(b)) for b in blocks[:10_000].tolist()})
    shown = ", ".join(map(str, layers[:5])) + (", ..." if len(layers) > 5 else "")
    return FisherStatisticsError(
        f"the Fisher statistics contain NaN or Inf in {blocks.numel()} of {layout.num_blocks} blocks "
        f"(selected layer {'indices' if len(layers) > 1 else 'index'} {shown})",
        hint="a gradient is NaN/Inf or too large for float32: check the model's weights and the Fisher data "
             "for non-finite values (raising damp does not help)",
    )
