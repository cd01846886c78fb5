"""Linear-probe FineTune vs the classic PyTorch loop that runs the frozen trunk every epoch.

Both train a linear classifier on efficientnet_lite0 features of the same Fashion-MNIST
images for 10 epochs at batch size 32, and both are scored on the same held-out test images.

* naive: the tutorial loop. Model = frozen pretrained trunk + new nn.Linear; every batch of
  every epoch goes forward through everything; Adam(lr=1e-3) on the linear layer. It is given
  a head start: PNGs are decoded and preprocessed once, up front (inside its timing), where
  an ImageFolder/DataLoader loop would decode them again every epoch. BatchNorm stays in
  eval mode (the tutorial's model.train() would also drift the frozen trunk's statistics).
* service: FineTune over gRPC (AsyncTransferClient.train), config epochs=10, batch_size=32,
  early_stopping_patience=0, validation_fraction=0 (so it trains on the same images as the
  naive loop); wall time from the call to its JobCompleted event (upload, validation,
  trunk features once, 10 epochs on them, head saved durably).

Ratio = naive wall (decode once + its 10 epochs) / service wall (median of 3 runs, made
before, between and after the naive epochs so both sample the same machine load).
Target >= 8x, with held-out accuracies within ~1 point.

    .venv/bin/python -m bench.probe_training [--quick] [--image-size 224]
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transfer_client import AsyncTransferClient, TrainingConfig
from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.trunks import Trunk
from transfer_service.domain import ModelInput
from transfer_service.lifecycle import Application

from bench.common import (
    Environment,
    bench_server,
    connect,
    fashion_pngs,
    median,
    on_compute_thread,
    parser,
    server_overrides,
    single_threaded_torch_here,
    spread,
    table,
    trunk_precision,
    verdict,
)

BACKBONE = "efficientnet_lite0"
EPOCHS = 10
BATCH_SIZE = 32
SPEEDUP_TARGET = 8.0
ACCURACY_TOLERANCE = 0.01


@dataclass(frozen=True, slots=True)
class Plan:
    train_per_class: int
    test_per_class: int
    service_runs: int


FULL = Plan(train_per_class=50, test_per_class=30, service_runs=3)
QUICK = Plan(train_per_class=3, test_per_class=5, service_runs=1)


class NaiveProbe(nn.Module):
    """Frozen trunk + linear layer, forward through everything (the tutorial's model)."""

    def __init__(self, trunk: Trunk, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(trunk.feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk.pool(self.trunk.run_stages(images, 0, self.trunk.num_stages))
        return self.fc(features)  # type: ignore[no-any-return]


def _images(backbone: LoadedBackbone, pngs: Sequence[bytes]) -> torch.Tensor:
    preprocessor = backbone.preprocessor
    loaded = [preprocessor.load(ModelInput(image=png), "image") for png in pngs]
    return torch.stack(preprocessor.finish(loaded, None))


class NaiveRun:
    """The tutorial loop, one epoch per call, so service runs can be interleaved with it."""

    def __init__(
        self, backbone: LoadedBackbone, train: Sequence[tuple[bytes, str]], classes: list[str]
    ) -> None:
        self._backbone = backbone
        self._classes = classes
        self.device = backbone.device
        torch.manual_seed(0)
        trunk = copy.deepcopy(backbone.trunk)  # the server's pretrained weights, not its object
        started = time.perf_counter()
        self.images = _images(backbone, [png for png, _ in train])
        self.labels = torch.tensor([classes.index(label) for _, label in train])
        self.model = NaiveProbe(trunk, len(classes)).to(self.device)
        self.model.trunk.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.fc.parameters(), lr=1e-3)
        self.setup_seconds = time.perf_counter() - started  # decode + preprocess, once
        self.epoch_seconds: list[float] = []

    @property
    def wall(self) -> float:
        return self.setup_seconds + sum(self.epoch_seconds)

    def epoch(self) -> None:
        started = time.perf_counter()
        model = self.model
        model.train()
        model.trunk.eval()
        loss_fn = nn.CrossEntropyLoss()
        loss = torch.zeros(())
        for rows in torch.split(torch.randperm(len(self.labels)), BATCH_SIZE):
            batch = self.images[rows].to(self.device).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(batch), self.labels[rows].to(self.device))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        loss.item()  # syncs a GPU
        self.epoch_seconds.append(time.perf_counter() - started)

    def accuracy(self, test: Sequence[tuple[bytes, str]]) -> float:
        self.model.eval()
        test_images = _images(self._backbone, [png for png, _ in test])
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(test), 64):
                batch = test_images[start : start + 64].to(self.device)
                logits = self.model(batch.contiguous(memory_format=torch.channels_last))
                truth = [self._classes.index(label) for _, label in test[start : start + 64]]
                correct += int((logits.argmax(dim=1).cpu() == torch.tensor(truth)).sum())
        return correct / len(test)


async def _service(
    client: AsyncTransferClient,
    train: Sequence[tuple[bytes, str]],
    test: Sequence[tuple[bytes, str]],
    run: int,
) -> tuple[float, float, float]:
    """(wall seconds, server-side training_seconds, held-out accuracy) of one FineTune."""
    config = TrainingConfig(
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        early_stopping_patience=0,
        validation_fraction=0.0,
        seed=run,
    )
    started = time.perf_counter()
    done = await client.train(BACKBONE, list(train), head_name=f"probe-{run}", config=config)
    wall = time.perf_counter() - started
    assert done.metrics.epochs_run == EPOCHS, done.metrics
    correct = 0
    for start in range(0, len(test), 64):
        chunk = test[start : start + 64]
        predictions = await client.predict(done.head_id, [png for png, _ in chunk])
        correct += sum(p.label == label for p, (_, label) in zip(predictions, chunk, strict=True))
    return wall, done.metrics.training_seconds, correct / len(test)


async def run(quick: bool, overrides: dict[str, object]) -> None:
    plan = QUICK if quick else FULL
    environment = Environment()
    single_threaded_torch_here()
    train = fashion_pngs(plan.train_per_class, seed=1)
    test = fashion_pngs(plan.test_per_class, split="test", seed=2)
    classes = sorted({label for _, label in train})
    with bench_server({"preload_backbones": [BACKBONE], **overrides}) as running:
        app: Application = running.app
        backbone = app.backbones.get(BACKBONE)
        service_runs: list[tuple[float, float, float]] = []
        async with connect(running) as client:
            # Untimed: the first FineTune after start pays one-off costs; reported apart.
            started = time.perf_counter()
            await client.train(
                BACKBONE,
                list(train[:20]),
                head_name="warm-up",
                config=TrainingConfig(epochs=1, early_stopping_patience=0),
            )
            first_call = time.perf_counter() - started
            # Service runs spread over the naive loop's epochs (before, between, after), so
            # both sides sample the same stretches of a shared machine's load.
            # On the server's compute thread, the one thread with a multi-threaded torch team
            # (transfer_service.torch_threads): the loop then runs as in a script of its own.
            naive = on_compute_thread(app, NaiveRun, backbone, train, classes)
            service_after = {
                round(i * EPOCHS / max(plan.service_runs - 1, 1)) for i in range(plan.service_runs)
            }
            for epoch in range(EPOCHS + 1):
                if epoch in service_after:
                    service_runs.append(await _service(client, train, test, len(service_runs)))
                    print(f"  service FineTune: {service_runs[-1][0]:.1f} s", flush=True)
                if epoch < EPOCHS:
                    on_compute_thread(app, naive.epoch)
                    print(f"  naive epoch {epoch + 1}: {naive.epoch_seconds[-1]:.1f} s", flush=True)
            naive_wall, epoch_seconds = naive.wall, naive.epoch_seconds
            naive_accuracy = on_compute_thread(app, naive.accuracy, test)
        environment.note(
            "data",
            f"Fashion-MNIST, {len(train)} train images ({plan.train_per_class}/class), "
            f"{len(test)} held-out test images, -> {backbone.preprocessor.input_size} px",
        )
        environment.note("trunk precision", trunk_precision(app, BACKBONE))
        environment.note(
            "untimed warm-up",
            f"first FineTune after start (20 images, 1 epoch): {first_call:.1f} s",
        )
        environment.note_server_threads(app)
        report = environment.markdown(app.backbones.device)

    service_walls = [wall for wall, _, _ in service_runs]
    service_wall = median(service_walls)
    service_accuracy = median([accuracy for _, _, accuracy in service_runs])
    speedup = naive_wall / service_wall
    print()
    print(f"## Linear probe, {EPOCHS} epochs: naive loop / service FineTune (wall time)")
    print()
    print(
        table(
            ("", "naive loop (trunk every epoch)", "service FineTune (gRPC)"),
            [
                ("runs", 1, len(service_runs)),
                (
                    "wall time (s)",
                    f"{naive_wall:.1f}",
                    f"{service_wall:.1f} (median; {spread(service_walls)})",
                ),
                (
                    "epoch time (s)",
                    f"{median(epoch_seconds):.2f} (median; {spread(epoch_seconds)})",
                    "-",
                ),
                (
                    "server-side training_seconds",
                    "-",
                    f"{median([seconds for _, seconds, _ in service_runs]):.1f}",
                ),
                (
                    "held-out accuracy",
                    f"{naive_accuracy:.3f}",
                    f"{service_accuracy:.3f} ({', '.join(f'{a:.3f}' for _, _, a in service_runs)})",
                ),
                ("**naive / service**", f"**{speedup:.2f}x**", ""),
            ],
        )
    )
    print()
    print("Speed-up: " + verdict(speedup, SPEEDUP_TARGET))
    gap = service_accuracy - naive_accuracy
    within = abs(gap) <= ACCURACY_TOLERANCE or gap > 0
    print(
        f"Accuracy: service - naive = {gap * 100:+.1f} points: "
        + ("met (within 1 point or better)" if within else "NOT met (more than 1 point worse)")
    )
    print()
    print(report)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0]).parse_args()
    asyncio.run(run(arguments.quick, server_overrides(arguments)))


if __name__ == "__main__":
    main()
