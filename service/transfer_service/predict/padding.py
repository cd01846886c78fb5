"""Predict batch sizes on an accelerator: rows padded up to a few sizes, warmed at start-up.

cuDNN builds an execution plan for every convolution at every new input shape (seconds for
a whole trunk on an H200: docs/design.md, "Threads and torch"). PyTorch keeps the plans per
thread and the Predict compute thread is long-lived, so each batch size costs once; but a
batcher that stacks anything from 1 to `batch_max_size` rows meets up to that many sizes, and
the batch that meets one first stalls for it. Padding every batch's rows up to the next
power of two (with copies of its last row; rows are independent in eval mode, and the copies'
results are dropped) bounds the sizes to log2(batch_max_size) + 1, all of them run once on the
compute thread before the server reports SERVING. On an accelerator small batches are
launch-bound, so the copies cost little; on a CPU they cost their full compute, so padding is
off there unless asked for (TRANSFER_PREDICT_BATCH_PADDING).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pads_predict_batches(setting: str, device: torch.device) -> bool:
    """TRANSFER_PREDICT_BATCH_PADDING: 'auto' pads on an accelerator only."""
    if setting == "auto":
        return device.type != "cpu"
    return setting == "on"


def padded_batch_sizes(batch_max_size: int) -> tuple[int, ...]:
    """The sizes batches are padded to: powers of two below `batch_max_size`, then it."""
    sizes = []
    size = 1
    while size < batch_max_size:
        sizes.append(size)
        size *= 2
    sizes.append(batch_max_size)
    return tuple(sizes)


def padded_row_count(rows: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` that holds `rows`; past the largest (one Predict call may hold
    more inputs than `batch_max_size`), the next multiple of it."""
    for size in sizes:
        if rows <= size:
            return size
    largest = sizes[-1]
    return -(-rows // largest) * largest


def padding_count(rows: int, sizes: Sequence[int]) -> int:
    """How many copies pad `rows` up to a padded size; 0 without sizes (no padding)."""
    return padded_row_count(rows, sizes) - rows if sizes else 0


def padded_index(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Row indices [n] -> [n + padding_count(n)]: the last index repeated to fill."""
    extra = padding_count(len(rows), sizes)
    return torch.cat([rows, rows[-1:].expand(extra)]) if extra else rows
