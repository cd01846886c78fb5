"""Task heads: the small trainable part attached at a backbone's split point.

A head owns copies of the last `trainable_blocks` stages (none for a linear probe), the
trunk's pooling, a feature standardisation (buffers fitted on the training features) and a
classifier. It never holds the backbone itself: many heads share one resident trunk.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfer_service.backbones.cache import BackboneCache
from transfer_service.backbones.trunks import Trunk
from transfer_service.domain import HeadRecord
from transfer_service.errors import FailedPreconditionError

HEAD_TYPES = ("linear", "mlp", "prototype")


class PrototypeClassifier(nn.Module):
    """Cosine similarity to per-class prototypes (means of L2-normalised embeddings), divided
    by a temperature. Built from data in one pass, with no gradient steps."""

    prototypes: torch.Tensor  # [C, D] buffer, rows L2-normalised
    temperature: torch.Tensor  # [] buffer

    def __init__(self, feature_dim: int, num_classes: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_classes, feature_dim))
        self.register_buffer("temperature", torch.tensor(temperature))

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """embeddings [N, D] (standardised features), labels [N] class indices."""
        normalised = nn.functional.normalize(embeddings, dim=1)
        for class_index in range(self.prototypes.shape[0]):
            members = normalised[labels == class_index]
            self.prototypes[class_index] = nn.functional.normalize(members.mean(dim=0), dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, C] logits."""
        similarity = nn.functional.normalize(features, dim=1) @ self.prototypes.T
        return similarity / self.temperature


def make_classifier(
    head_type: str, feature_dim: int, num_classes: int, hidden_dim: int, dropout: float
) -> nn.Module:
    if head_type == "mlp":
        return nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )
    if head_type == "prototype":
        return PrototypeClassifier(feature_dim, num_classes)
    return nn.Linear(feature_dim, num_classes)


class TaskHead(nn.Module):
    feature_mean: torch.Tensor  # [D] buffer
    feature_scale: torch.Tensor  # [D] buffer
    _pool: Callable[[Any], torch.Tensor]

    def __init__(
        self,
        suffix: list[nn.Module],
        pool: Callable[[Any], torch.Tensor],
        classifier: nn.Module,
        feature_dim: int,
    ) -> None:
        super().__init__()
        self.suffix = nn.ModuleList(suffix)
        self._pool = pool
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))
        self.classifier = classifier

    def features(self, state: Any) -> torch.Tensor:
        """Pooled features [B, D] from the trunk-prefix state of B rows."""
        for stage in self.suffix:
            state = stage(state)
        return self._pool(state)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_scale

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] pooled features -> [B, C] logits."""
        return self.classifier(self.standardize(features))  # type: ignore[no-any-return]

    def set_unfrozen_blocks(self, count: int) -> None:
        """Progressive unfreezing: only the last `count` suffix blocks train (the rest are
        frozen and in eval mode, so dropout there is off too)."""
        first_trainable = len(self.suffix) - count
        for index, block in enumerate(self.suffix):
            trainable = index >= first_trainable
            block.requires_grad_(trainable)
            if not trainable:
                block.eval()

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
    trunk: Trunk,
    trainable_blocks: int,
    num_classes: int,
    head_type: str = "linear",
    hidden_dim: int = 256,
    dropout: float = 0.2,
) -> TaskHead:
    """A fresh head whose suffix starts as a copy of the pretrained trunk's last stages."""
    suffix = [copy.deepcopy(stage) for stage in trunk.stages[trunk.prefix_end(trainable_blocks) :]]
    classifier = make_classifier(head_type, trunk.feature_dim, num_classes, hidden_dim, dropout)
    head = TaskHead(suffix, trunk.pool, classifier, trunk.feature_dim)
    head.to(next(trunk.parameters()).device)
    head.requires_grad_(True)
    return head


def head_weights(head: TaskHead) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors (what safetensors stores)."""
    return {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in head.state_dict().items()
    }


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what keeping it loaded costs."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@dataclass(frozen=True, slots=True)
class LoadedHead:
    record: HeadRecord
    module: TaskHead


def _admit_any(record: HeadRecord) -> None:
    """HeadCache.get's default: no check."""


@dataclass(slots=True)
class _Entry:
    loaded: LoadedHead
    size: int


@dataclass(eq=False, slots=True)  # identity equality: list.remove must find this very load
class _Load:
    """One load in progress; `discarded` is set when its head is discarded meanwhile."""

    discarded: bool = False


class HeadCache:
    """LRU of heads loaded onto the backbone's device, keyed by head id, bounded both by a
    count (`max_entries`) and by resident bytes (`max_bytes`, parameters and buffers; None:
    the count alone). A head larger than the whole byte budget is still served, by the call
    that loaded it, but not kept (counted as an eviction): every call loads it again.

    `discard` is final for loads in flight: a `get` that started loading before a discard
    returns what it read to its own caller but does not cache it, so once a DeleteHead has
    discarded the head (after removing its files) no later call is served from memory."""

    def __init__(
        self,
        backbones: BackboneCache,
        load_record: Callable[[str], HeadRecord],
        load_weights: Callable[[str], dict[str, torch.Tensor]],
        max_entries: int,
        on_event: Callable[[str, str], None] | None = None,
        on_load: Callable[[float], None] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._on_load = on_load or (lambda seconds: None)
        self._backbones = backbones
        self._load_record = load_record
        self._load_weights = load_weights
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._on_event = on_event or (lambda event, name: None)
        self._heads: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._loading: dict[str, list[_Load]] = {}
        self._lock = threading.Lock()

    def get(self, head_id: str, admit: Callable[[HeadRecord], None] = _admit_any) -> LoadedHead:
        """Blocking: may load the head and its backbone. Call off the event loop. `admit`
        sees the head's record before the head is served, or its backbone and weights are
        read, and raises to refuse it (the caller's ownership check)."""
        ticket = _Load()
        resident = self.get_resident(head_id, admit)
        if resident is not None:
            return resident
        with self._lock:
            self._loading.setdefault(head_id, []).append(ticket)
        try:
            loaded = self._load(head_id, admit)
            size = module_bytes(loaded.module)
        except BaseException:
            with self._lock:
                self._end_load(head_id, ticket)
            raise
        with self._lock:
            self._end_load(head_id, ticket)
            if not ticket.discarded:
                self._insert(head_id, _Entry(loaded, size))
        return loaded

    def get_resident(
        self, head_id: str, admit: Callable[[HeadRecord], None] = _admit_any
    ) -> LoadedHead | None:
        """The head if it is resident (None: not loaded; nothing is counted then, so a
        caller that goes on to `get` counts exactly one hit or miss per resolution). Does
        not block: a warm Predict resolves its head on the event loop. A hit counts and
        refreshes the head's LRU place, once `admit` has passed it."""
        with self._lock:
            entry = self._heads.get(head_id)
        if entry is None:
            return None
        admit(entry.loaded.record)
        # Only an admitted call keeps the head warm: another tenant's probes must not.
        with self._lock:
            if self._heads.get(head_id) is entry:
                self._heads.move_to_end(head_id)
        self._on_event("hit", "head")
        return entry.loaded

    def _load(self, head_id: str, admit: Callable[[HeadRecord], None]) -> LoadedHead:
        load_started = time.perf_counter()
        record = self._load_record(head_id)
        admit(record)
        # A miss is a head that exists and was admitted, but not resident: an unknown id or
        # another tenant's head is NOT_FOUND, not a miss.
        self._on_event("miss", "head")
        backbone = self._backbones.get(record.backbone)
        module = build_head(
            backbone.trunk,
            record.trainable_blocks,
            len(record.class_names),
            record.head_type,
            record.hidden_dim,
        )
        weights = self._load_weights(head_id)
        try:
            module.load_state_dict(weights, strict=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            raise FailedPreconditionError(
                f"head {head_id!r}: stored weights do not fit its metadata; the head is "
                "corrupt: delete it and train again"
            ) from exc
        module.requires_grad_(False)
        module.eval()
        self._on_load(time.perf_counter() - load_started)
        return LoadedHead(record, module)

    def peek(self, head_id: str) -> LoadedHead | None:
        """The head if resident, for inspection: counts nothing and keeps its LRU place
        (a Predict resolves heads with `get_resident` / `get`, which count)."""
        with self._lock:
            entry = self._heads.get(head_id)
            return entry.loaded if entry is not None else None

    def put(self, loaded: LoadedHead) -> None:
        """Caches a head built elsewhere (a job's freshly trained one), within the bounds."""
        entry = _Entry(loaded, module_bytes(loaded.module))
        with self._lock:
            self._insert(loaded.record.head_id, entry)

    def discard(self, head_id: str) -> None:
        with self._lock:
            entry = self._heads.pop(head_id, None)
            if entry is not None:
                self._bytes -= entry.size
            for ticket in self._loading.get(head_id, ()):
                ticket.discarded = True

    def resident_ids(self) -> list[str]:
        """The ids of the heads held now (for the store's check of deleted heads)."""
        with self._lock:
            return list(self._heads)

    def resident_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._heads)

    def _end_load(self, head_id: str, ticket: _Load) -> None:
        tickets = self._loading[head_id]
        tickets.remove(ticket)
        if not tickets:
            del self._loading[head_id]

    def _insert(self, head_id: str, entry: _Entry) -> None:
        """Under the lock: adds `entry` as the newest, then evicts the oldest until both
        bounds hold again (never `entry` itself: it fits, or it is not kept at all)."""
        replaced = self._heads.pop(head_id, None)
        if replaced is not None:
            self._bytes -= replaced.size
        if self._max_bytes is not None and entry.size > self._max_bytes:
            self._on_event("evict", "head")
            return
        self._heads[head_id] = entry
        self._bytes += entry.size
        while len(self._heads) > self._max_entries or (
            self._max_bytes is not None and self._bytes > self._max_bytes
        ):
            _, evicted = self._heads.popitem(last=False)
            self._bytes -= evicted.size
            self._on_event("evict", "head")
