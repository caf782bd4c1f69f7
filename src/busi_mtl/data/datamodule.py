"""BUSIDataModule: manifest -> cached preprocessing -> grouped split -> augmented DataLoaders.

Batches are dicts: ``image`` float (B, 1, H, W) in [0, 1], ``mask`` float (B, 1, H, W) in {0, 1},
``label`` long (B,), ``id`` list of image ids. Normalisation happens inside the network (see
:mod:`busi_mtl.data.transforms`), with the train split's statistics this module computes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from busi_mtl.data import CLASSES
from busi_mtl.data.audit import duplicate_groups
from busi_mtl.data.busi import BUSIDataError, scan_busi
from busi_mtl.data.splits import (
    SPLITS,
    duplicate_leaks,
    log_split,
    make_split_table,
    read_split_file,
    warn_leaks,
)
from busi_mtl.data.synthetic import generate_busi
from busi_mtl.data.transforms import CachedArrays, Preprocessing, build_cache, train_augmentation

log = logging.getLogger(__name__)


class BUSIDataset(Dataset):
    """Samples ``indices`` of the cached arrays, augmenting image and mask together when a transform is set.

    Keys are positions, or ``(position, epoch)`` pairs from :class:`EpochSampler`: the augmentation of a
    sample is then seeded by (seed, epoch, position) alone, so it does not depend on the number of
    DataLoader workers, on which worker serves it, or on whether the run was interrupted and resumed.
    """

    def __init__(
        self,
        arrays: CachedArrays,
        indices: np.ndarray,
        labels: np.ndarray,
        transform: A.Compose | None = None,
        seed: int = 0,
    ) -> None:
        self.arrays = arrays
        self.indices = np.asarray(indices)
        self.labels = np.asarray(labels)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        j = int(self.indices[i])
        image, mask = np.array(self.arrays.images[j]), np.array(self.arrays.masks[j])  # writable copies
        if self.transform is not None:
            self.transform.set_random_seed(
                int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
            )
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float().div_(255.0),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0).float(),
            "label": torch.tensor(int(self.labels[j]), dtype=torch.long),
            "id": self.arrays.ids[j],
        }


class EpochSampler(DistributedSampler):
    """Training order as a pure function of (seed, epoch), yielding ``(position, epoch)`` keys.

    A shuffled permutation, or with ``weights`` a class-balanced draw with replacement. Lightning calls
    ``set_epoch`` before each epoch, so a run resumed at epoch k sees exactly the batches an uninterrupted
    run sees. Under DDP each rank takes every ``num_replicas``-th key (a DistributedSampler subclass is
    used as is by Lightning); on one process ``num_replicas=1``.
    """

    def __init__(self, dataset: BUSIDataset, seed: int, weights: np.ndarray | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        if self.weights is None:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        order = order.tolist()
        order += order[
            : self.total_size - n
        ]  # pad to a multiple of the world size, as DistributedSampler does
        return iter([(i, self.epoch) for i in order[self.rank : self.total_size : self.num_replicas]])


class UnpaddedDistributedSampler(DistributedSampler):
    """Each rank evaluates every ``num_replicas``-th image and no image twice.

    torch's DistributedSampler pads the dataset to a multiple of the world size by repeating images,
    which would count them twice in val/test metrics; ranks may get one batch more or less instead.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def worker_init(worker_id: int) -> None:
    """One torch thread per DataLoader worker: workers are processes already, and more threads per
    worker oversubscribe the cores the training step needs (OpenCV is limited before the workers fork,
    see ``BUSIDataModule.dataloader``)."""
    torch.set_num_threads(1)


class BUSIDataModule(pl.LightningDataModule):
    """BUSI (or any folder in its layout) as train/val/test DataLoaders; see ``conf/data/busi.yaml``."""

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        keep_aspect: bool = False,
        denoise: str = "none",
        clahe: bool = False,
        cache_dir: str = "data/cache",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_folds: int | None = None,
        fold: int = 0,
        split_seed: int = 42,
        split_file: str | None = None,
        output_dir: str | None = None,
        hash_size: int = 16,
        dup_threshold: int = 64,
        group_duplicates: bool = True,
        on_missing_mask: str = "error",
        required_classes: list[str] | None = None,
        augment: bool = True,
        aug_strength: float = 1.0,
        balanced_sampler: bool = False,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 42,
        synthetic: dict | None = None,
    ) -> None:
        super().__init__()
        if on_missing_mask not in ("error", "skip"):
            raise ValueError(f"data.on_missing_mask={on_missing_mask!r}: choose 'error' or 'skip'.")
        self.save_hyperparameters(logger=False)
        self.preprocessing = Preprocessing(image_size, keep_aspect, denoise, clahe, hash_size)
        self.manifest: pd.DataFrame | None = None
        self.arrays: CachedArrays | None = None
        self.split_table: pd.DataFrame | None = None
        #: The audit's near-duplicate group of every manifest row, whether or not the split used them.
        self.duplicate_groups: np.ndarray | None = None
        self.datasets: dict[str, BUSIDataset] = {}
        self.class_weights = torch.ones(len(CLASSES))
        self.pixel_mean, self.pixel_std = 0.5, 0.25

    def prepare_data(self) -> None:
        """Generate the synthetic set on first use and build the preprocessing cache (rank 0 only in DDP)."""
        root = Path(self.hparams.root)
        if self.hparams.synthetic and not root.exists():
            generate_busi(root, **self.hparams.synthetic)
        self._load_arrays()

    def _load_arrays(self) -> None:
        if self.arrays is None:
            self.manifest = scan_busi(
                self.hparams.root, self.hparams.on_missing_mask, self.hparams.required_classes or CLASSES
            )
            self.arrays = build_cache(self.manifest, self.preprocessing, self.hparams.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Split (or reload a saved split), save it to the run dir, derive class weights and pixel stats."""
        if self.datasets:
            return
        hp = self.hparams
        self._load_arrays()
        dup_groups = duplicate_groups(self.arrays.hashes, hp.dup_threshold)
        self.duplicate_groups = dup_groups
        if hp.split_file:
            table = read_split_file(hp.split_file, self.manifest, dup_groups)
            source = f"data.split_file={hp.split_file}"
        else:
            groups = dup_groups if hp.group_duplicates else self._ungrouped()
            table = make_split_table(
                self.manifest, groups, hp.val_fraction, hp.test_fraction, hp.split_seed, hp.num_folds, hp.fold
            )
            source = f"data.group_duplicates={hp.group_duplicates}"
        log_split(table)
        warn_leaks(duplicate_leaks(table, dup_groups), source)
        if hp.output_dir:
            Path(hp.output_dir).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(hp.output_dir) / "split.csv", index=False)
        self.split_table = table

        labels = self.manifest["label"].to_numpy()
        split = table.set_index("id").loc[self.manifest["id"], "split"].to_numpy()
        train_idx = np.flatnonzero(split == "train")
        transform = train_augmentation(hp.aug_strength) if hp.augment else None
        self.datasets = {
            name: BUSIDataset(
                self.arrays,
                np.flatnonzero(split == name),
                labels,
                transform if name == "train" else None,
                seed=hp.seed,
            )
            for name in SPLITS
        }
        self.datasets["all"] = BUSIDataset(self.arrays, np.arange(len(labels)), labels)
        if stage in (None, "fit"):
            self._fit_statistics(train_idx, labels[train_idx])

    def _ungrouped(self) -> np.ndarray:
        """One group per image (``data.group_duplicates=false``): the published random image-level splits."""
        log.warning(
            "data.group_duplicates=false: images are split one by one, so copies of one scan can sit in train "
            "and in val/test and the scores are inflated. Use it only to compare with published figures "
            "from random image-level splits."
        )
        return np.arange(len(self.arrays.hashes))

    def _fit_statistics(self, train_idx: np.ndarray, train_labels: np.ndarray) -> None:
        """Class weights and intensity mean/std from the train split only (no peeking at val/test)."""
        absent = [CLASSES[c] for c in range(len(CLASSES)) if c not in train_labels]
        if absent:
            raise BUSIDataError(
                f"{self.hparams.root}: the train split has no {absent} images; the classifier cannot learn "
                "them. Use a dataset with all three classes (or a smaller data.test_fraction)."
            )
        if self.hparams.balanced_sampler:
            log.info("Balanced sampler on: classes are balanced by sampling, so the loss is not re-weighted.")
        else:
            weights = compute_class_weight("balanced", classes=np.arange(len(CLASSES)), y=train_labels)
            self.class_weights = torch.tensor(weights, dtype=torch.float32)
        total = total_sq = 0.0
        for j in train_idx:
            pixels = np.asarray(self.arrays.images[j], dtype=np.float64) / 255.0
            total, total_sq = total + pixels.mean(), total_sq + (pixels**2).mean()
        mean = total / len(train_idx)
        self.pixel_mean, self.pixel_std = mean, max(float(np.sqrt(total_sq / len(train_idx) - mean**2)), 1e-3)
        log.info(
            "Train split: class weights %s, pixel mean %.4f std %.4f",
            dict(zip(CLASSES, np.round(self.class_weights.tolist(), 3), strict=True)),
            self.pixel_mean,
            self.pixel_std,
        )

    @property
    def num_workers(self) -> int:
        """``data.num_workers``; ``auto`` leaves two cores to the training process: on a 2-core CPU machine
        loading inline is fastest (augmentation costs ~1% of a CPU training step), while a GPU box with
        many cores gets up to 8 workers."""
        if self.hparams.num_workers == "auto":
            return max(0, min(8, (os.cpu_count() or 1) - 2))
        return int(self.hparams.num_workers)

    def dataloader(self, name: str, train: bool = False) -> DataLoader:
        """DataLoader over one split ("train", "val", "test") or over every image ("all")."""
        hp = self.hparams
        dataset = self.datasets[name]
        sampler: DistributedSampler | None = None
        if train:
            weights = None
            if hp.balanced_sampler:  # each class drawn equally often
                counts = np.bincount(dataset.labels[dataset.indices], minlength=len(CLASSES))
                weights = 1.0 / counts[dataset.labels[dataset.indices]]
            sampler = EpochSampler(dataset, hp.seed, weights)
        elif dist.is_available() and dist.is_initialized():
            sampler = UnpaddedDistributedSampler(dataset)  # Lightning keeps DistributedSampler subclasses
        workers = self.num_workers
        if workers > 0:
            # One OpenCV thread per worker process. It must be set here, before the fork: changing
            # OpenCV's thread pool inside a forked worker can deadlock.
            cv2.setNumThreads(1)
        return DataLoader(
            dataset,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            sampler=sampler,
            drop_last=train and len(dataset) > hp.batch_size,
            num_workers=workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers and workers > 0,
            worker_init_fn=worker_init,
            # Its own generator, so creating an iterator never consumes the global RNG (resume = no resume).
            generator=torch.Generator().manual_seed(hp.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
