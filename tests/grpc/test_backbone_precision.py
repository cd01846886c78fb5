"""ListBackbones over gRPC shows each loaded backbone's precision and, where TRANSFER_PRECISION
is auto, the rate its choice measured at load (issue 20); a restart on the same store shows
the stored measurement without timing again."""

from __future__ import annotations

from pathlib import Path

import pytest
from transfer_client import Backbone, BackboneState, TransferClient

from tests.conftest import RunningServer, make_settings, start_server


def listed(address: str) -> dict[str, Backbone]:
    with TransferClient(address, timeout=120) as client:
        return {b.name: b for b in client.list_backbones()}


def test_a_forced_precision_is_shown_without_a_measured_rate(server: RunningServer) -> None:
    backbones = listed(server.address)
    for name in ("efficientnet_lite0", "minilm_l6"):
        backbone = backbones[name]
        assert backbone.state is BackboneState.LOADED
        assert backbone.precision == "float32"  # tests pin fp32
        assert backbone.measured_inputs_per_second == 0.0
    assert backbones["efficientnet_lite2"].precision == ""


def test_auto_shows_the_measured_choice_and_a_restart_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, precision="auto", preload_backbones=["efficientnet_lite0"])
    running = start_server(settings)
    try:
        first = listed(running.address)["efficientnet_lite0"]
    finally:
        running.stop()
    assert first.precision in ("float32", "bfloat16")
    assert first.measured_inputs_per_second > 0

    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again despite a stored choice")

    monkeypatch.setattr("transfer_service.backbones.measured_precision.choose_precision", no_timing)
    restarted = start_server(settings)
    try:
        again = listed(restarted.address)["efficientnet_lite0"]
    finally:
        restarted.stop()
    assert again.precision == first.precision
    assert again.measured_inputs_per_second == first.measured_inputs_per_second
