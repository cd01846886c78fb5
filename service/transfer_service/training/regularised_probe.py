"""The default linear probe: L2-regularised multinomial logistic regression on the frozen
trunk's features, fitted to convergence by full-batch L-BFGS, with the L2 strength chosen by
stratified k-fold cross-validation on held-out log-loss, then refitted on every example.

This is the probe an expert tunes by hand (scikit-learn's LogisticRegressionCV). Epochs of
AdamW with early stopping on a held-out fifth measured up to 9 points worse at 5 examples per
class (bench/RESULTS.md): the holdout costs a fifth of the data, and stopping early is a weak
regulariser next to an L2 penalty sized by cross-validation.

Objective, with N rows, sample weights w and inverse L2 strength C (scikit-learn's
convention, the bias unpenalised):  (1/N) sum_i w_i CE(x_i W^T + b, y_i) + |W|^2 / (2 C N).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Decades of C searched first; the best is then refined half a decade either side.
C_DECADES = tuple(10.0**exponent for exponent in range(-4, 5))
DEFAULT_C = 1.0  # when no fold can be formed (a class with one example)
MAX_FOLDS = 5
# Past this many examples 3 folds estimate C as well as 5, at 60% of the cost.
MANY_EXAMPLES = 500
MAX_ITERATIONS = 500
# The held-out loss along increasing C is unimodal in practice: stop after this many
# consecutive C values worse than the best.
PATIENCE = 2
# Memory bounds of one fit, whatever N x C: logits are computed over row chunks of at most
# this many elements (4M float64 = 32 MB, a few times that in autograd), and L-BFGS keeps
# fewer than HISTORY_SIZE pairs of [C, D] corrections when they would pass HISTORY_BYTES.
ROW_CHUNK_ELEMENTS = 4 * 1024**2
HISTORY_SIZE = 20
HISTORY_BYTES = 256 * 1024**2
MIN_HISTORY_SIZE = 3


@dataclass(frozen=True, slots=True)
class LinearFit:
    weight: torch.Tensor  # [K, D]
    bias: torch.Tensor  # [K]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One value of C scored by cross-validation (or on the given validation set)."""

    c: float
    validation_loss: float
    validation_accuracy: float
    train_loss: float
    train_accuracy: float


@dataclass(frozen=True, slots=True)
class ProbeResult:
    fit: LinearFit
    chosen: Candidate | None  # None: no validation possible, DEFAULT_C used
    candidates: tuple[Candidate, ...]
    folds: int
    train_loss: float
    train_accuracy: float
    # The chosen C's predictions on rows no fit it came from saw: out-of-fold logits of
    # every row (k-fold), or of the validation rows (a given validation set), float32 on the
    # CPU, with those rows' indices; None when nothing was held out.
    held_out_logits: torch.Tensor | None = None
    held_out_rows: torch.Tensor | None = None


def history_size(num_classes: int, dims: int) -> int:
    """L-BFGS history pairs: HISTORY_SIZE, fewer when their float64 [C, D + 1] pairs would
    pass HISTORY_BYTES (the memory a 10,000-class fit spent most of its 5.4 GB on)."""
    pair_bytes = 2 * 8 * num_classes * (dims + 1)
    return max(MIN_HISTORY_SIZE, min(HISTORY_SIZE, HISTORY_BYTES // max(pair_bytes, 1)))


def _row_chunks(rows: int, num_classes: int) -> list[slice]:
    """Row ranges whose [chunk, C] logits stay within ROW_CHUNK_ELEMENTS."""
    step = max(1, ROW_CHUNK_ELEMENTS // max(num_classes, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def default_folds(class_counts: Sequence[int]) -> int:
    """k of k-fold: 5 (3 for large sets), never more than the smallest class's count; 0 when
    that is 1 (no fold could hold one of its examples out and still train on it)."""
    smallest = min(class_counts)
    if smallest < 2:
        return 0
    wanted = 3 if sum(class_counts) > MANY_EXAMPLES else MAX_FOLDS
    return min(wanted, smallest)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Held-out row indices of each fold: every class dealt round-robin, shuffled by seed."""
    generator = torch.Generator().manual_seed(seed)
    held_out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for class_index in torch.unique(labels).tolist():
        members = torch.nonzero(labels == class_index).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)].tolist()
        for position, row in enumerate(shuffled):
            held_out[(offset + position) % folds].append(row)
        offset += len(shuffled)  # the next class starts where this one stopped
    return [torch.tensor(sorted(rows), dtype=torch.long) for rows in held_out]


class RegularisedProbe:
    """Fits the probe on standardised features [N, D] (float64 on the CPU: the problem is
    small and L-BFGS's line search wants the precision)."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        *,
        sample_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        should_stop: Callable[[], None] = lambda: None,
    ) -> None:
        """`should_stop()` is called between fits and within each one (every chunk of rows
        of every L-BFGS evaluation) and raises to abandon the fit."""
        self._labels = labels.cpu()
        self._num_classes = num_classes
        rows = features.shape[0]
        self._weights = (
            torch.ones(rows, dtype=torch.float64)
            if sample_weights is None
            else sample_weights.to("cpu", torch.float64)
        )
        self._smoothing = label_smoothing
        self._should_stop = should_stop
        full = features.to("cpu", torch.float64)
        # An L2-penalised optimum lies in the span of the training rows (representer
        # theorem): with fewer rows than dimensions, fit in an orthonormal basis of that
        # span [D, r] and map back. The same basis serves every fold (each fold's span is
        # inside it), so the optima are exact, only cheaper.
        self._basis: torch.Tensor | None = None
        if rows < full.shape[1]:
            _, singular, right = torch.linalg.svd(full, full_matrices=False)
            keep = singular > singular[0] * 1e-10
            self._basis = right[keep].T.contiguous()
            full = full @ self._basis
        self._features = full  # [N, r or D]
        # search(): (logits, rows) of the best C's held-out predictions, or None
        self.best_held_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit(
        self, c: float, rows: torch.Tensor | None = None, start: LinearFit | None = None
    ) -> LinearFit:
        """The optimum for C on `rows` (all by default), in the reduced coordinates."""
        features, labels, weights = self._select(rows)
        dims = features.shape[1]
        weight = nn.Parameter(
            torch.zeros(self._num_classes, dims, dtype=torch.float64)
            if start is None
            else start.weight.clone()
        )
        bias = nn.Parameter(
            torch.zeros(self._num_classes, dtype=torch.float64)
            if start is None
            else start.bias.clone()
        )
        count = features.shape[0]
        penalty = 1.0 / (2.0 * c * count)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=MAX_ITERATIONS,
            tolerance_grad=1e-6,
            tolerance_change=1e-10,
            history_size=history_size(self._num_classes, dims),
            line_search_fn="strong_wolfe",
        )
        chunks = _row_chunks(count, self._num_classes)

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            total = penalty * weight.pow(2).sum()
            total.backward()  # type: ignore[no-untyped-call]
            loss = total.detach()
            # Rows in chunks, gradients accumulated: the logits never take more than
            # ROW_CHUNK_ELEMENTS at once, whatever N x C (10,000 classes at N = 10,000 would
            # otherwise hold 0.8 GB of float64 logits, several times over in autograd).
            for rows in chunks:
                # A cancel lands within one chunk, even inside one long L-BFGS fit.
                self._should_stop()
                logits = features[rows] @ weight.T + bias  # [chunk, C]
                losses = nn.functional.cross_entropy(
                    logits, labels[rows], reduction="none", label_smoothing=self._smoothing
                )
                part = (losses * weights[rows]).sum() / count
                part.backward()  # type: ignore[no-untyped-call]
                loss = loss + part.detach()
            return loss

        optimizer.step(objective)  # type: ignore[no-untyped-call]
        return LinearFit(weight.detach(), bias.detach())

    def logits(self, fit: LinearFit, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), C] logits of `fit` (reduced coordinates), float32."""
        features = self._features.index_select(0, rows)
        with torch.no_grad():
            return torch.cat(
                [
                    (features[chunk] @ fit.weight.T + fit.bias).float()
                    for chunk in _row_chunks(features.shape[0], self._num_classes)
                ]
            )

    def score(self, fit: LinearFit, rows: torch.Tensor | None = None) -> tuple[float, float]:
        """Weighted mean cross-entropy (no smoothing) and accuracy of `fit` on `rows`."""
        features, labels, weights = self._select(rows)
        loss_sum = 0.0
        correct = 0
        with torch.no_grad():
            for chunk in _row_chunks(features.shape[0], self._num_classes):
                logits = features[chunk] @ fit.weight.T + fit.bias  # [chunk, C]
                losses = nn.functional.cross_entropy(logits, labels[chunk], reduction="none")
                loss_sum += float((losses * weights[chunk]).sum())
                correct += int((logits.argmax(dim=1) == labels[chunk]).sum())
        return loss_sum / float(weights.sum()), correct / max(features.shape[0], 1)

    def _select(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, labels and sample weights of `rows` (all of them for None)."""
        if rows is None:
            return self._features, self._labels, self._weights
        return (
            self._features.index_select(0, rows),
            self._labels.index_select(0, rows),
            self._weights.index_select(0, rows),
        )

    def to_feature_space(self, fit: LinearFit) -> LinearFit:
        """Weights over the original D dimensions, float32."""
        weight = fit.weight if self._basis is None else fit.weight @ self._basis.T
        return LinearFit(weight.float(), fit.bias.float())

    def search(
        self,
        folds: Sequence[tuple[torch.Tensor, torch.Tensor]],
        on_candidate: Callable[[Candidate], None] = lambda candidate: None,
    ) -> tuple[Candidate, ...]:
        """Scores C over the decade grid (stopping once the held-out loss has risen PATIENCE
        times in a row), then half a decade either side of the best. `folds` are (train
        rows, held-out rows) pairs; scores pool every held-out row."""
        scored: dict[float, Candidate] = {}
        starts: list[LinearFit | None] = [None] * len(folds)
        # The held-out logits of the best C so far (best_candidate's order), for the report:
        # kept as the search goes rather than refitted afterwards (k more fits).
        self.best_held_out = None
        best_key = (math.inf, math.inf)

        def evaluate(c: float, warm: bool) -> Candidate:
            nonlocal best_key
            loss_sum = accuracy_sum = train_loss_sum = train_accuracy_sum = 0.0
            held_total = 0
            held_logits: list[torch.Tensor] = []
            for index, (train_rows, held_rows) in enumerate(folds):
                self._should_stop()
                fit = self.fit(c, train_rows, starts[index] if warm else None)
                if warm:
                    starts[index] = fit  # warm start along increasing C
                held_logits.append(self.logits(fit, held_rows))
                loss, accuracy = self.score(fit, held_rows)
                train_loss, train_accuracy = self.score(fit, train_rows)
                loss_sum += loss * len(held_rows)
                accuracy_sum += accuracy * len(held_rows)
                train_loss_sum += train_loss
                train_accuracy_sum += train_accuracy
                held_total += len(held_rows)
            candidate = Candidate(
                c,
                loss_sum / held_total,
                accuracy_sum / held_total,
                train_loss_sum / len(folds),
                train_accuracy_sum / len(folds),
            )
            scored[c] = candidate
            if (candidate.validation_loss, c) < best_key:
                best_key = (candidate.validation_loss, c)
                rows = torch.cat([held for _, held in folds])
                self.best_held_out = (torch.cat(held_logits), rows)
            on_candidate(candidate)
            return candidate

        best: Candidate | None = None
        worse_in_a_row = 0
        for c in C_DECADES:
            candidate = evaluate(c, warm=True)
            if best is None or candidate.validation_loss < best.validation_loss:
                best, worse_in_a_row = candidate, 0
            else:
                worse_in_a_row += 1
                if worse_in_a_row >= PATIENCE:
                    break
        assert best is not None
        for c in (best.c / math.sqrt(10.0), best.c * math.sqrt(10.0)):
            if C_DECADES[0] <= c <= C_DECADES[-1]:
                evaluate(c, warm=False)
        return tuple(sorted(scored.values(), key=lambda candidate: candidate.c))


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """Lowest held-out loss; ties go to the smaller C (the stronger penalty)."""
    return min(candidates, key=lambda candidate: (candidate.validation_loss, candidate.c))


def fit_cross_validated(
    probe: RegularisedProbe,
    labels: torch.Tensor,
    folds: int,
    seed: int,
    on_candidate: Callable[[Candidate], None] = lambda candidate: None,
) -> ProbeResult:
    """k-fold over all rows, then the refit on all of them at the chosen C."""
    rows = torch.arange(len(labels))
    chosen: Candidate | None = None
    candidates: tuple[Candidate, ...] = ()
    if folds >= 2:
        pairs = []
        for held in stratified_folds(labels.cpu(), folds, seed):
            mask = torch.ones(len(labels), dtype=torch.bool)
            mask[held] = False
            pairs.append((rows[mask], held))
        candidates = probe.search(pairs, on_candidate)
        chosen = best_candidate(candidates)
    probe_fit = probe.fit(chosen.c if chosen is not None else DEFAULT_C)
    train_loss, train_accuracy = probe.score(probe_fit)
    held_out = probe.best_held_out if chosen is not None else None
    return ProbeResult(
        probe.to_feature_space(probe_fit),
        chosen,
        candidates,
        folds,
        train_loss,
        train_accuracy,
        *(held_out or (None, None)),
    )


def fit_on_holdout(
    probe: RegularisedProbe,
    train_rows: torch.Tensor,
    validation_rows: torch.Tensor,
    on_candidate: Callable[[Candidate], None] = lambda candidate: None,
) -> ProbeResult:
    """A caller-supplied validation set picks C; the head is the fit on the training rows at
    that C (refitting on the validation rows too would leave nothing honest to report)."""
    candidates = probe.search([(train_rows, validation_rows)], on_candidate)
    chosen = best_candidate(candidates)
    probe_fit = probe.fit(chosen.c, train_rows)
    train_loss, train_accuracy = probe.score(probe_fit, train_rows)
    return ProbeResult(
        probe.to_feature_space(probe_fit),
        chosen,
        candidates,
        1,
        train_loss,
        train_accuracy,
        probe.logits(probe_fit, validation_rows),
        validation_rows,
    )
