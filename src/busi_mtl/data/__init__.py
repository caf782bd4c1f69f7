"""Everything that turns a folder of ultrasound PNGs into training batches."""

#: Class names in label order. Label ids are positions in this tuple everywhere in the project.
CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")
NORMAL, BENIGN, MALIGNANT = 0, 1, 2
