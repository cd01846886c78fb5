"""The training loop: AdamW, warm-up then cosine decay, early stopping on validation loss
with the best weights restored, progress reported through a callback."""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.backbones.cache import LoadedBackbone
from service.domain import (
    EventPayload,
    FineTuneSpec,
    JobStarted,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)
from service.errors import JobCancelledError
from service.heads import TaskHead, build_head
from service.training.features import estimate_state_bytes, extract
from service.training.split import Split, stratified_split

# Unfrozen pretrained blocks learn this much slower than the fresh classifier.
BLOCK_LR_FACTOR = 0.1
WEIGHT_DECAY = 1e-4
GRAD_CLIP_NORM = 1.0


@dataclass(frozen=True, slots=True)
class TrainingResult:
    head: TaskHead
    class_names: tuple[str, ...]
    metrics: TrainingMetrics


@dataclass(slots=True)
class _EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.seen += count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


class Trainer:
    def __init__(
        self,
        backbone: LoadedBackbone,
        spec: FineTuneSpec,
        *,
        feature_cache_bytes: int,
        emit: Callable[[EventPayload], None],
        cancelled: threading.Event,
        on_step: Callable[[float], None] | None = None,
    ) -> None:
        self._backbone = backbone
        self._spec = spec
        self._config = spec.config
        self._feature_cache_bytes = feature_cache_bytes
        self._emit = emit
        self._cancelled = cancelled
        self._on_step = on_step or (lambda seconds: None)
        self._device = backbone.device

    def run(self) -> TrainingResult:
        config = self._config
        trunk = self._backbone.trunk
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        examples = self._spec.examples
        split = stratified_split(
            [example.label for example in examples], config.validation_fraction, config.seed
        )
        prefix_end = trunk.prefix_end(config.trainable_blocks)
        head = build_head(trunk, config.trainable_blocks, len(split.class_names))
        probe = prefix_end == trunk.num_stages  # head is a classifier on pooled features
        # Pooled probe features are tiny and always kept; deeper states only when they fit.
        cache_train = not config.augment and (probe or self._states_fit(prefix_end))
        steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
        self._emit(self._started_event(split, cache_train, steps_per_epoch))

        started = time.perf_counter()
        train_set = set(split.train)
        data = extract(
            self._backbone,
            head,
            examples,
            prefix_end,
            keep_states=lambda i: cache_train or i not in train_set,
            cancelled=self._cancelled,
            on_progress=lambda done: self._emit(
                self._extraction_progress(done, len(examples), started)
            ),
        )
        train_index = torch.tensor(split.train, dtype=torch.long)
        head.set_feature_statistics(data.pooled.index_select(0, train_index.to(self._device)))

        optimizer = self._optimizer(head)
        total_steps = steps_per_epoch * config.epochs
        warmup = max(1, min(steps_per_epoch, total_steps // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _warmup_cosine(step, warmup, total_steps)
        )
        loss_fn = nn.CrossEntropyLoss()
        labels = split.labels.to(self._device)

        best_loss = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        best: tuple[_EpochStats, float | None, float | None, int] | None = None
        epochs_without_gain = 0
        step = 0
        stopped_early = False
        epoch = 0
        train_started = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            head.train()
            stats = _EpochStats()
            order = train_index[torch.randperm(len(train_index), generator=generator)]
            for batch_rows in torch.split(order, config.batch_size):
                if self._cancelled.is_set():
                    raise JobCancelledError("cancelled by request")
                step_started = time.perf_counter()
                rows = batch_rows.tolist()
                if probe and not config.augment:
                    logits = head.classify(data.pooled.index_select(0, batch_rows.to(self._device)))
                else:
                    logits = head(self._train_state(data, rows, prefix_end, generator))
                targets = labels.index_select(0, batch_rows.to(self._device))
                loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(head.parameters(), GRAD_CLIP_NORM)
                optimizer.step()
                scheduler.step()
                step += 1
                correct = int((logits.argmax(dim=1) == targets).sum())
                stats.add(loss.item(), correct, len(rows))
                self._on_step(time.perf_counter() - step_started)
                if step % config.progress_every_steps == 0:
                    self._emit(
                        self._progress(
                            epoch, step, total_steps, stats, None, optimizer, train_started, False
                        )
                    )
            val_loss, val_accuracy = self._evaluate(head, data, split, labels, probe, prefix_end)
            self._emit(
                self._progress(
                    epoch,
                    step,
                    total_steps,
                    stats,
                    (val_loss, val_accuracy),
                    optimizer,
                    train_started,
                    True,
                )
            )
            monitored = val_loss if val_loss is not None else stats.loss
            if monitored < best_loss - 1e-4:
                best_loss = monitored
                best_state = copy.deepcopy(head.state_dict())
                best = (stats, val_loss, val_accuracy, epoch)
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
                patience = config.early_stopping_patience
                if val_loss is not None and patience > 0 and epochs_without_gain >= patience:
                    stopped_early = True
                    break
        assert best_state is not None and best is not None
        head.load_state_dict(best_state)
        head.eval()
        head.requires_grad_(False)
        best_stats, best_val_loss, best_val_accuracy, best_epoch = best
        metrics = TrainingMetrics(
            train_loss=best_stats.loss,
            train_accuracy=best_stats.accuracy,
            validation_loss=best_val_loss,
            validation_accuracy=best_val_accuracy,
            best_epoch=best_epoch,
            epochs_run=epoch,
            stopped_early=stopped_early,
            training_seconds=time.perf_counter() - started,
        )
        return TrainingResult(head, split.class_names, metrics)

    def _states_fit(self, prefix_end: int) -> bool:
        per_example = estimate_state_bytes(self._backbone, self._spec.examples[0], prefix_end)
        return per_example * len(self._spec.examples) <= self._feature_cache_bytes

    def _optimizer(self, head: TaskHead) -> torch.optim.Optimizer:
        lr = self._config.learning_rate
        groups: list[dict[str, Any]] = [{"params": list(head.classifier.parameters()), "lr": lr}]
        block_params = list(head.suffix.parameters())
        if block_params:
            groups.append({"params": block_params, "lr": lr * BLOCK_LR_FACTOR})
        return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)

    def _train_state(
        self, data: Any, rows: list[int], prefix_end: int, generator: torch.Generator
    ) -> Any:
        trunk = self._backbone.trunk
        if data.raw is None:
            return trunk.collate([data.prefix_states[i] for i in rows])
        augment = generator if self._config.augment else None
        inputs = self._backbone.preprocessor.finish([data.raw[i] for i in rows], augment)
        batch = trunk.to_device(trunk.collate(inputs), self._device)
        return self._backbone.run_prefix(batch, 0, prefix_end)

    def _evaluate(
        self,
        head: TaskHead,
        data: Any,
        split: Split,
        labels: torch.Tensor,
        probe: bool,
        prefix_end: int,
    ) -> tuple[float | None, float | None]:
        if not split.validation:
            return None, None
        head.eval()
        rows = torch.tensor(split.validation, dtype=torch.long)
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for chunk in torch.split(rows, 256):
                if probe:
                    logits = head.classify(data.pooled.index_select(0, chunk.to(self._device)))
                else:
                    state = self._backbone.trunk.collate(
                        [data.prefix_states[i] for i in chunk.tolist()]
                    )
                    logits = head(state)
                targets = labels.index_select(0, chunk.to(self._device))
                loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
        return loss_sum / len(rows), correct / len(rows)

    def _started_event(self, split: Split, cached: bool, steps_per_epoch: int) -> JobStarted:
        config = self._config
        counts = torch.bincount(split.labels, minlength=len(split.class_names)).tolist()
        return JobStarted(
            backbone=self._spec.backbone,
            head_name=self._spec.head_name,
            class_names=split.class_names,
            train_examples=len(split.train),
            validation_examples=len(split.validation),
            plan=TrainingPlan(
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                trainable_blocks=config.trainable_blocks,
                augment=config.augment,
                cached_features=cached,
                steps_per_epoch=steps_per_epoch,
                device=str(self._device),
                early_stopping_patience=config.early_stopping_patience,
            ),
            class_counts=tuple(zip(split.class_names, counts, strict=True)),
        )

    def _extraction_progress(self, done: int, total: int, started: float) -> TrainingProgress:
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        return TrainingProgress(
            phase="extracting_features",
            epoch=0,
            epochs=self._config.epochs,
            step=done,
            total_steps=total,
            train_loss=0.0,
            train_accuracy=0.0,
            validation_loss=None,
            validation_accuracy=None,
            learning_rate=0.0,
            examples_per_second=rate,
            elapsed_seconds=elapsed,
            eta_seconds=(total - done) / rate if rate > 0 else 0.0,
            epoch_end=False,
        )

    def _progress(
        self,
        epoch: int,
        step: int,
        total_steps: int,
        stats: _EpochStats,
        validation: tuple[float | None, float | None] | None,
        optimizer: torch.optim.Optimizer,
        train_started: float,
        epoch_end: bool,
    ) -> TrainingProgress:
        elapsed = time.perf_counter() - train_started
        seconds_per_step = elapsed / max(step, 1)
        examples_done = step * self._config.batch_size
        val_loss, val_accuracy = validation if validation is not None else (None, None)
        return TrainingProgress(
            phase="training",
            epoch=epoch,
            epochs=self._config.epochs,
            step=step,
            total_steps=total_steps,
            train_loss=stats.loss,
            train_accuracy=stats.accuracy,
            validation_loss=val_loss,
            validation_accuracy=val_accuracy,
            learning_rate=float(optimizer.param_groups[0]["lr"]),
            examples_per_second=examples_done / elapsed if elapsed > 0 else 0.0,
            elapsed_seconds=elapsed,
            eta_seconds=seconds_per_step * (total_steps - step),
            epoch_end=epoch_end,
        )


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
