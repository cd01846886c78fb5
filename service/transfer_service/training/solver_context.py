"""What the trainer hands every solver and what each hands back: the job's context (backbone,
configuration, event sink, cancel flag, timing hooks), a running epoch's statistics, the epoch
whose weights are kept, progress events, and held-out evaluation on extracted features."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import EventPayload, TrainingConfig, TrainingProgress
from transfer_service.errors import JobCancelledError
from transfer_service.heads import TaskHead
from transfer_service.training.features import ExtractedData


@dataclass(frozen=True, slots=True)
class SolverContext:
    """One job's training context, shared by the trainer and whichever solver it runs.

    `on_step(seconds)` after each optimiser step; `on_epoch(seconds, examples trained)`
    after each epoch, validation included."""

    backbone: LoadedBackbone
    config: TrainingConfig
    emit: Callable[[EventPayload], None]
    cancelled: threading.Event
    on_step: Callable[[float], None]
    on_epoch: Callable[[float, int], None]

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelledError("cancelled by request")

    def progress(
        self,
        *,
        epoch: int,
        epochs: int,
        step: int,
        total_steps: int,
        stats: EpochStats,
        validation: tuple[float | None, float | None] | None,
        learning_rate: float,
        train_started: float,
        epoch_end: bool,
    ) -> TrainingProgress:
        """A "training" progress event; `train_started` 0 reports no elapsed time."""
        elapsed = time.perf_counter() - train_started if train_started else 0.0
        seconds_per_step = elapsed / max(step, 1)
        examples_done = step * self.config.batch_size
        val_loss, val_accuracy = validation if validation is not None else (None, None)
        return TrainingProgress(
            phase="training",
            epoch=epoch,
            epochs=epochs,
            step=step,
            total_steps=total_steps,
            train_loss=stats.loss,
            train_accuracy=stats.accuracy,
            validation_loss=val_loss,
            validation_accuracy=val_accuracy,
            learning_rate=learning_rate,
            examples_per_second=examples_done / elapsed if elapsed > 0 else 0.0,
            elapsed_seconds=elapsed,
            eta_seconds=seconds_per_step * (total_steps - step),
            epoch_end=epoch_end,
        )


@dataclass(slots=True)
class EpochStats:
    """Running training loss and accuracy over the examples seen so far in one epoch."""

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


@dataclass(frozen=True, slots=True)
class HeldOut:
    """Predictions on examples the kept head (or, cross-validating, the fold's fit) did not
    train on: what the head's evaluation report and temperature are computed from."""

    logits: torch.Tensor  # [n, C] float32, CPU
    labels: torch.Tensor  # [n] class indices, CPU
    source: str  # EvaluationReport.source


@dataclass(frozen=True, slots=True)
class KeptEpoch:
    """The epoch whose weights are kept."""

    stats: EpochStats
    validation_loss: float | None
    validation_accuracy: float | None
    epoch: int
    # Set by a solver whose held-out predictions are not the kept head's on the validation
    # rows (cross-validation); otherwise the trainer computes those (held_out_logits).
    held_out: HeldOut | None = None


def evaluate(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    positions: tuple[int, ...],
    labels: torch.Tensor,
    probe: bool,
    prefix_end: int,
) -> tuple[float | None, float | None]:
    """Mean loss and accuracy over `positions` (without augmentation or dropout)."""
    if not positions:
        return None, None
    head.eval()
    rows = torch.tensor(positions, dtype=torch.long)
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for chunk in torch.split(rows, 256):
            device_chunk, logits = _chunk_logits(context, head, data, chunk, probe)
            targets = labels.index_select(0, device_chunk)
            loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=1) == targets).sum())
    return loss_sum / len(rows), correct / len(rows)


def held_out_logits(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    positions: tuple[int, ...],
    probe: bool,
    prefix_end: int,
) -> torch.Tensor:
    """[len(positions), C] logits of the head (in eval mode) on extracted rows, float32 on
    the CPU, as `evaluate` computes them."""
    head.eval()
    rows = torch.tensor(positions, dtype=torch.long)
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for chunk in torch.split(rows, 256):
            context.raise_if_cancelled()
            _, logits = _chunk_logits(context, head, data, chunk, probe)
            chunks.append(logits.float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Per-class weights [C] from class counts [C]: inverse frequency, mean 1 over the
    examples counted."""
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def _chunk_logits(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    chunk: torch.Tensor,
    probe: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk` (extracted row indices, CPU) on the device, and the head's [len(chunk), C]
    logits on those rows: its classifier on the pooled features for a probe, else its trunk
    blocks from the stored prefix states. The one computation evaluation and held-out
    predictions share."""
    device_chunk = chunk.to(context.device)
    if probe:
        return device_chunk, head.classify(data.pooled.index_select(0, device_chunk))
    assert data.prefix_states is not None
    states = [data.prefix_states[i] for i in chunk.tolist()]
    return device_chunk, head(context.backbone.trunk.collate(states))
