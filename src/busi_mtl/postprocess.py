"""Optional mask post-processing: classifier gating and removal of small or surplus components.

Stray specks on normal images are the usual segmentation failure on BUSI. Three configurable remedies
(``postprocess`` in the train config, saved in checkpoints), reported beside the raw numbers as
``pp_*`` metrics:

- ``normal_gate``: when the classifier gives ``p(normal) >= normal_gate``, the mask is emptied;
- ``min_area``: connected components smaller than this fraction of the image are dropped;
- ``max_components``: only the largest ``max_components`` components are kept (most BUSI images show
  one lesion; 1 drops every secondary blob, including the rare true second lesion);
- ``rescue``: the reverse of the gate, for the other usual failure, a lesion image left with an empty
  mask (per-image Dice 0). When the classifier calls the image a lesion (``p(normal) < 0.5``, and below
  ``normal_gate``) but no lesion pixel survives the threshold and the steps above, the mask becomes the
  connected region around the most probable pixel where the probability is at least ``rescue`` times
  that peak: the network's best guess of where the lesion is, instead of nothing.

``python -m busi_mtl.ensemble`` chooses these settings on out-of-fold predictions. :func:`full_size_masks`
is the one path from the network's probability map to the delivered mask, for prediction and for the
``native_*`` metrics alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from busi_mtl.data import NORMAL
from busi_mtl.data.transforms import restore_size


@dataclass(frozen=True)
class PostProcess:
    normal_gate: float | None = None
    min_area: float = 0.0
    max_components: int | None = None
    rescue: float | None = None

    def __post_init__(self) -> None:
        if self.normal_gate is not None and not 0 < self.normal_gate <= 1:
            raise ValueError(f"postprocess.normal_gate={self.normal_gate} must be in (0, 1] or null.")
        if not 0 <= self.min_area < 1:
            raise ValueError(
                f"postprocess.min_area={self.min_area} must be a fraction of the image in [0, 1)."
            )
        if self.max_components is not None and self.max_components < 1:
            raise ValueError(f"postprocess.max_components={self.max_components} must be >= 1 or null.")
        if self.rescue is not None and not 0 < self.rescue <= 1:
            raise ValueError(
                f"postprocess.rescue={self.rescue} must be a fraction of the peak probability in (0, 1] "
                "or null."
            )

    @property
    def enabled(self) -> bool:
        return (
            self.normal_gate is not None
            or self.min_area > 0
            or self.max_components is not None
            or self.rescue is not None
        )

    def __call__(
        self, masks: torch.Tensor, class_probs: torch.Tensor, lesion_probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Post-processed copy of boolean masks (B, 1, H, W) given class probabilities (B, C) and, for
        ``rescue``, the lesion probabilities the masks were thresholded from (B, 1, H, W)."""
        out = masks.clone()
        p_normal = class_probs[:, NORMAL]
        if self.normal_gate is not None:
            out[p_normal >= self.normal_gate] = False
        if self.min_area > 0 or self.max_components is not None:
            smallest = self.min_area * masks.shape[-2] * masks.shape[-1]
            array = out[:, 0].cpu().numpy().astype(np.uint8)
            for k, mask in enumerate(array):
                if mask.any():
                    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
                    areas = stats[1:, cv2.CC_STAT_AREA]
                    drop = areas < smallest
                    if self.max_components is not None:  # keep the largest ones (stable order on ties)
                        drop[np.argsort(-areas, kind="stable")[self.max_components :]] = True
                    array[k][np.isin(labels, np.flatnonzero(drop) + 1)] = 0
            out = torch.from_numpy(array.astype(bool)).unsqueeze(1).to(masks.device)
        if self.rescue is not None:
            if lesion_probs is None:
                raise ValueError("postprocess.rescue needs the lesion probabilities, not only the masks.")
            eligible = rescue_eligible(~out.flatten(1).any(1), p_normal, self.normal_gate)
            for k in torch.nonzero(eligible).flatten().tolist():
                out[k, 0] = torch.from_numpy(
                    peak_region(lesion_probs[k, 0].float().cpu().numpy(), self.rescue)
                )
        return out


def rescue_eligible(empty: torch.Tensor, p_normal: torch.Tensor, normal_gate: float | None) -> torch.Tensor:
    """The images (B,) ``rescue`` fills: an empty mask that the classifier calls a lesion (p(normal) < 0.5)
    and the normal gate, if any, lets through."""
    eligible = empty & (p_normal < 0.5)
    if normal_gate is not None:
        eligible &= p_normal < normal_gate
    return eligible


def peak_region(prob: np.ndarray, ratio: float) -> np.ndarray:
    """The connected region (8-connectivity) around the most probable pixel of a (H, W) map where the
    probability is at least ``ratio`` times that peak."""
    peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
    region = (prob >= ratio * prob[peak]).astype(np.uint8)
    _, labels = cv2.connectedComponents(region, connectivity=8)
    return labels == labels[peak]


def full_size_masks(
    prob: np.ndarray,
    height: int,
    width: int,
    keep_aspect: bool,
    threshold: float,
    postprocess: PostProcess,
    class_probs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw and post-processed boolean lesion masks at an image's own size (height x width) from the
    network-resolution probability map: resized back, thresholded, then post-processed there (so
    ``min_area`` is a fraction of the original image), given the image's class probabilities (C,)."""
    full = restore_size(prob, height, width, keep_aspect)
    raw = full > threshold
    processed = postprocess(
        torch.from_numpy(raw)[None, None],
        torch.from_numpy(class_probs)[None],
        torch.from_numpy(full)[None, None],
    )
    return raw, processed[0, 0].numpy()
