"""busi-mtl: joint lesion segmentation and normal/benign/malignant classification on breast ultrasound."""

import os

# albumentations asks PyPI for a newer release on import: a network call from every run (and a 2 s stall
# plus a warning on air-gapped machines). Off unless the user asks for it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
