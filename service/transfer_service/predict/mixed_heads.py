"""One Predict batch on the compute thread: the frozen trunk advances stage by stage over the
rows of every request, and each head runs once, over the rows of all of its requests, where it
branches off (its split point: its own unfrozen blocks, pooling, classifier). Pure tensors;
the batcher that forms batches and answers callers is transfer_service.predict.batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import ClassScore, PredictionResult
from transfer_service.heads import LoadedHead
from transfer_service.predict.padding import padded_index, padding_count


class HeadRequest(Protocol):
    """One caller's share of a batch."""

    head: LoadedHead
    examples: list[Any]  # first-stage inputs, CPU
    top_k: int
    return_embedding: bool
    extra_heads: tuple[LoadedHead, ...]  # more heads on the same rows (multi-head Predict)


def collate_rows(
    backbone: LoadedBackbone, batch: Sequence[HeadRequest], padded_sizes: Sequence[int]
) -> Any:
    """The batch's rows, request by request, stacked on the device: the trunk's first input."""
    trunk = backbone.trunk
    examples = [row for item in batch for row in item.examples]
    # Padding rows (copies of the last) go after every real row: real row r is row r of
    # `state`, and each head's results are read from its first rows.
    examples += examples[-1:] * padding_count(len(examples), padded_sizes)
    return trunk.to_device(trunk.collate(examples), backbone.device)


def first_split(backbone: LoadedBackbone, batch: Sequence[HeadRequest]) -> int:
    """The stage up to which every row of the batch runs the same frozen trunk."""
    return min(
        backbone.trunk.prefix_end(head.record.trainable_blocks)
        for item in batch
        for head in (item.head, *item.extra_heads)
    )


def run_heads(
    backbone: LoadedBackbone,
    batch: Sequence[HeadRequest],
    padded_sizes: Sequence[int],
    start: tuple[Any, int] | None = None,
) -> list[list[PredictionResult]]:
    """Each request's results, in batch order; a request with `extra_heads` gets its rows'
    results head by head (`head` first), its rows stacked once. `padded_sizes`
    (predict.padding): every trunk and head pass is padded up to one of these row counts;
    empty: no padding. `start`: (state, stage), the batch's rows already run up to `stage`
    (collate_rows, then run_prefix; at most first_split), instead of from their inputs."""
    trunk = backbone.trunk
    device = backbone.device
    # Rows are stacked request by request: request i owns rows [starts[i], starts[i+1]).
    starts = [0]
    for item in batch:
        starts.append(starts[-1] + len(item.examples))
    state, stage = start if start is not None else (collate_rows(backbone, batch, padded_sizes), 0)
    # Requests grouped by head (each head runs once, over all of its rows) and heads by
    # where they attach; the trunk advances stage by stage over the rows still needed
    # and each group branches off at its split point.
    # A multi-head request is in the group of each of its heads (its rows shared).
    by_head: dict[int, tuple[LoadedHead, list[int]]] = {}
    for position, item in enumerate(batch):
        for head in (item.head, *item.extra_heads):
            by_head.setdefault(id(head), (head, []))[1].append(position)
    groups_at: dict[int, list[tuple[LoadedHead, list[int]]]] = {}
    for head, positions in by_head.values():
        split = trunk.prefix_end(head.record.trainable_blocks)
        groups_at.setdefault(split, []).append((head, positions))
    split_points = sorted(groups_at)
    # (request position, id(head)) -> that head's logits and features for the request's rows
    outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    total_rows = starts[-1]
    active = torch.arange(total_rows)  # batch rows still inside `state`, in order
    with torch.inference_mode():
        for split in split_points:
            state = backbone.run_prefix(state, stage, split)
            stage = split
            # where_in_state[r]: the position of batch row r inside `state` (-1: dropped)
            where_in_state = torch.full((total_rows,), -1, dtype=torch.long)
            where_in_state[active] = torch.arange(len(active))
            for head, positions in groups_at[split]:
                rows = torch.cat([torch.arange(starts[p], starts[p + 1]) for p in positions])
                head_state = (
                    state
                    if len(rows) == len(active)
                    else trunk.select(
                        state, padded_index(where_in_state[rows], padded_sizes).to(device)
                    )
                )
                features = head.module.features(head_state)  # [rows + padding, D]
                logits = head.module.classify(features).float().cpu()  # [rows + padding, C]
                wanted = any(batch[p].return_embedding for p in positions)
                group_features = features.float().cpu() if wanted else None
                offset = 0
                for p in positions:
                    count = starts[p + 1] - starts[p]
                    outputs[p, id(head)] = (
                        logits[offset : offset + count],
                        group_features[offset : offset + count]
                        if group_features is not None and batch[p].return_embedding
                        else None,
                    )
                    offset += count
            if split == split_points[-1]:
                break
            # Keep only the rows of heads that attach further up (once each: a multi-head
            # request's rows may be wanted by several of them).
            wanted_later = {
                row
                for later in split_points
                if later > split
                for _, positions in groups_at[later]
                for p in positions
                for row in range(starts[p], starts[p + 1])
            }
            keep = torch.tensor(sorted(wanted_later), dtype=torch.long)
            state = trunk.select(state, padded_index(where_in_state[keep], padded_sizes).to(device))
            active = keep
    return [
        [
            result
            for head in (item.head, *item.extra_heads)
            for result in _results(head, *outputs[position, id(head)], item.top_k)
        ]
        for position, item in enumerate(batch)
    ]


def _results(
    head: LoadedHead, logits: torch.Tensor, features: torch.Tensor | None, top_k: int
) -> list[PredictionResult]:
    classes = head.record.class_names
    # Calibrated scores: the head's temperature (1 for heads stored before calibration), a
    # division per head, so every head of a mixed batch gets its own.
    temperature = head.record.temperature
    probabilities = (logits if temperature == 1.0 else logits / temperature).softmax(dim=1)
    k = min(max(top_k, 1), len(classes))
    scores, indices = probabilities.topk(k, dim=1)
    results = []
    for row in range(probabilities.shape[0]):
        ranked = tuple(
            ClassScore(classes[int(i)], float(s))
            for s, i in zip(scores[row].tolist(), indices[row].tolist(), strict=True)
        )
        embedding = tuple(features[row].tolist()) if features is not None else ()
        results.append(PredictionResult(ranked[0].label, ranked[0].score, ranked, embedding))
    return results
