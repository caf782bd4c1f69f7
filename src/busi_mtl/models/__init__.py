"""The multi-task network (``factory``) and its LightningModule (``module``)."""
