"""The training loop, the way the transfer-learning playbook goes: frozen trunk features
computed once, AdamW with warm-up then cosine decay, discriminative learning rates and
optional progressive unfreezing for unfrozen blocks, class balancing, label smoothing,
gradient clipping, early stopping on validation loss with the best weights restored, and a
report that says whether the head beats the trivial baseline."""

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

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import (
    CROSS_VALIDATION_PHASE,
    EventPayload,
    FineTuneSpec,
    JobStarted,
    JobWarning,
    LabeledExample,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)
from transfer_service.errors import JobCancelledError
from transfer_service.heads import PrototypeClassifier, TaskHead, build_head
from transfer_service.torch_threads import intra_op_threads_within
from transfer_service.training.features import ExtractedData, extract, plan_feature_memory
from transfer_service.training.regularised_probe import (
    DEFAULT_C,
    Candidate,
    ProbeResult,
    RegularisedProbe,
    default_folds,
    fit_cross_validated,
    fit_on_holdout,
)
from transfer_service.training.split import Split, given_split, stratified_split

# The top unfrozen block learns this much slower than the fresh classifier; blocks below it
# slower still, by `layer_lr_decay` per block.
BLOCK_LR_FACTOR = 0.1
# `class_balance = "auto"` weights the loss once the largest class has this many times the
# examples of the smallest.
AUTO_BALANCE_RATIO = 1.5
# Below this many validation examples (or fewer than 3 per class) its metrics are noise.
SMALL_VALIDATION_EXAMPLES = 20


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


@dataclass(frozen=True, slots=True)
class _Kept:
    """The epoch whose weights are kept."""

    stats: _EpochStats
    validation_loss: float | None
    validation_accuracy: float | None
    epoch: int


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
        on_epoch: Callable[[float, float], None] | None = None,
    ) -> None:
        """`on_step(seconds)` after each optimiser step; `on_epoch(seconds, examples per
        second)` after each epoch, validation included."""
        self._on_epoch = on_epoch or (lambda seconds, rate: None)
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
        examples, split = self._examples_and_split()
        prefix_end = trunk.prefix_end(config.trainable_blocks)
        probe = prefix_end == trunk.num_stages  # the head is a classifier on pooled features
        head = build_head(
            trunk,
            config.trainable_blocks,
            len(split.class_names),
            config.head_type,
            config.hidden_dim,
            config.dropout,
        )
        train_index = torch.tensor(split.train, dtype=torch.long)
        train_counts = torch.bincount(
            split.labels.index_select(0, train_index), minlength=len(split.class_names)
        )
        imbalance = float(train_counts.max()) / max(float(train_counts.min()), 1.0)
        balance = _resolve_balance(config.class_balance, imbalance)
        # Pooled features are small and always kept; deeper states only when they fit.
        memory = plan_feature_memory(
            self._backbone,
            examples[0],
            prefix_end,
            probe=probe,
            augment=config.augment,
            train_count=len(split.train),
            validation_count=len(split.validation),
            budget_bytes=self._feature_cache_bytes,
        )
        cache_train = memory.cache_train_states
        prototype = config.head_type == "prototype"
        cross_validated = config.solver == "lbfgs_cv"
        folds = 0
        if cross_validated and not split.validation:
            folds = config.cv_folds or default_folds(train_counts.tolist())
            folds = min(folds, int(train_counts.min()))
            folds = folds if folds >= 2 else 0
        steps_per_epoch = (
            0 if self._single_pass else math.ceil(len(split.train) / config.batch_size)
        )
        self._emit(
            self._started_event(split, cache_train, steps_per_epoch, imbalance, balance, folds)
        )
        self._warn_about_validation(split, folds)

        started = time.perf_counter()
        train_set = set(split.train)
        total = len(examples)
        data = extract(
            self._backbone,
            head,
            examples,
            prefix_end,
            # A probe classifies pooled features: it keeps no prefix states at all.
            keep_states=lambda i: not probe and (cache_train or i not in train_set),
            keep_raw=lambda i: memory.keep_train_inputs and i in train_set,
            budget_bytes=self._feature_cache_bytes,
            cancelled=self._cancelled,
            on_progress=lambda done: self._emit(self._extraction_progress(done, total, started)),
        )
        # The encoded examples are no longer needed: release them (a job's inputs can be
        # hundreds of MB, and it may train for minutes after this).
        del examples
        self._spec = self._spec.without_examples()
        device_train_index = train_index.to(self._device)
        head.set_feature_statistics(data.pooled.index_select(0, device_train_index))
        labels = split.labels.to(self._device)

        regularization_c = None
        if prototype:
            kept, epochs_run = self._fit_prototypes(head, data, split, labels), 1
        elif cross_validated:
            kept, regularization_c = self._fit_regularised(head, data, split, balance, folds)
            epochs_run = 1
        else:
            kept, epochs_run = self._train(
                head, data, split, labels, train_counts, balance, probe, prefix_end, generator
            )
        head.eval()
        head.requires_grad_(False)
        metrics = self._metrics(kept, epochs_run, split, started, folds, regularization_c)
        if metrics.validation_accuracy is not None and not metrics.beats_baseline:
            self._emit(
                JobWarning(
                    "does_not_beat_baseline",
                    f"validation accuracy {metrics.validation_accuracy:.3f} does not beat "
                    f"always answering the most frequent class "
                    f"({metrics.majority_baseline_accuracy:.3f}): the backbone's features do "
                    "not transfer to this task, or the data is too small or noisy",
                )
            )
        return TrainingResult(head, split.class_names, metrics)

    # ---- data ----

    def _examples_and_split(self) -> tuple[tuple[LabeledExample, ...], Split]:
        spec = self._spec
        if spec.validation_examples:
            split = given_split(
                [e.label for e in spec.examples], [e.label for e in spec.validation_examples]
            )
            return spec.examples + spec.validation_examples, split
        labels = [example.label for example in spec.examples]
        # lbfgs_cv validates by k-fold over every example instead of a held-out split.
        fraction = 0.0 if self._config.solver == "lbfgs_cv" else self._config.validation_fraction
        split = stratified_split(labels, fraction, self._config.seed)
        return spec.examples, split

    def _warn_about_validation(self, split: Split, folds: int) -> None:
        classes = len(split.class_names)
        # With k folds each example is held out once.
        validated = len(split.train) if folds else len(split.validation)
        if self._config.solver == "lbfgs_cv" and not validated:
            self._emit(
                JobWarning(
                    "no_validation_set",
                    "a class has a single example, so no cross-validation fold can hold one "
                    "out: the L2 strength is the default (C = 1) and no validation metrics "
                    "will be reported; send 2 or more examples per class",
                )
            )
        elif not validated:
            self._emit(
                JobWarning(
                    "no_validation_set",
                    "no validation examples: early stopping is off and no validation metrics "
                    "will be reported",
                )
            )
        elif validated < max(SMALL_VALIDATION_EXAMPLES, 3 * classes):
            self._emit(
                JobWarning(
                    "small_validation_set",
                    f"only {validated} validation examples for {classes} classes: "
                    "validation metrics and early stopping are noisy; send more data or a "
                    "validation set",
                )
            )

    # ---- heads without gradient steps ----

    def _fit_prototypes(
        self, head: TaskHead, data: ExtractedData, split: Split, labels: torch.Tensor
    ) -> _Kept:
        classifier = head.classifier
        assert isinstance(classifier, PrototypeClassifier)
        classifier.temperature.fill_(self._config.prototype_temperature)
        rows = torch.tensor(split.train, dtype=torch.long, device=self._device)
        with torch.no_grad():
            embeddings = head.standardize(data.pooled.index_select(0, rows))
            classifier.fit(embeddings, labels.index_select(0, rows))
        train_loss, train_accuracy = self._evaluate(head, data, split.train, labels, True, 0)
        assert train_loss is not None and train_accuracy is not None
        stats = _EpochStats()
        stats.add(train_loss, round(train_accuracy * len(rows)), len(rows))
        val_loss, val_accuracy = self._evaluate(head, data, split.validation, labels, True, 0)
        self._emit(self._progress(1, 0, 0, stats, (val_loss, val_accuracy), 0.0, 0.0, True))
        return _Kept(stats, val_loss, val_accuracy, 1)

    # ---- the cross-validated L-BFGS probe ----

    def _fit_regularised(
        self, head: TaskHead, data: ExtractedData, split: Split, balance: str, folds: int
    ) -> tuple[_Kept, float]:
        """Fits the linear classifier by regularised_probe; returns the kept result (validation
        metrics out-of-fold, or on the given validation set) and the C chosen."""
        classifier = head.classifier
        assert isinstance(classifier, nn.Linear)
        rows = torch.tensor(split.train + split.validation, dtype=torch.long)
        labels = split.labels.index_select(0, rows)
        classes = len(split.class_names)
        weights = None
        if balance != "none":  # oversampling and a weighted loss agree in expectation
            counts = torch.bincount(labels, minlength=classes).double()
            weights = _inverse_frequency(counts).index_select(0, labels)
        with torch.no_grad():
            features = head.standardize(data.pooled.index_select(0, rows.to(self._device)))
        started = time.perf_counter()
        scored: list[Candidate] = []

        def report(candidate: Candidate) -> None:
            scored.append(candidate)
            self._emit(
                TrainingProgress(
                    phase=CROSS_VALIDATION_PHASE,
                    epoch=1,
                    epochs=1,
                    step=len(scored),
                    total_steps=0,  # unknown: the search stops once held-out loss keeps rising
                    train_loss=candidate.train_loss,
                    train_accuracy=candidate.train_accuracy,
                    validation_loss=candidate.validation_loss,
                    validation_accuracy=candidate.validation_accuracy,
                    learning_rate=0.0,
                    examples_per_second=0.0,
                    elapsed_seconds=time.perf_counter() - started,
                    eta_seconds=0.0,
                    epoch_end=False,
                    regularization_c=candidate.c,
                )
            )

        train_count = len(split.train)
        # L-BFGS on [N, D] with N, D in the hundreds is a chain of small products: split over
        # two threads it spent most of its time in hand-offs (one 5-fold search: 39 s on two
        # threads of a busy 2-CPU machine, 5.4 s on one).
        with intra_op_threads_within(1):
            probe = RegularisedProbe(
                features,
                labels,
                classes,
                sample_weights=weights,
                label_smoothing=self._config.label_smoothing,
                should_stop=self._raise_if_cancelled,
            )
            if split.validation:
                result: ProbeResult = fit_on_holdout(
                    probe,
                    torch.arange(train_count),
                    torch.arange(train_count, len(rows)),
                    report,
                )
            else:
                result = fit_cross_validated(probe, labels, folds, self._config.seed, report)
        self._on_step(time.perf_counter() - started)
        with torch.no_grad():
            classifier.weight.copy_(result.fit.weight.to(self._device))
            classifier.bias.copy_(result.fit.bias.to(self._device))
        stats = _EpochStats()
        stats.add(result.train_loss, round(result.train_accuracy * train_count), train_count)
        chosen = result.chosen
        validation = (
            (None, None) if chosen is None else (chosen.validation_loss, chosen.validation_accuracy)
        )
        self._emit(self._progress(1, 1, 1, stats, validation, 0.0, started, True))
        c = chosen.c if chosen is not None else DEFAULT_C
        return _Kept(stats, validation[0], validation[1], 1), c

    @property
    def _single_pass(self) -> bool:
        """Heads fitted in one pass over the features, not by epochs: prototypes and the
        lbfgs_cv probe (plan and progress report one epoch, nothing stops early)."""
        return self._config.head_type == "prototype" or self._config.solver == "lbfgs_cv"

    def _raise_if_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelledError("cancelled by request")

    # ---- gradient training ----

    def _train(
        self,
        head: TaskHead,
        data: ExtractedData,
        split: Split,
        labels: torch.Tensor,
        train_counts: torch.Tensor,
        balance: str,
        probe: bool,
        prefix_end: int,
        generator: torch.Generator,
    ) -> tuple[_Kept, int]:
        """Trains; returns the kept (best) epoch and how many epochs ran."""
        config = self._config
        train_index = torch.tensor(split.train, dtype=torch.long)
        steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        optimizer = self._optimizer(head)
        warmup = max(1, min(steps_per_epoch, total_steps // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _warmup_cosine(step, warmup, total_steps)
        )
        # Inverse-frequency weights, mean 1 over the training examples.
        inverse = _inverse_frequency(train_counts).float()
        loss_fn = nn.CrossEntropyLoss(
            weight=inverse.to(self._device) if balance == "weighted_loss" else None,
            label_smoothing=config.label_smoothing,
        )
        sample_weights = inverse.index_select(0, split.labels.index_select(0, train_index))
        autocast = self._device.type == "cuda"  # mixed precision only where it pays

        best_loss = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        kept: _Kept | None = None
        epochs_without_gain = 0
        step = 0
        train_started = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            head.train()
            head.set_unfrozen_blocks(self._unfrozen_blocks(head, epoch))
            stats = _EpochStats()
            if balance == "oversample":
                draws = torch.multinomial(
                    sample_weights, len(train_index), replacement=True, generator=generator
                )
                order = train_index.index_select(0, draws)
            else:
                order = train_index[torch.randperm(len(train_index), generator=generator)]
            for batch_rows in torch.split(order, config.batch_size):
                self._raise_if_cancelled()
                step_started = time.perf_counter()
                rows = batch_rows.tolist()
                device_rows = batch_rows.to(self._device)
                with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=autocast):
                    if probe and not config.augment:
                        logits = head.classify(data.pooled.index_select(0, device_rows))
                    else:
                        logits = head(self._train_state(data, rows, prefix_end, generator))
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
                self._on_step(time.perf_counter() - step_started)
                if step % config.progress_every_steps == 0:
                    lr = float(optimizer.param_groups[0]["lr"])
                    self._emit(
                        self._progress(
                            epoch, step, total_steps, stats, None, lr, train_started, False
                        )
                    )
            val_loss, val_accuracy = self._evaluate(
                head, data, split.validation, labels, probe, prefix_end
            )
            lr = float(optimizer.param_groups[0]["lr"])
            self._emit(
                self._progress(
                    epoch,
                    step,
                    total_steps,
                    stats,
                    (val_loss, val_accuracy),
                    lr,
                    train_started,
                    True,
                )
            )
            epoch_seconds = time.perf_counter() - epoch_started
            self._on_epoch(epoch_seconds, stats.seen / max(epoch_seconds, 1e-9))
            monitored = val_loss if val_loss is not None else stats.loss
            if monitored < best_loss - 1e-4:
                best_loss = monitored
                best_state = copy.deepcopy(head.state_dict())
                kept = _Kept(stats, val_loss, val_accuracy, epoch)
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
                patience = config.early_stopping_patience
                if val_loss is not None and patience > 0 and epochs_without_gain >= patience:
                    break
        assert best_state is not None and kept is not None
        head.load_state_dict(best_state)
        return kept, epoch

    def _unfrozen_blocks(self, head: TaskHead, epoch: int) -> int:
        every = self._config.unfreeze_every_epochs
        if every <= 0:
            return len(head.suffix)
        return min(len(head.suffix), (epoch - 1) // every)

    def _optimizer(self, head: TaskHead) -> torch.optim.Optimizer:
        config = self._config
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

    def _train_state(
        self, data: ExtractedData, rows: list[int], prefix_end: int, generator: torch.Generator
    ) -> Any:
        trunk = self._backbone.trunk
        if data.raw is None:
            assert data.prefix_states is not None
            return trunk.collate([data.prefix_states[i] for i in rows])
        augment = generator if self._config.augment else None
        preprocessor = self._backbone.preprocessor
        loaded = []
        for i in rows:
            encoded = data.raw[i]
            assert encoded is not None
            loaded.append(preprocessor.load(encoded, f"examples[{i}]"))
        inputs = preprocessor.finish(loaded, augment)
        batch = trunk.to_device(trunk.collate(inputs), self._device)
        return self._backbone.run_prefix(batch, 0, prefix_end)

    def _evaluate(
        self,
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
                device_chunk = chunk.to(self._device)
                if probe:
                    logits = head.classify(data.pooled.index_select(0, device_chunk))
                else:
                    assert data.prefix_states is not None
                    states = [data.prefix_states[i] for i in chunk.tolist()]
                    logits = head(self._backbone.trunk.collate(states))
                targets = labels.index_select(0, device_chunk)
                loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
        return loss_sum / len(rows), correct / len(rows)

    # ---- reporting ----

    def _metrics(
        self,
        kept: _Kept,
        epochs_run: int,
        split: Split,
        started: float,
        folds: int = 0,
        regularization_c: float | None = None,
    ) -> TrainingMetrics:
        """With k-fold cross-validation every training example was also a validation one."""
        gap = None
        baseline = None
        beats = True
        if kept.validation_accuracy is not None:
            gap = kept.stats.accuracy - kept.validation_accuracy
            train_labels = split.labels.index_select(0, torch.tensor(split.train))
            majority = int(torch.bincount(train_labels).argmax())
            validated = split.train if folds else split.validation
            val_labels = split.labels.index_select(0, torch.tensor(validated))
            baseline = float((val_labels == majority).float().mean())
            beats = kept.validation_accuracy > baseline
        return TrainingMetrics(
            train_loss=kept.stats.loss,
            train_accuracy=kept.stats.accuracy,
            validation_loss=kept.validation_loss,
            validation_accuracy=kept.validation_accuracy,
            best_epoch=kept.epoch,
            epochs_run=epochs_run,
            stopped_early=not self._single_pass and epochs_run < self._config.epochs,
            training_seconds=time.perf_counter() - started,
            train_validation_gap=gap,
            majority_baseline_accuracy=baseline,
            beats_baseline=beats,
            regularization_c=regularization_c,
        )

    def _started_event(
        self,
        split: Split,
        cached: bool,
        steps_per_epoch: int,
        imbalance: float,
        balance: str,
        folds: int,
    ) -> JobStarted:
        config = self._config
        counts = torch.bincount(split.labels, minlength=len(split.class_names)).tolist()
        plan = TrainingPlan(
            epochs=1 if self._single_pass else config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            trainable_blocks=config.trainable_blocks,
            augment=config.augment,
            cached_features=cached,
            steps_per_epoch=steps_per_epoch,
            device=str(self._device),
            early_stopping_patience=config.early_stopping_patience,
            head_type=config.head_type,
            unfreeze_every_epochs=config.unfreeze_every_epochs,
            layer_lr_decay=config.layer_lr_decay,
            label_smoothing=config.label_smoothing,
            solver=config.solver,
            cv_folds=folds,
        )
        return JobStarted(
            backbone=self._spec.backbone,
            head_name=self._spec.head_name,
            class_names=split.class_names,
            train_examples=len(split.train),
            validation_examples=len(split.validation),
            plan=plan,
            class_counts=tuple(zip(split.class_names, counts, strict=True)),
            imbalance_ratio=imbalance,
            class_balance=balance,
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
        learning_rate: float,
        train_started: float,
        epoch_end: bool,
    ) -> TrainingProgress:
        elapsed = time.perf_counter() - train_started if train_started else 0.0
        seconds_per_step = elapsed / max(step, 1)
        examples_done = step * self._config.batch_size
        val_loss, val_accuracy = validation if validation is not None else (None, None)
        return TrainingProgress(
            phase="training",
            epoch=epoch,
            epochs=1 if self._single_pass else self._config.epochs,
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


def _inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Per-class weights [C] from class counts [C]: inverse frequency, mean 1 over the
    examples counted."""
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def _resolve_balance(requested: str, imbalance: float) -> str:
    if requested == "auto":
        return "weighted_loss" if imbalance > AUTO_BALANCE_RATIO else "none"
    return requested


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
