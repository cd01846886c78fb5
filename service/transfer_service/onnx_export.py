"""A head and its backbone as one ONNX model, for use away from the server.

The model takes the preprocessed tensor (images: float [N, 3, S, S], RGB, normalised; texts:
int64 `input_ids` and `attention_mask` [N, T]) and gives `probabilities` [N, C]: the frozen
trunk prefix, the head's own stages, pooling and classifier, then softmax(logits / T) with
the head's calibration temperature, which is what Predict answers. What the caller must do
to its inputs first is in the model's metadata_props (PREPROCESSING, as JSON).

torch.onnx's dynamo exporter is used: the TorchScript one (dynamo=False) gave
EfficientNet-Lite0 probabilities up to 0.14 away from PyTorch's, the dynamo one 3e-7. It
costs seconds of CPU (efficientnet_lite0 ~5-9 s, minilm_l6 ~4-8 s on 2 CPUs), so callers run
it off the event loop, one at a time.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import IO, Any

import torch
from torch import nn

from transfer_service.backbones.cache import LoadedBackbone
from transfer_service.backbones.preprocess import ImagePreprocessor
from transfer_service.backbones.trunks import TextState
from transfer_service.domain import HeadRecord, Modality
from transfer_service.heads import LoadedHead, TaskHead

# metadata_props keys
HEAD_ID = "head_id"
BACKBONE = "backbone"
MODALITY = "modality"
CLASS_NAMES = "class_names"  # JSON list, in output column order
TEMPERATURE = "temperature"  # already applied inside the model; for reference
PREPROCESSING = "preprocessing"  # JSON object, see preprocessing_metadata
INPUT_NAMES = "input_names"  # JSON list

IMAGE_INPUTS: tuple[str, ...] = ("pixel_values",)
TEXT_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT = "probabilities"

# The largest batch the exported graph is traced for (shapes are symbolic up to it).
MAX_BATCH = 4096
# BERT-family position embeddings end at 512 tokens.
MAX_TOKENS = 512
# ONNX operator set; 18 is what the dynamo exporter writes natively in torch 2.14.
OPSET = 18

# How the server resizes images (backbones/preprocess.py, ImagePreprocessor.load).
IMAGE_RESIZE_POLICY = (
    "EXIF orientation applied, converted to RGB; the centred square of the image (side = "
    "the shorter side) resized to size x size with the named interpolation; pixels / 255, "
    "then (x - mean) / std per channel; layout NCHW"
)


class _Exported(nn.Module):
    """Trunk prefix + head + calibrated softmax, as one module over plain tensors."""

    def __init__(self, prefix: list[nn.Module], head: TaskHead, temperature: float) -> None:
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.head = head
        self.temperature = temperature

    def probabilities(self, state: Any) -> torch.Tensor:
        for stage in self.prefix:
            state = stage(state)
        logits: torch.Tensor = self.head(state)
        return (logits / self.temperature).softmax(dim=1)


class _ImageModel(_Exported):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.probabilities(pixel_values)


class _TextModel(_Exported):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.probabilities(TextState(input_ids, attention_mask))


def preprocessing_metadata(backbone: LoadedBackbone, record: HeadRecord) -> dict[str, Any]:
    """What an exported model expects done to raw inputs, from the server's own settings."""
    preprocessor = backbone.preprocessor
    if isinstance(preprocessor, ImagePreprocessor):
        return {
            "image_size": record.input_size,
            "mean": list(preprocessor.mean),
            "std": list(preprocessor.std),
            "interpolation": preprocessor.interpolation,
            "resize": IMAGE_RESIZE_POLICY,
        }
    return {
        "tokenizer": backbone.spec.tokenizer_name,
        "max_tokens": record.input_size,
        "padding": "zeros after the last token, attention_mask 0 there",
    }


def export_onnx(backbone: LoadedBackbone, head: LoadedHead, destination: IO[bytes]) -> None:
    """Writes the ONNX model of `head` on `backbone` to `destination`. Blocking (seconds):
    call off the event loop. Works on CPU copies of the modules, so the resident ones (used
    by Predict meanwhile, maybe on an accelerator) are not touched."""
    record = head.record
    trunk = backbone.trunk
    split = trunk.prefix_end(record.trainable_blocks)
    prefix = [copy.deepcopy(stage).cpu() for stage in trunk.stages[:split]]
    head_copy = copy.deepcopy(head.module).cpu().eval()
    temperature = float(record.temperature)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example: tuple[torch.Tensor, ...]
    model: _Exported
    if record.modality is Modality.IMAGE:
        model = _ImageModel(prefix, head_copy, temperature).eval()
        side = record.input_size
        example = (torch.zeros(2, 3, side, side),)
        shapes: tuple[dict[int, Any], ...] = ({0: batch},)
        names = IMAGE_INPUTS
    else:
        model = _TextModel(prefix, head_copy, temperature).eval()
        tokens = torch.export.Dim("tokens", min=1, max=min(record.input_size, MAX_TOKENS))
        ids = torch.ones(2, 8, dtype=torch.long)
        example = (ids, torch.ones_like(ids))
        shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
        names = TEXT_INPUTS
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about its own internals (deprecations, decompositions).
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            input_names=list(names),
            output_names=[OUTPUT],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    metadata = {
        HEAD_ID: record.head_id,
        BACKBONE: record.backbone,
        MODALITY: record.modality.value,
        CLASS_NAMES: json.dumps(list(record.class_names)),
        TEMPERATURE: repr(temperature),
        PREPROCESSING: json.dumps(preprocessing_metadata(backbone, record)),
        INPUT_NAMES: json.dumps(list(names)),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "transfer-service"
    # Written directly: onnx.save_model wants a named file (for external data).
    destination.write(proto.SerializeToString())
