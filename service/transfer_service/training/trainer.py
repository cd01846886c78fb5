"""The training entry point: Trainer.run plans a job (split, class balance, feature memory),
extracts the frozen trunk's features once, hands them to the solver the configuration names,
and reports metrics that say whether the head beats the trivial baseline.

The solvers: fine_tune_loop.py (the training loop: epochs of AdamW on the head and its
unfrozen trunk blocks, solver "adamw"), lbfgs_probe.py (solver "lbfgs_cv": an L2-regularised
linear probe fitted by L-BFGS), prototype_fit.py (head type "prototype": class means, no
gradient steps). What they share is in solver_context.py."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.domain import (
    SOURCE_CROSS_VALIDATION,
    SOURCE_VALIDATION_SPLIT,
    EvaluationReport,
    EventPayload,
    FineTuneSpec,
    JobStarted,
    JobWarning,
    LabeledExample,
    TrainingMetrics,
    TrainingPlan,
    TrainingProgress,
)
from transfer_service.evaluation import empty_report, evaluation_report
from transfer_service.heads import TaskHead, build_head
from transfer_service.training.features import ExtractedData, extract, plan_feature_memory
from transfer_service.training.fine_tune_loop import fine_tune
from transfer_service.training.lbfgs_probe import fit_lbfgs_probe
from transfer_service.training.prototype_fit import fit_prototypes
from transfer_service.training.regularised_probe import default_folds
from transfer_service.training.solver_context import (
    HeldOut,
    KeptEpoch,
    SolverContext,
    held_out_logits,
)
from transfer_service.training.split import Split, given_split, stratified_split

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
    # On held-out data; its temperature is the head's (Predict's scores divide by it).
    evaluation: EvaluationReport


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
        on_epoch: Callable[[float, int], None] | None = None,
    ) -> None:
        """`on_step(seconds)` after each optimiser step; `on_epoch(seconds, training
        examples)` after each epoch, validation included."""
        self._backbone = backbone
        self._spec = spec
        self._config = spec.config
        self._feature_cache_bytes = feature_cache_bytes
        self._emit = emit
        self._cancelled = cancelled
        self._device = backbone.device
        self._context = SolverContext(
            backbone,
            spec.config,
            emit,
            cancelled,
            on_step or (lambda seconds: None),
            on_epoch or (lambda seconds, examples: None),
        )

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
        context = self._context
        if prototype:
            kept, epochs_run = fit_prototypes(context, head, data, split, labels), 1
        elif cross_validated:
            kept, regularization_c = fit_lbfgs_probe(context, head, data, split, balance, folds)
            epochs_run = 1
        else:
            kept, epochs_run = fine_tune(
                context,
                head,
                data,
                split,
                labels,
                train_counts,
                balance,
                probe,
                prefix_end,
                generator,
            )
        head.eval()
        head.requires_grad_(False)
        metrics = self._metrics(kept, epochs_run, split, started, folds, regularization_c)
        evaluation = self._evaluation(kept, head, data, split, probe or prototype, prefix_end)
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
        return TrainingResult(head, split.class_names, metrics, evaluation)

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

    @property
    def _single_pass(self) -> bool:
        """Heads fitted in one pass over the features, not by epochs: prototypes and the
        lbfgs_cv probe (plan and progress report one epoch, nothing stops early)."""
        return self._config.head_type == "prototype" or self._config.solver == "lbfgs_cv"

    # ---- reporting ----

    def _evaluation(
        self,
        kept: KeptEpoch,
        head: TaskHead,
        data: ExtractedData,
        split: Split,
        pooled: bool,
        prefix_end: int,
    ) -> EvaluationReport:
        """The report, and the temperature fitted, on held-out predictions: the solver's
        (out-of-fold), else the kept head's on the validation rows. None held out (a tiny
        set): an empty report, T = 1."""
        held_out = kept.held_out
        if held_out is None and split.validation:
            logits = held_out_logits(
                self._context, head, data, split.validation, pooled, prefix_end
            )
            labels = split.labels.index_select(0, torch.tensor(split.validation))
            held_out = HeldOut(logits, labels, SOURCE_VALIDATION_SPLIT)
        if held_out is None:
            cross_validated = self._config.solver == "lbfgs_cv" and not split.validation
            return empty_report(
                SOURCE_CROSS_VALIDATION if cross_validated else SOURCE_VALIDATION_SPLIT
            )
        self._context.raise_if_cancelled()
        return evaluation_report(
            held_out.logits, held_out.labels, split.class_names, held_out.source
        )

    def _metrics(
        self,
        kept: KeptEpoch,
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


def _resolve_balance(requested: str, imbalance: float) -> str:
    if requested == "auto":
        return "weighted_loss" if imbalance > AUTO_BALANCE_RATIO else "none"
    return requested
