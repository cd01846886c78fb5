"""The training loop (solver "adamw"): epochs of gradient steps on the head and the trunk
blocks it unfroze, the way the transfer-learning playbook goes: AdamW with warm-up then cosine
decay, discriminative learning rates and optional progressive unfreezing for unfrozen blocks,
class balancing by oversampling or a weighted loss, label smoothing, gradient clipping, and
early stopping on validation loss with the best epoch's weights restored.

A linear probe trained this way (no unfrozen blocks, no augmentation) steps on the cached
pooled features alone; otherwise each batch runs the head from the cached trunk-prefix
states, or from the raw inputs through the prefix when those states were not cached."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import nn

from transfer_service.domain import TrainingConfig
from transfer_service.heads import TaskHead
from transfer_service.training.features import ExtractedData
from transfer_service.training.solver_context import (
    EpochStats,
    KeptEpoch,
    SolverContext,
    evaluate,
    inverse_frequency,
)
from transfer_service.training.split import Split

# The top unfrozen block learns this much slower than the fresh classifier; blocks below it
# slower still, by `layer_lr_decay` per block.
BLOCK_LR_FACTOR = 0.1


def fine_tune(
    context: SolverContext,
    head: TaskHead,
    data: ExtractedData,
    split: Split,
    labels: torch.Tensor,
    train_counts: torch.Tensor,
    balance: str,
    probe: bool,
    prefix_end: int,
    generator: torch.Generator,
) -> tuple[KeptEpoch, int]:
    """Trains; returns the kept (best) epoch and how many epochs ran.

    `labels` [N] on the device, for every extracted example; `train_counts` [C] training
    examples per class."""
    config = context.config
    device = context.device
    train_index = torch.tensor(split.train, dtype=torch.long)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(head, config)
    warmup = max(1, min(steps_per_epoch, total_steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps)
    )
    # Inverse-frequency weights, mean 1 over the training examples.
    inverse = inverse_frequency(train_counts).float()
    loss_fn = nn.CrossEntropyLoss(
        weight=inverse.to(device) if balance == "weighted_loss" else None,
        label_smoothing=config.label_smoothing,
    )
    sample_weights = inverse.index_select(0, split.labels.index_select(0, train_index))
    autocast = device.type == "cuda"  # mixed precision only where it pays

    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    kept: KeptEpoch | None = None
    epochs_without_gain = 0
    step = 0
    train_started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        head.train()
        head.set_unfrozen_blocks(unfrozen_blocks(head, epoch, config.unfreeze_every_epochs))
        stats = EpochStats()
        if balance == "oversample":
            draws = torch.multinomial(
                sample_weights, len(train_index), replacement=True, generator=generator
            )
            order = train_index.index_select(0, draws)
        else:
            order = train_index[torch.randperm(len(train_index), generator=generator)]
        for batch_rows in torch.split(order, config.batch_size):
            context.raise_if_cancelled()
            step_started = time.perf_counter()
            rows = batch_rows.tolist()
            device_rows = batch_rows.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if probe and not config.augment:
                    logits = head.classify(data.pooled.index_select(0, device_rows))
                else:
                    logits = head(_train_state(context, data, rows, prefix_end, generator))
            targets = labels.index_select(0, device_rows)
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if config.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(head.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            correct = int((logits.argmax(dim=1) == targets).sum())
            stats.add(loss.item(), correct, len(rows))
            context.on_step(time.perf_counter() - step_started)
            if step % config.progress_every_steps == 0:
                context.emit(
                    context.progress(
                        epoch=epoch,
                        epochs=config.epochs,
                        step=step,
                        total_steps=total_steps,
                        stats=stats,
                        validation=None,
                        learning_rate=float(optimizer.param_groups[0]["lr"]),
                        train_started=train_started,
                        epoch_end=False,
                    )
                )
        val_loss, val_accuracy = evaluate(
            context, head, data, split.validation, labels, probe, prefix_end
        )
        context.emit(
            context.progress(
                epoch=epoch,
                epochs=config.epochs,
                step=step,
                total_steps=total_steps,
                stats=stats,
                validation=(val_loss, val_accuracy),
                learning_rate=float(optimizer.param_groups[0]["lr"]),
                train_started=train_started,
                epoch_end=True,
            )
        )
        epoch_seconds = time.perf_counter() - epoch_started
        context.on_epoch(epoch_seconds, stats.seen)
        monitored = val_loss if val_loss is not None else stats.loss
        if monitored < best_loss - 1e-4:
            best_loss = monitored
            best_state = copy.deepcopy(head.state_dict())
            kept = KeptEpoch(stats, val_loss, val_accuracy, epoch)
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
            patience = config.early_stopping_patience
            if val_loss is not None and patience > 0 and epochs_without_gain >= patience:
                break
    assert best_state is not None and kept is not None
    head.load_state_dict(best_state)
    return kept, epoch


def unfrozen_blocks(head: TaskHead, epoch: int, unfreeze_every_epochs: int) -> int:
    """How many of the head's trunk blocks train in `epoch` (from 1): all of them, or with
    progressive unfreezing one more every `unfreeze_every_epochs`, the classifier alone first."""
    if unfreeze_every_epochs <= 0:
        return len(head.suffix)
    return min(len(head.suffix), (epoch - 1) // unfreeze_every_epochs)


def build_optimizer(head: TaskHead, config: TrainingConfig) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": list(head.classifier.parameters()), "lr": config.learning_rate}
    ]
    # Discriminative learning rates: the top block BLOCK_LR_FACTOR x the head's, each block
    # below it `layer_lr_decay` x the block above.
    for depth, block in enumerate(reversed(head.suffix)):
        params = list(block.parameters())
        if params:
            lr = config.learning_rate * BLOCK_LR_FACTOR * config.layer_lr_decay**depth
            groups.append({"params": params, "lr": lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _train_state(
    context: SolverContext,
    data: ExtractedData,
    rows: list[int],
    prefix_end: int,
    generator: torch.Generator,
) -> Any:
    """The trunk-prefix state of a training batch: the cached states of `rows`, or, where
    they were not cached, their raw inputs (augmented when asked) run through the prefix."""
    backbone = context.backbone
    trunk = backbone.trunk
    if data.raw is None:
        assert data.prefix_states is not None
        return trunk.collate([data.prefix_states[i] for i in rows])
    augment = generator if context.config.augment else None
    preprocessor = backbone.preprocessor
    loaded = []
    for i in rows:
        encoded = data.raw[i]
        assert encoded is not None
        loaded.append(preprocessor.load(encoded, f"examples[{i}]"))
    inputs = preprocessor.finish(loaded, augment)
    batch = trunk.to_device(trunk.collate(inputs), context.device)
    return backbone.run_prefix(batch, 0, prefix_end, training=True)
