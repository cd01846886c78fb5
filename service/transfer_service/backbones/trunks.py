"""A backbone as a sequence of stages plus a pooling step.

A task head attaches at a split point: the first `len(stages) - trainable_blocks` stages are
the shared, frozen trunk prefix; the head owns copies of the remaining stages, the pooling
and a classifier. Images flow through stages as tensors [B, C, H, W]; texts as `TextState`.
`collate`/`split`/`select` move between per-example states and batches, which is what lets
the feature cache and the Predict batcher treat both modalities alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfer_service.domain import Modality


@dataclass(frozen=True, slots=True)
class TextState:
    """Tokens before the embedding stage, hidden states after it.

    values: [B, L] int64 token ids, or [B, L, D] hidden states; mask: [B, L] (1 = real token).
    """

    values: torch.Tensor
    mask: torch.Tensor


class Trunk(nn.Module):
    """Frozen pretrained stages; subclasses define pooling and batching of their state type."""

    modality: Modality
    # Dimensions of every state tensor that change from batch to batch (batch; tokens).
    varying_dims: tuple[int, ...]

    def __init__(self, stages: Sequence[nn.Module], feature_dim: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.feature_dim = feature_dim

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def prefix_end(self, trainable_blocks: int) -> int:
        """Index of the first stage a head with `trainable_blocks` owns (-1 means all)."""
        if trainable_blocks < 0:
            return 0
        return self.num_stages - trainable_blocks

    def run_stages(self, state: Any, start: int, stop: int) -> Any:
        for stage in self.stages[start:stop]:
            state = stage(state)
        return state

    # Static in every subclass, so a head can hold the pooling without holding the trunk.
    @staticmethod
    def pool(state: Any) -> torch.Tensor:
        raise NotImplementedError

    def collate(self, examples: Sequence[Any]) -> Any:
        raise NotImplementedError

    def split(self, state: Any) -> list[Any]:
        raise NotImplementedError

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        raise NotImplementedError

    def to_device(self, state: Any, device: torch.device) -> Any:
        raise NotImplementedError

    def example_bytes(self, example: Any) -> int:
        raise NotImplementedError

    def to_float(self, state: Any) -> Any:
        """The state with floating tensors in fp32 (after reduced-precision stages)."""
        raise NotImplementedError

    def map_tensors(self, state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """The state with `fn` applied to each of its tensors."""
        raise NotImplementedError


class ImageTrunk(Trunk):
    """CNN stages over channels-last image tensors, global-average pooled."""

    modality = Modality.IMAGE
    varying_dims = (0,)  # the side is fixed per backbone

    @staticmethod
    def pool(state: torch.Tensor) -> torch.Tensor:
        return state.mean(dim=(2, 3))  # [B, C, H, W] -> [B, C]

    def collate(self, examples: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(examples)).contiguous(memory_format=torch.channels_last)

    def split(self, state: torch.Tensor) -> list[torch.Tensor]:
        return [row.contiguous() for row in state.unbind(0)]

    def select(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, rows)

    def to_device(self, state: torch.Tensor, device: torch.device) -> torch.Tensor:
        return state.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def example_bytes(self, example: torch.Tensor) -> int:
        return example.numel() * example.element_size()

    def to_float(self, state: torch.Tensor) -> torch.Tensor:
        return state.float()

    def map_tensors(
        self, state: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        return fn(state)


class BertEmbeddingStage(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, state: TextState) -> TextState:
        token_types = torch.zeros_like(state.values)
        hidden = self.embeddings(input_ids=state.values, token_type_ids=token_types)
        return TextState(hidden, state.mask)


class BertLayerStage(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, state: TextState) -> TextState:
        hidden = state.values
        # Additive attention mask [B, 1, 1, L]: 0 for real tokens, -inf-ish for padding.
        additive = (1.0 - state.mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
            hidden.dtype
        ).min
        out = self.layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
        return TextState(hidden, state.mask)


class TextTrunk(Trunk):
    """BERT-family encoder; mean-pooled over real tokens, then L2-normalised."""

    modality = Modality.TEXT
    varying_dims = (0, 1)  # batch, and tokens (padded to the longest text of each batch)

    @staticmethod
    def pool(state: TextState) -> torch.Tensor:
        mask = state.mask.unsqueeze(-1).to(state.values.dtype)  # [B, L, 1]
        summed = (state.values * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(mean, dim=-1)  # [B, D]

    def collate(self, examples: Sequence[TextState]) -> TextState:
        length = max(example.mask.shape[-1] for example in examples)
        values = [_pad_to(example.values, length) for example in examples]
        masks = [_pad_to(example.mask, length) for example in examples]
        return TextState(torch.stack(values), torch.stack(masks))

    def split(self, state: TextState) -> list[TextState]:
        lengths = state.mask.sum(dim=1).tolist()
        return [
            TextState(state.values[i, : int(n)].clone(), state.mask[i, : int(n)].clone())
            for i, n in enumerate(lengths)
        ]

    def select(self, state: TextState, rows: torch.Tensor) -> TextState:
        return TextState(state.values.index_select(0, rows), state.mask.index_select(0, rows))

    def to_device(self, state: TextState, device: torch.device) -> TextState:
        return TextState(
            state.values.to(device, non_blocking=True), state.mask.to(device, non_blocking=True)
        )

    def to_float(self, state: TextState) -> TextState:
        values = state.values.float() if state.values.is_floating_point() else state.values
        return TextState(values, state.mask)

    def map_tensors(
        self, state: TextState, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> TextState:
        return TextState(fn(state.values), fn(state.mask))

    def example_bytes(self, example: TextState) -> int:
        return (
            example.values.numel() * example.values.element_size()
            + example.mask.numel() * example.mask.element_size()
        )


def _pad_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pads dimension 0 (the token axis of one example) up to `length`."""
    missing = length - tensor.shape[0]
    if missing == 0:
        return tensor
    padding = tensor.new_zeros((missing, *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)
