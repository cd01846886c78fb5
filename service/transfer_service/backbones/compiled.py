"""A backbone's frozen stages compiled by `torch.compile` (TRANSFER_COMPILE), inference only.

Each stage is compiled on its own, not the whole trunk: heads branch off at split points, and
the Predict batcher runs whatever ranges of stages the heads in a batch need, so any range
must run compiled without a graph per range. A stage boundary costs a little fusion, nothing
else. Heads' own (trainable, unfrozen) copies of stages are never compiled.
"""

from __future__ import annotations

import io
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from transfer_service.backbones.trunks import Trunk
from transfer_service.domain import Modality, ModelInput

# Batch sizes compiled at load. torch specialises size 1 (its 0/1 rule) and the CPU
# convolution picks its backend by batch size (<16 or >=16, a guard seen in torch 2.14),
# so one batch from each range covers every later batch size without a recompile.
WARM_UP_BATCH_SIZES = (1, 2, 16)


def _run_stage(stage: nn.Module, state: Any) -> Any:
    return stage(state)


def _stage_function(index: int) -> Callable[[nn.Module, Any], Any]:
    """`_run_stage` with a code object of its own. Dynamo keeps compiled graphs on the code
    object, and every stage would otherwise share one (Module.__call__): 9 stages x 3 batch
    ranges overflow its limit of 8 graphs per code object, after which it runs the rest
    eagerly without a word. Own code objects also free the graphs with the backbone."""
    name = f"frozen_stage_{index}"
    code = _run_stage.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _run_stage.__globals__, name)


class CompiledStages:
    """Runs a trunk's stages [start, stop) through one compiled graph per stage."""

    def __init__(self, trunk: Trunk, device: torch.device) -> None:
        self._trunk = trunk
        self._device = device
        # Only the varying dimensions are dynamic (`mark` below), not `dynamic=True`: with
        # everything symbolic the image side is too, which compiled slower code and broke
        # freezing. Freezing folds the frozen weights into the graph as constants, which lets
        # inductor pre-pack them for the CPU convolution/matmul libraries.
        self._stages = [
            torch.compile(_stage_function(index), options={"freezing": True})
            for index in range(trunk.num_stages)
        ]

    def run(self, state: Any, start: int, stop: int) -> Any:
        """Always under no_grad with normal (non-inference) tensors in the trunk's layout:
        each grad mode, inference-ness and memory layout of an input is another graph, and
        callers come with every combination (Predict in inference mode, training not)."""
        trunk = self._trunk
        with torch.inference_mode(False), torch.no_grad():
            state = trunk.map_tensors(state, _normal_tensor)
            state = trunk.to_device(state, self._device)  # channels-last for images
            for index in range(start, stop):
                state = trunk.map_tensors(state, self._mark)
                state = self._stages[index](trunk.stages[index], state)
        return state

    def _mark(self, tensor: torch.Tensor) -> torch.Tensor:
        for dim in self._trunk.varying_dims:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return tensor


def _normal_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.is_inference() else tensor


def warm_up_inputs(modality: Modality, batch_size: int) -> Sequence[ModelInput]:
    """Synthetic inputs for a warm-up batch; texts of different lengths, so the token
    dimension varies as it does in real batches."""
    if modality is Modality.IMAGE:
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (127, 127, 127)).save(png, format="PNG")
        return [ModelInput(image=png.getvalue())] * batch_size
    return [ModelInput(text="warm up " * (1 + row % 5)) for row in range(batch_size)]
