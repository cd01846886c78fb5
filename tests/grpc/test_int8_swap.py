"""The int8 candidate over gRPC (issue 20): built in the background while callers keep
predicting on the eager trunk, and swapped in, with not one call failing.

int8's PT2E quantisation needs torch.export, which patches nn.Module.__call__ process-wide:
built in the serving process, an eager Predict batch meanwhile was routed into its tracer
and failed INTERNAL. The export now runs in a child process (backbones/int8_export.py); this
test runs the real build beside real Predicts on the same EfficientNet-Lite0 trunk. Only the
int8 candidate is offered (the compiled one is tests/grpc/test_compiled_swap.py's), and
REQUIRED_SPEEDUP is 0: whether int8 pays on a shared 2-core machine is a measurement. Every
answer must be within docs/design.md's tolerance of reduced precision against the fp32
server's: the serving path before the swap is whatever `auto` measured (bf16 or fp32), int8
after it. Whether an in-process export would hit a Predict here depends on timing (one run
with the export put back in-process saw no failed call); tests/unit/test_int8_stages.py's
watcher and tight-loop eager forwards are the check that catches it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transfer_client import TrainingConfig, TransferClient
from transfer_service.backbones import background_upgrade, upgrade_candidates, upgrade_choice

from tests.conftest import make_settings, start_server
from tests.datasets import fashion_mnist
from tests.predict_during_swap import predict_during_swap

pytestmark = pytest.mark.slow
pytest.importorskip("torchao")

BACKBONE = "efficientnet_lite0"
CALLERS = 4
SWAP_TIMEOUT_S = 420.0
# docs/design.md: reduced precision against fp32, top-1 on >= 95% of inputs, probabilities
# within 0.02 on average and 0.2 at worst.
TOP1_AGREEMENT = 0.95
MEAN_PROBABILITY_GAP = 0.02
WORST_PROBABILITY_GAP = 0.2


def scores(client: TransferClient, head_id: str, image: bytes) -> dict[str, float]:
    (prediction,) = client.predict(head_id, image, top_k=4)
    return {score.label: score.score for score in prediction.top_k}


def test_int8_stages_swap_in_under_concurrent_predicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "store"
    images = [png for png, _ in fashion_mnist(2, split="test", classes=4, seed=3)]
    eager = start_server(make_settings(store_dir, preload_backbones=[BACKBONE]))
    try:
        with TransferClient(eager.address, timeout=120) as client:
            train = fashion_mnist(5, classes=4, seed=9)
            head_id = client.train(BACKBONE, train, config=TrainingConfig(epochs=3)).head_id
            want = {i: scores(client, head_id, image) for i, image in enumerate(images)}
    finally:
        eager.stop()

    offered = upgrade_candidates.UpgradeCandidates.__call__

    def int8_only(self: upgrade_candidates.UpgradeCandidates, loaded: Any) -> Any:
        return [candidate for candidate in offered(self, loaded) if candidate.name == "int8"]

    monkeypatch.setattr(upgrade_candidates.UpgradeCandidates, "__call__", int8_only)
    monkeypatch.setattr(upgrade_choice, "REQUIRED_SPEEDUP", 0.0)
    monkeypatch.setattr(background_upgrade, "UPGRADE_NICENESS", 0)  # see test_compiled_swap
    settings = make_settings(
        store_dir, preload_backbones=[BACKBONE], compile="auto", precision="auto"
    )
    server = start_server(settings)
    try:
        run = predict_during_swap(
            server,
            BACKBONE,
            images,
            lambda client, image: scores(client, head_id, image),
            lambda backbone: backbone.precision == "int8",
            callers=CALLERS,
            swap_timeout_s=SWAP_TIMEOUT_S,
        )
        outcomes = {
            outcome: server.app.metrics.registry.get_sample_value(
                "transfer_backbone_upgrades_total", {"backbone": BACKBONE, "outcome": outcome}
            )
            for outcome in ("installed", "failed", "none_faster")
        }
    finally:
        server.stop()

    assert not run.failures, run.failures[:3]
    assert run.swapped_at is not None, f"no int8 swap within {SWAP_TIMEOUT_S:.0f} s: {outcomes}"
    assert outcomes["installed"] == 1, outcomes
    # Answered before the path was seen unswapped: eager; begun after it was seen swapped: int8.
    before = [a[2:] for a in run.answers if a[1] < run.unswapped_at]
    after = [a[2:] for a in run.answers if a[0] > run.swapped_at]
    assert len(before) >= 20 and len(after) >= CALLERS, (len(before), len(after))
    for name, group in (("before", before), ("after", after)):
        agreeing = sum(
            max(got, key=got.__getitem__) == max(want[i], key=want[i].__getitem__)
            for i, got in group
        )
        gaps = [abs(got[label] - want[i][label]) for i, got in group for label in got]
        assert all(got.keys() == want[i].keys() for i, got in group), name
        assert agreeing / len(group) >= TOP1_AGREEMENT, (name, agreeing, len(group))
        assert sum(gaps) / len(gaps) < MEAN_PROBABILITY_GAP, (name, sum(gaps) / len(gaps))
        assert max(gaps) < WORST_PROBABILITY_GAP, (name, max(gaps))
        print(f"{name} the swap: {len(group)} answers, worst |dp| {max(gaps):.1e}")
