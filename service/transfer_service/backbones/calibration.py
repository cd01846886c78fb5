"""The calibration set shipped with the service (transfer_service/calibration/, package data):
real inputs the precision chooser compares candidates on. 30 Fashion-MNIST images and 30
news-style texts (calibration/NOTICE.txt says where they come from)."""

from __future__ import annotations

from importlib import resources

from transfer_service.domain import Modality, ModelInput


def calibration_inputs(modality: Modality) -> list[ModelInput]:
    """The set's inputs of `modality`, in a fixed order."""
    folder = resources.files("transfer_service").joinpath("calibration")
    if modality is Modality.IMAGE:
        images = sorted(
            (entry for entry in folder.joinpath("images").iterdir() if entry.name.endswith(".png")),
            key=lambda entry: entry.name,
        )
        return [ModelInput(image=entry.read_bytes()) for entry in images]
    lines = folder.joinpath("texts.txt").read_text(encoding="utf-8").splitlines()
    return [ModelInput(text=line) for line in lines if line.strip()]
