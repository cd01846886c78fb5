"""An int8 runner for an image backbone's frozen stages on the CPU (issue 20), built in the
background after SERVING and installed in the backbone's ServingPathSlot once verified.

Each stage is quantised and compiled on its own, like backbones/compiled.py's stages: heads
branch off at any split point, so any range [start, stop) must run without a graph per range.
Per stage: torch.export with the batch dimension dynamic (in a child process:
backbones/int8_export.py), PT2E prepare with torchao's x86
Inductor quantiser (static int8 activations, per-channel int8 weights), calibration on that
stage's fp32 inputs (the eager fp32 outputs of the stages before it on the calibration
batches), convert, then torch.compile with freezing, which turns the quantise/dequantise pairs
around each convolution into oneDNN int8 kernels with pre-packed weights. A quantised stage
takes and returns fp32 (it quantises its input and dequantises its output), so stages compose
in any range and the runner's output is the eager trunk's fp32 state.

Stages whose quantisation moves the pooled features the most stay fp32 (compiled the same way,
without quantisation); which ones is measured per backbone (FP32_STAGES below). Heads stay
fp32, and training never runs this: heads train on the eager trunk's features.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import types
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.compiled import WARM_UP_BATCH_SIZES, warm_up_inputs
from transfer_service.backbones.compiled_runner import UpgradeCancelled
from transfer_service.backbones.int8_export import EXPORT_TIMEOUT_SECONDS, export_stages_in_child
from transfer_service.backbones.trunks import Trunk
from transfer_service.domain import Modality

log = logging.getLogger(__name__)

# Stages left in fp32, per backbone, measured (`python -m bench.int8_trunk --sensitivity`
# quantises each stage alone; 224 px, the shipped calibration set). EfficientNet-Lite0: stage 1
# (the first depthwise block, 112 px, 16 channels) costs 0.0077 of the pooled features' mean
# cosine, stage 2 0.0025, every other stage < 0.001, and the costs roughly add. Every stage int8:
# 0.984 mean / 0.962 min (fails the tolerance); stage 1 fp32: 0.9944 / 0.9864 on 100
# Fashion-MNIST test images (passes, thinly); stages 1 and 2 fp32: 0.9977 / 0.9954, a margin
# like bf16's (0.9985 / 0.9957) on images the activation ranges were not calibrated on.
# A backbone not listed gets no int8 runner.
FP32_STAGES: dict[str, frozenset[int]] = {
    "efficientnet_lite0": frozenset({1, 2}),
}


class Int8BuildCancelled(UpgradeCancelled):
    """The build's `cancelled()` said stop (the server is stopping): the background upgrade
    counts it as cancelled, not failed."""


def int8_unavailable_reason(loaded: LoadedBackbone) -> str | None:
    """None when `build_int8_runner` can build for `loaded` here; else why not, for logs."""
    if loaded.device.type != "cpu":
        return f"int8 stages run on the CPU only (backbone on {loaded.device})"
    if loaded.spec.modality is not Modality.IMAGE:
        # MiniLM: dynamic int8 Linear layers are a different scheme (not tried), and bf16
        # already runs its matmuls at the machine's bf16 rate.
        return "int8 stages are built for image backbones only (convolutions via PT2E)"
    if loaded.name not in FP32_STAGES:
        return f"no measured int8 stage plan for {loaded.name} (see FP32_STAGES)"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (PT2E's x86 Inductor quantiser)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()  # inductor compiles the int8 kernels' C++ wrappers
    except Exception as exc:
        return f"no C++ compiler for inductor: {type(exc).__name__}: {exc}"
    return None


def build_int8_runner(
    loaded: LoadedBackbone,
    calibration_batches: Sequence[Any],
    cancelled: Callable[[], bool],
    *,
    fp32_stages: Collection[int] | None = None,
    export_timeout_seconds: float = EXPORT_TIMEOUT_SECONDS,
) -> Int8Stages:
    """Quantises, compiles and warms up every frozen stage of `loaded` (minutes on a busy
    2-CPU machine: call off the serving threads). `calibration_batches`: first-stage batches
    (`loaded.stack`) of the shipped calibration set. `fp32_stages` overrides FP32_STAGES (the
    benchmark's sensitivity runs). Raises Int8BuildCancelled when `cancelled()` turns true,
    ChildExportFailed when the export child fails or times out.

    torch.export patches nn.Module.__call__ and __getattr__ process-wide while it traces, so a
    module another thread runs meanwhile (an eager Predict) would be routed into its tracer:
    the stages are exported in a child process (backbones/int8_export.py); this process only
    loads the exported programs, calibrates, converts and compiles them."""
    reason = int8_unavailable_reason(loaded)
    if reason is not None:
        raise ValueError(f"cannot build an int8 runner for {loaded.name}: {reason}")
    if not calibration_batches:
        raise ValueError("int8 calibration needs at least one batch")
    kept = FP32_STAGES[loaded.name] if fp32_stages is None else frozenset(fp32_stages)
    trunk = loaded.trunk
    started = time.perf_counter()
    # stage_inputs[i]: stage i's calibration inputs, the fp32 eager outputs of stages < i.
    stage_inputs = [[trunk.to_device(batch, loaded.device) for batch in calibration_batches]]
    with torch.no_grad():
        for stage in trunk.stages[:-1]:
            stage_inputs.append([stage(state) for state in stage_inputs[-1]])
    _check(cancelled, loaded.name, "before exporting")
    quantised = [index for index in range(trunk.num_stages) if index not in kept]
    # Exported on all calibration rows at once: a batch of 1 would be specialised to 1.
    examples = {i: torch.cat(stage_inputs[i]) for i in quantised}
    programs = export_stages_in_child(
        loaded.name,
        trunk,
        examples,
        cancelled,
        lambda: Int8BuildCancelled(f"int8 build for {loaded.name} cancelled while exporting"),
        timeout_seconds=export_timeout_seconds,
    )
    exported_seconds = time.perf_counter() - started
    modules: list[nn.Module] = list(trunk.stages)
    for index in quantised:
        _check(cancelled, loaded.name, f"before quantising stage {index}")
        exported = exported_stage(programs[index], trunk.stages[index])
        modules[index] = quantised_stage(exported, stage_inputs[index])
    quantised_seconds = time.perf_counter() - started - exported_seconds
    runner = Int8Stages(trunk, modules, kept, loaded.device)
    for batch_size in WARM_UP_BATCH_SIZES:  # inductor compiles lazily: pay for it here
        _check(cancelled, loaded.name, f"before warming up batch size {batch_size}")
        inputs = warm_up_inputs(Modality.IMAGE, batch_size)
        batch = loaded.stack([loaded.preprocessor.load(x, "warm-up") for x in inputs])
        runner.run(batch, 0, trunk.num_stages)
    log.info(
        "int8 stages for %s built: exported in a child process in %.1fs, quantised in %.1fs, "
        "compiled and warmed up in %.1fs (fp32 stages: %s)",
        loaded.name,
        exported_seconds,
        quantised_seconds,
        time.perf_counter() - started - exported_seconds - quantised_seconds,
        sorted(kept) or "none",
    )
    return runner


class Int8Stages:
    """A StageRunner: stages [start, stop) through one compiled graph each, int8 inside the
    quantised stages, fp32 in and out of every stage."""

    def __init__(
        self,
        trunk: Trunk,
        modules: Sequence[nn.Module],
        fp32_stages: frozenset[int],
        device: torch.device,
    ) -> None:
        self._trunk = trunk
        self._modules = list(modules)
        self._device = device
        self.fp32_stages = fp32_stages
        self._compiled = [
            torch.compile(_stage_function(index))  # frozen: see _freezing
            for index in range(len(self._modules))
        ]

    @property
    def description(self) -> str:
        """For logs and ServingPath.description."""
        return f"int8 (stages {sorted(self.fp32_stages)} fp32), compiled"

    def run(self, state: Any, start: int, stop: int) -> Any:
        """Images [B, C, H, W] -> the eager stages' fp32 output. Like CompiledStages.run,
        always under no_grad on normal (non-inference) channels-last tensors: each grad mode,
        inference-ness and layout would be another compiled graph."""
        trunk = self._trunk
        with _freezing(), torch.inference_mode(False), torch.no_grad():
            if state.is_inference():
                state = state.clone()
            state = trunk.to_device(state, self._device)
            for index in range(start, stop):
                torch._dynamo.maybe_mark_dynamic(state, 0)  # the batch (the side is fixed)
                state = self._compiled[index](self._modules[index], state)
            return trunk.to_device(state, self._device)  # channels-last, as the eager stages


def exported_stage(program: torch.export.ExportedProgram, stage: nn.Module) -> nn.Module:
    """`program` (the child's export of `stage`) as a module, once its weights are checked
    to be `stage`'s own."""
    own = stage.state_dict()
    for name, tensor in program.state_dict.items():
        if name not in own or not torch.equal(own[name], tensor):
            raise ValueError(f"the exported stage's {name} is not the serving trunk's")
    return program.module()  # type: ignore[return-value]


def quantised_stage(exported: nn.Module, stage_inputs: Sequence[torch.Tensor]) -> nn.Module:
    """An exported stage calibrated on `stage_inputs` (its fp32 inputs) and converted:
    quantise/dequantise ops around int8-annotated convolutions, which inductor runs as int8."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for state in stage_inputs:  # observers record each activation's range
            prepared(state)
    return convert_pt2e(prepared)  # type: ignore[no-any-return]


def _run_stage(stage: nn.Module, state: torch.Tensor) -> torch.Tensor:
    return stage(state)  # type: ignore[no-any-return]


def _stage_function(index: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """`_run_stage` with a code object of its own, for compiled.py's reason: dynamo keeps
    graphs per code object, at most 8, and 9 stages x 3 batch ranges would overflow one."""
    name = f"int8_stage_{index}"
    code = _run_stage.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _run_stage.__globals__, name)


def _freezing() -> contextlib.AbstractContextManager[Any]:
    """Inductor's freezing on while a stage may compile. It must be the global setting, not
    torch.compile's `options`: dynamo reads it while tracing (torch._dynamo.utils.
    is_parameter_freezing) to keep the quantised weights as constants; with `options` alone
    they reach inductor as graph inputs and onednn.qconv_prepack cannot be folded (inductor
    fails: UnsupportedOperatorException). Patched around every run, not only the build's
    warm-up, so a later recompile (a guard that fails at Predict) also freezes."""
    import torch._inductor.config as inductor

    return contextlib.nullcontext() if inductor.freezing else inductor.patch(freezing=True)


def _check(cancelled: Callable[[], bool], backbone: str, where: str) -> None:
    if cancelled():
        raise Int8BuildCancelled(f"int8 build for {backbone} cancelled {where}")
