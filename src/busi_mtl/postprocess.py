"""Optional mask post-processing: classifier gating and removal of small or surplus components.

Stray specks on normal images are the usual segmentation failure on BUSI. Three configurable remedies
(``postprocess`` in the train config, saved in checkpoints), reported beside the raw numbers as
``pp_*`` metrics:

- ``normal_gate``: when the classifier gives ``p(normal) >= normal_gate``, the mask is emptied;
- ``min_area``: connected components smaller than this fraction of the image are dropped;
- ``max_components``: only the largest ``max_components`` components are kept (most BUSI images show
  one lesion; 1 drops every secondary blob, including the rare true second lesion).

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

    def __post_init__(self) -> None:
        if self.normal_gate is not None and not 0 < self.normal_gate <= 1:
            raise ValueError(f"postprocess.normal_gate={self.normal_gate} must be in (0, 1] or null.")
        if not 0 <= self.min_area < 1:
            raise ValueError(
                f"postprocess.min_area={self.min_area} must be a fraction of the image in [0, 1)."
            )
        if self.max_components is not None and self.max_components < 1:
            raise ValueError(f"postprocess.max_components={self.max_components} must be >= 1 or null.")

    @property
    def enabled(self) -> bool:
        return self.normal_gate is not None or self.min_area > 0 or self.max_components is not None

    def __call__(self, masks: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
        """Post-processed copy of boolean masks (B, 1, H, W) given class probabilities (B, C)."""
        out = masks.clone()
        if self.normal_gate is not None:
            out[class_probs[:, NORMAL] >= self.normal_gate] = False
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
        return out


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
    raw = restore_size(prob, height, width, keep_aspect) > threshold
    processed = postprocess(torch.from_numpy(raw)[None, None], torch.from_numpy(class_probs)[None])
    return raw, processed[0, 0].numpy()
