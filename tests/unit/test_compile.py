"""TRANSFER_COMPILE=true (compiled at load; `auto`'s background swap builds the same stages,
tests/grpc/test_compiled_swap.py): compiled frozen stages predict what the eager ones do, at
batch sizes the load's warm-up did not use, without compiling again.

The tolerance is the one docs/design.md states. Compiled kernels reorder floating-point sums
(fused, vectorised, weights pre-packed), so outputs differ in the last bits: measured here,
logits by at most 4e-6 (lite0) and 2e-6 (MiniLM), probabilities by 5e-7, top-1 identical.

Slow (marked so; `make test` runs it): the compiling itself. On the 2-CPU CI machine with an
empty inductor cache (a fresh machine) the file takes ~125 s (lite0 ~87 s, MiniLM ~35 s);
~50-70 s once torch's on-disk cache (/tmp/torchinductor_$USER) holds the compiled kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transfer_service.backbones.cache import BackboneCache, LoadedBackbone
from transfer_service.backbones.catalog import PreprocessingOptions, default_catalog
from transfer_service.domain import ModelInput
from transfer_service.errors import FailedPreconditionError
from transfer_service.heads import build_head

from tests.datasets import bbc_news, fashion_mnist

pytestmark = pytest.mark.slow

# The documented tolerance (docs/design.md, "Compiled trunks").
LOGIT_ATOL = 1e-3
PROBABILITY_ATOL = 1e-4
BATCH_SIZES = (5, 24)  # neither is a warm-up size (1, 2, 16)


def _backbone(name: str, *, compile: bool) -> LoadedBackbone:
    cache = BackboneCache(
        default_catalog(),
        weights_dir=Path("/nonexistent"),  # lite0 and MiniLM weights come from packages
        device=torch.device("cpu"),
        options=PreprocessingOptions(image_size=64, max_text_tokens=64, max_image_pixels=10**8),
        budget_bytes=2**40,
        precision="fp32",
        compile=compile,
    )
    return cache.get(name)


def _inputs(name: str) -> list[ModelInput]:
    if name == "minilm_l6":
        return [ModelInput(text=text) for text, _ in bbc_news(5)][: max(BATCH_SIZES)]
    return [ModelInput(image=image) for image, _ in fashion_mnist(3)][: max(BATCH_SIZES)]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "minilm_l6"])
def test_compiled_trunk_and_head_predict_what_eager_ones_do(name: str) -> None:
    eager = _backbone(name, compile=False)
    compiled = _backbone(name, compile=True)
    graphs_after_load = counters["stats"]["unique_graphs"]
    loaded = [eager.preprocessor.load(x, "inputs") for x in _inputs(name)]
    torch.manual_seed(0)
    # A linear probe (split after the last stage) and a head owning the last stage (split
    # one earlier, the unfrozen stage eager in the head), as Predict runs them.
    for trainable_blocks in (0, 1):
        head = build_head(eager.trunk, trainable_blocks, num_classes=10).eval()
        split = eager.trunk.prefix_end(trainable_blocks)
        with torch.inference_mode():
            everything = eager.stack(loaded)
            head.set_feature_statistics(head.features(eager.run_prefix(everything, 0, split)))
        for batch_size in BATCH_SIZES:
            state = eager.stack(loaded[:batch_size])
            with torch.inference_mode():
                want = head(eager.run_prefix(state, 0, split))
                got = head(compiled.run_prefix(state, 0, split))
            assert got.shape == (batch_size, 10)
            logit_error = (got - want).abs().max().item()
            probability_error = (got.softmax(-1) - want.softmax(-1)).abs().max().item()
            assert logit_error <= LOGIT_ATOL, (trainable_blocks, batch_size, logit_error)
            assert probability_error <= PROBABILITY_ATOL, (batch_size, probability_error)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    # New batch sizes and split points ran on the graphs the load's warm-up compiled.
    assert counters["stats"]["unique_graphs"] == graphs_after_load


def test_a_compile_failure_fails_the_load_naming_the_setting() -> None:
    import torch._inductor.config as inductor

    # No C++ compiler, and no cached kernels to hide that.
    no_compiler = inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True})
    expected = r"TRANSFER_COMPILE.*C\+\+ compiler"
    with no_compiler, pytest.raises(FailedPreconditionError, match=expected):
        _backbone("efficientnet_lite0", compile=True)
