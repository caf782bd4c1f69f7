"""busi-mtl: joint lesion segmentation and normal/benign/malignant classification on breast ultrasound."""

__version__ = "0.1.0"
