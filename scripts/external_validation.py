"""External validation of a checkpoint on another BUSI-layout dataset (benign/ and malignant/; normal/
optional): ``python scripts/external_validation.py ckpt_path=... data.root=...``.

Runs :func:`busi_mtl.evaluate.evaluate` with ``conf/external.yaml`` (every image, no split); the run
directory gets metrics.json (lesion Dice, benign-vs-malignant accuracy and AUROC, ...), per_image.csv
and the evaluation figures.
"""

import hydra
from omegaconf import DictConfig

from busi_mtl.evaluate import evaluate
from busi_mtl.utils.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="external")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
