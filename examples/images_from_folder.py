"""Fine-tune an image classifier from a folder, predict, and plot the training curves.

The folder holds one sub-folder of images per class (the layout torchvision calls
ImageFolder):

    flowers/daisy/001.jpg  flowers/daisy/002.jpg  ...  flowers/rose/001.jpg  ...

    TRANSFER_TARGET=localhost:50051 python examples/images_from_folder.py flowers/ \
        --predict new-photos/ --plot curves.png

The plot needs matplotlib: `pip install 'transfer-client[plots]'`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transfer_client import (
    FineTuneEvent,
    JobProgress,
    TrainingConfig,
    TrainingHistory,
    TransferClient,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def labelled_images(root: Path) -> list[tuple[Path, str]]:
    """(image path, class) for every image in root's sub-folders; the sub-folder is the class."""
    return [
        (image, folder.name)
        for folder in sorted(root.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
        for image in sorted(folder.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]


def show(event: FineTuneEvent) -> None:
    """Prints one line per finished epoch (the SDK hands every event to `on_event`)."""
    if isinstance(event, JobProgress) and event.progress.epoch_end:
        p = event.progress
        validation = f", val acc {p.validation_accuracy:.1%}" if p.validation_accuracy else ""
        print(f"epoch {p.epoch}/{p.epochs}: loss {p.train_loss:.4g}{validation}")


def plot_curves(history: TrainingHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # writes files; no display needed
    import matplotlib.pyplot as plt

    epochs = [row.epoch for row in history.rows]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axes.plot(epochs, [row.train_loss for row in history.rows], label="train")
    loss_axes.plot(epochs, [row.validation_loss for row in history.rows], label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    accuracy_axes.plot(epochs, [row.train_accuracy for row in history.rows], label="train")
    accuracy_axes.plot(
        epochs, [row.validation_accuracy for row in history.rows], label="validation"
    )
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.05))
    best = history.best  # the epoch whose weights the head kept
    for axes in (loss_axes, accuracy_axes):
        if best is not None:
            axes.axvline(best.epoch, color="grey", linestyle=":", label="kept")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="one sub-folder of images per class")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--predict", type=Path, nargs="*", default=[], help="images or folders")
    parser.add_argument("--plot", type=Path, help="write the training curves to this PNG")
    args = parser.parse_args()

    examples = labelled_images(args.folder)
    classes = sorted({label for _, label in examples})
    print(f"{len(examples)} images of {len(classes)} classes: {', '.join(classes)}")

    events: list[FineTuneEvent] = []

    def on_event(event: FineTuneEvent) -> None:
        events.append(event)
        show(event)

    target = os.environ.get("TRANSFER_TARGET", "localhost:50051")
    with TransferClient(target, timeout=120) as client:
        # solver "adamw" trains by epochs (the default for a linear probe picks the L2
        # strength by cross-validation instead, with no epochs to plot).
        done = client.train(
            args.backbone,
            examples,
            head_name="images-example",
            config=TrainingConfig(epochs=args.epochs, solver="adamw", seed=1),
            on_event=on_event,
        )
        metrics = done.metrics
        baseline = metrics.majority_baseline_accuracy
        print(
            f"head {done.head_id}: val acc {metrics.validation_accuracy or 0:.1%} "
            f"(always answering the commonest class: {baseline or 0:.1%}), "
            f"best epoch {metrics.best_epoch} of {metrics.epochs_run}"
        )
        for path in args.predict:
            for name, prediction in client.predict_files(done.head_id, path, top_k=2):
                ranked = ", ".join(f"{s.label} {s.score:.0%}" for s in prediction.top_k)
                print(f"{Path(name).name}: {prediction.label} ({ranked})")

    if args.plot:
        plot_curves(TrainingHistory.from_events(events), args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
