"""TRANSFER_PRECISION=auto (issue 20): the chooser keeps the fastest candidate within the
tolerance of fp32, the real measurement on this machine passes within its time budget, and
a second load on the same store reuses the stored choice instead of timing again."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.backbones.calibration import calibration_inputs
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
from transfer_service.backbones.measured_precision import PrecisionMeasurer
from transfer_service.backbones.precision_choice import (
    DEFAULT_TOLERANCE,
    Candidate,
    PrecisionChoice,
    choose_precision,
)
from transfer_service.domain import Modality
from transfer_service.store.local import LocalStore


def batches(loaded: LoadedBackbone, count: int = 16) -> list[Any]:
    inputs = calibration_inputs(loaded.spec.modality)[:count]
    examples = [loaded.preprocessor.load(x, "calibration") for x in inputs]
    return [loaded.stack(examples[:8]), loaded.stack(examples[8:])]


def injected_rates(rates: dict[str, float]) -> Any:
    def timer(candidate: Candidate, timing_batches: Sequence[Any]) -> float:
        return rates[candidate.precision]

    return timer


def test_the_clearly_faster_candidate_wins(lite0: LoadedBackbone) -> None:
    candidates = [Candidate(p, lite0.at_precision(d)) for p, d in PRECISIONS]
    calibration = batches(lite0)
    faster_bf16 = choose_precision(
        candidates, calibration, [], timer=injected_rates({"float32": 40.0, "bfloat16": 84.0})
    )
    assert faster_bf16.precision == "bfloat16" and faster_bf16.inputs_per_second == 84.0
    slower_bf16 = choose_precision(
        candidates, calibration, [], timer=injected_rates({"float32": 40.0, "bfloat16": 33.0})
    )
    assert slower_bf16.precision == "float32" and slower_bf16.inputs_per_second == 40.0
    bf16 = slower_bf16.figures[1]
    # bf16 is genuinely close to fp32 on real images: it passed, and only lost on speed.
    assert bf16.passed and bf16.mean_cosine >= DEFAULT_TOLERANCE.mean_cosine


PRECISIONS = (("float32", torch.float32), ("bfloat16", torch.bfloat16))


def test_a_candidate_outside_the_tolerance_is_rejected_however_fast(
    lite0: LoadedBackbone,
) -> None:
    bf16 = lite0.at_precision(torch.bfloat16)
    generator = torch.Generator().manual_seed(20)

    def noisy(state: Any) -> torch.Tensor:
        # A broken trunk: its features carry noise as large as the features themselves.
        features = bf16(state)
        noise = torch.randn(features.shape, generator=generator) * features.std()
        return features + noise

    candidates = [
        Candidate("float32", lite0.at_precision(torch.float32)),
        Candidate("bfloat16", noisy),
    ]
    choice = choose_precision(
        candidates,
        batches(lite0),
        [],
        timer=injected_rates({"float32": 40.0, "bfloat16": 1000.0}),
    )
    assert choice.precision == "float32"
    broken = choice.figures[1]
    assert not broken.passed and broken.mean_cosine < DEFAULT_TOLERANCE.mean_cosine
    assert broken.inputs_per_second == 0.0  # a failing candidate is not even timed


def test_a_candidate_that_cannot_run_is_rejected_not_fatal(lite0: LoadedBackbone) -> None:
    def unsupported(state: Any) -> torch.Tensor:
        raise RuntimeError("no kernel for this dtype on this device")

    candidates = [
        Candidate("float32", lite0.at_precision(torch.float32)),
        Candidate("float16", unsupported),
    ]
    choice = choose_precision(
        candidates, batches(lite0), [], timer=injected_rates({"float32": 40.0, "float16": 99.0})
    )
    assert choice.precision == "float32"
    assert not choice.figures[1].passed and choice.figures[1].inputs_per_second == 0.0


def test_the_first_candidate_must_be_fp32(lite0: LoadedBackbone) -> None:
    with pytest.raises(ValueError, match="fp32 reference"):
        choose_precision([Candidate("bfloat16", lite0.at_precision(torch.bfloat16))], [], [])


def test_a_choice_survives_its_json_round_trip(lite0: LoadedBackbone) -> None:
    candidates = [Candidate(p, lite0.at_precision(d)) for p, d in PRECISIONS]
    choice = choose_precision(
        candidates, batches(lite0), [], timer=injected_rates({"float32": 1.0, "bfloat16": 2.0})
    )
    assert PrecisionChoice.from_json(choice.to_json()) == choice


def test_the_shipped_calibration_set_has_real_images_and_texts() -> None:
    images = calibration_inputs(Modality.IMAGE)
    texts = calibration_inputs(Modality.TEXT)
    assert len(images) == 30 and all(x.image and x.image[:4] == b"\x89PNG" for x in images)
    assert len(texts) == 30 and all(x.text and len(x.text.split()) > 10 for x in texts)


OPTIONS = PreprocessingOptions(224, 128, 10**7)


def measured_cache(store: LocalStore | None) -> BackboneCache:
    return BackboneCache(
        default_catalog(),
        weights_dir=Path("/nonexistent"),
        device=torch.device("cpu"),
        options=OPTIONS,
        budget_bytes=10**10,
        precision="auto",
        measurements=store,
        predict_threads=torch.get_num_threads(),
    )


# The budget: under 5 s per backbone on the 2-CPU machine (measured there at 2-3 s
# when quiet); the test allows for the other test runs that may share those cores.
MEASUREMENT_SECONDS = 12.0


@pytest.mark.parametrize("name", ["efficientnet_lite0", "minilm_l6"])
def test_the_real_measurement_picks_a_passing_precision_in_budget_and_restarts_reuse_it(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = "transfer_service.backbones.measured_precision.choose_precision"
    durations: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> PrecisionChoice:
        started = time.perf_counter()
        try:
            return choose_precision(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    monkeypatch.setattr(target, timed)
    store = LocalStore(tmp_path)
    loaded = measured_cache(store).get(name)
    assert len(durations) == 1 and durations[0] < MEASUREMENT_SECONDS
    assert loaded.precision in ("float32", "bfloat16")
    assert loaded.measured_inputs_per_second > 0
    assert loaded.training_dtype == torch.float32  # heads train on exact features
    store.close()

    # The stored choice: the chosen candidate passed, and was the fastest of those that did.
    reopened = LocalStore(tmp_path)
    (key,) = reopened._db.execute("SELECT key FROM measurements").fetchone()
    assert f"/{name}/input{loaded.spec.input_size(OPTIONS)}/" in key
    choice = PrecisionChoice.from_json(str(reopened.read_measurement(key)))
    passing = [f for f in choice.figures if f.passed]
    assert choice.precision == max(passing, key=lambda f: f.inputs_per_second).precision
    assert choice.precision == loaded.precision

    # A restart on the same store: no candidate is run or timed again.
    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again despite a stored choice")

    monkeypatch.setattr(target, no_timing)
    again = measured_cache(reopened).get(name)
    assert again.precision == loaded.precision
    assert again.measured_inputs_per_second == pytest.approx(loaded.measured_inputs_per_second)
    reopened.close()


class ReplicaWritesWhileWeMeasure:
    """A MeasurementStore another replica writes to between this one's read and its write."""

    def __init__(self, theirs: PrecisionChoice) -> None:
        self.theirs = theirs
        self.reads = 0
        self.writes: list[str] = []

    def read_measurement(self, key: str) -> str | None:
        self.reads += 1
        return None if self.reads == 1 else self.theirs.to_json()

    def write_measurement(self, key: str, value: str) -> None:
        self.writes.append(value)


def test_a_choice_another_replica_stored_meanwhile_is_adopted(lite0: LoadedBackbone) -> None:
    theirs = PrecisionChoice("float32", 12.5, ())
    store = ReplicaWritesWhileWeMeasure(theirs)
    measurer = PrecisionMeasurer(store, torch.device("cpu"), 1)
    examples = [
        lite0.preprocessor.load(x, "calibration") for x in calibration_inputs(Modality.IMAGE)
    ]
    choice = measurer.choose(lite0.name, 48, lite0.at_precision, lite0.stack, examples[:8])
    assert choice == theirs and store.writes == []  # measured, then took the stored one


def test_training_features_stay_fp32_when_predict_runs_bf16(lite0: LoadedBackbone) -> None:
    measured_bf16 = dataclasses.replace(lite0, compute_dtype=torch.bfloat16)
    state = batches(lite0)[0]
    stop = lite0.trunk.num_stages
    exact = lite0.run_prefix(state, 0, stop)
    for_training = measured_bf16.run_prefix(state, 0, stop, training=True)
    for_predict = measured_bf16.run_prefix(state, 0, stop)
    assert torch.equal(for_training, exact)  # heads train on exactly what fp32 computes
    assert for_predict.dtype == torch.float32 and not torch.equal(for_predict, exact)
    assert measured_bf16.precision == "bfloat16" and lite0.precision == "float32"
