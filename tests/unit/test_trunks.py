"""The stage decomposition of each backbone computes exactly what the original model does,
with the real pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from transfer_service.backbones.catalog import (
    EfficientNetLiteSpec,
    MiniLmSpec,
    PreprocessingOptions,
    TorchvisionCnnSpec,
    default_catalog,
)
from transfer_service.backbones.trunks import TextState
from transformers import AutoModel, AutoTokenizer

OPTIONS = PreprocessingOptions(image_size=None, max_text_tokens=64, max_image_pixels=10**8)


def test_efficientnet_lite0_stages_match_timm_with_packaged_weights() -> None:
    spec = EfficientNetLiteSpec(0, 224)
    weights = spec.locate_weights(Path("/unused"))
    trunk = spec.build_trunk(weights).eval()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    source = torch.load(weights, map_location="cpu", weights_only=True)
    reference.load_state_dict(dict(zip(reference.state_dict(), source.values(), strict=True)))
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ours = trunk.pool(trunk.run_stages(images, 0, trunk.num_stages))
        theirs = reference.forward_head(reference.forward_features(images), pre_logits=True)
    assert ours.shape == (2, spec.feature_dim)
    torch.testing.assert_close(ours, theirs)
    # The packaged weights are the real ImageNet ones: the classifier is confident on noise-free
    # input only if weights loaded; at minimum they are not the random init.
    random_trunk = spec.build_trunk(None).eval()
    with torch.inference_mode():
        random_features = random_trunk.pool(random_trunk.run_stages(images, 0, trunk.num_stages))
    assert not torch.allclose(ours, random_features)


def test_minilm_stages_match_transformers_mean_pooling() -> None:
    spec = MiniLmSpec()
    path = spec.locate_weights(Path("/unused"))
    trunk = spec.build_trunk(path).eval()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["A short one.", "A considerably longer sentence, with padding needed for the other."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        state = TextState(encoded["input_ids"], encoded["attention_mask"])
        ours = trunk.pool(trunk.run_stages(state, 0, trunk.num_stages))
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
def test_torchvision_stages_match_the_model(name: str, tmp_path: Path) -> None:
    import torchvision.models as models

    spec = next(s for s in default_catalog() if s.name == name)
    assert isinstance(spec, TorchvisionCnnSpec)
    model = getattr(models, name)(weights=None).eval()
    weights = tmp_path / spec.file_name()
    torch.save(model.state_dict(), weights)  # stand-in weights in torchvision's cache layout
    assert spec.locate_weights(tmp_path) == weights
    trunk = spec.build_trunk(weights).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ours = trunk.pool(trunk.run_stages(images, 0, trunk.num_stages))
        features = model.features(images) if hasattr(model, "features") else None
        if features is None:
            body = torch.nn.Sequential(*list(model.children())[:-2])
            features = body(images)
        expected = features.mean(dim=(2, 3))
    assert ours.shape == (2, spec.feature_dim)
    torch.testing.assert_close(ours, expected)


def test_split_points_cover_every_stage() -> None:
    spec = EfficientNetLiteSpec(0, 224)
    trunk = spec.build_trunk(None)
    assert trunk.prefix_end(0) == trunk.num_stages == 9
    assert trunk.prefix_end(2) == 7
    assert trunk.prefix_end(-1) == 0
