"""Class indexing and the stratified train/validation split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Split:
    class_names: tuple[str, ...]
    labels: torch.Tensor  # [N] int64 class index per example
    train: tuple[int, ...]
    validation: tuple[int, ...]


def stratified_split(labels: Sequence[str], validation_fraction: float, seed: int) -> Split:
    """Holds out round(n_c * fraction) of each class, never a class's last training example."""
    class_names = tuple(sorted(set(labels)))
    index_of = {name: i for i, name in enumerate(class_names)}
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[index_of[label]].append(position)
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    validation: list[int] = []
    for class_index in range(len(class_names)):
        members = by_class[class_index]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        held_out = min(round(len(members) * validation_fraction), len(members) - 1)
        validation += shuffled[:held_out]
        train += shuffled[held_out:]
    label_tensor = torch.tensor([index_of[label] for label in labels], dtype=torch.long)
    return Split(class_names, label_tensor, tuple(sorted(train)), tuple(sorted(validation)))


def given_split(train_labels: Sequence[str], validation_labels: Sequence[str]) -> Split:
    """Positions 0..n-1 train, n.. validate (a caller-supplied validation set).
    Validation labels must be training classes (checked by request validation)."""
    class_names = tuple(sorted(set(train_labels)))
    index_of = {name: i for i, name in enumerate(class_names)}
    labels = [index_of[label] for label in (*train_labels, *validation_labels)]
    n = len(train_labels)
    return Split(
        class_names,
        torch.tensor(labels, dtype=torch.long),
        tuple(range(n)),
        tuple(range(n, n + len(validation_labels))),
    )
