"""Task heads: the small trainable part attached at a backbone's split point.

A head owns copies of the last `trainable_blocks` stages (none for a linear probe), the
trunk's pooling, a feature standardisation (buffers fitted on the training features) and a
classifier. It never holds the backbone itself: many heads share one resident trunk.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.backbones.cache import BackboneCache
from service.backbones.trunks import Trunk
from service.domain import HeadRecord


class TaskHead(nn.Module):
    feature_mean: torch.Tensor  # [D] buffer
    feature_scale: torch.Tensor  # [D] buffer
    _pool: Callable[[Any], torch.Tensor]

    def __init__(
        self,
        suffix: list[nn.Module],
        pool: Callable[[Any], torch.Tensor],
        feature_dim: int,
        num_classes: int,
        hidden_dim: int = 0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.suffix = nn.ModuleList(suffix)
        self._pool = pool
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))
        self.classifier: nn.Module
        if hidden_dim > 0:
            self.classifier = nn.Sequential(
                nn.Linear(feature_dim, hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, num_classes),
            )
        else:
            self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, state: Any) -> torch.Tensor:
        """Pooled features [B, D] from the trunk-prefix state of B rows."""
        for stage in self.suffix:
            state = stage(state)
        return self._pool(state)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] pooled features -> [B, C] logits."""
        standardized = (features - self.feature_mean) / self.feature_scale
        return self.classifier(standardized)  # type: ignore[no-any-return]

    def forward(self, state: Any) -> torch.Tensor:
        return self.classify(self.features(state))

    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Fits the standardisation on training features [N, D]: per-dimension centring and
        one global scale. Per-dimension scaling would blow up dimensions that happen to be
        near-constant on a small training set (dead ReLUs) but not on new inputs."""
        centred = features - features.mean(dim=0)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_scale.fill_(float(centred.pow(2).mean().sqrt().clamp(min=1e-6)))

    def train(self, mode: bool = True) -> TaskHead:
        super().train(mode)
        # BatchNorm statistics stay frozen even in unfrozen blocks: small task sets give
        # noisy batch statistics that would wreck the pretrained ones.
        for module in self.suffix.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def build_head(
    trunk: Trunk, trainable_blocks: int, num_classes: int, hidden_dim: int = 0
) -> TaskHead:
    """A fresh head whose suffix starts as a copy of the pretrained trunk's last stages."""
    suffix = [copy.deepcopy(stage) for stage in trunk.stages[trunk.prefix_end(trainable_blocks) :]]
    head = TaskHead(suffix, trunk.pool, trunk.feature_dim, num_classes, hidden_dim)
    head.to(next(trunk.parameters()).device)
    head.requires_grad_(True)
    return head


def head_weights(head: TaskHead) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors (what safetensors stores)."""
    return {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in head.state_dict().items()
    }


@dataclass(frozen=True, slots=True)
class LoadedHead:
    record: HeadRecord
    module: TaskHead


class HeadCache:
    """Bounded LRU of heads loaded onto the backbone's device, keyed by head id."""

    def __init__(
        self,
        backbones: BackboneCache,
        load_record: Callable[[str], HeadRecord],
        load_weights: Callable[[str], dict[str, torch.Tensor]],
        max_entries: int,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._backbones = backbones
        self._load_record = load_record
        self._load_weights = load_weights
        self._max_entries = max_entries
        self._on_event = on_event or (lambda event, name: None)
        self._heads: OrderedDict[str, LoadedHead] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, head_id: str) -> LoadedHead:
        """Blocking: may load the head and its backbone. Call off the event loop."""
        with self._lock:
            loaded = self._heads.get(head_id)
            if loaded is not None:
                self._heads.move_to_end(head_id)
                self._on_event("hit", "head")
                return loaded
        self._on_event("miss", "head")
        record = self._load_record(head_id)
        backbone = self._backbones.get(record.backbone)
        module = build_head(
            backbone.trunk, record.trainable_blocks, len(record.class_names), record.hidden_dim
        )
        module.load_state_dict(self._load_weights(head_id), strict=True)
        module.requires_grad_(False)
        module.eval()
        loaded = LoadedHead(record, module)
        with self._lock:
            self._heads[head_id] = loaded
            while len(self._heads) > self._max_entries:
                self._heads.popitem(last=False)
                self._on_event("evict", "head")
        return loaded

    def peek(self, head_id: str) -> LoadedHead | None:
        with self._lock:
            return self._heads.get(head_id)

    def put(self, loaded: LoadedHead) -> None:
        with self._lock:
            self._heads[loaded.record.head_id] = loaded

    def discard(self, head_id: str) -> None:
        with self._lock:
            self._heads.pop(head_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._heads)
