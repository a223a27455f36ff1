"""EasyReg: segmentation-driven symmetric registration (model not yet shipped)."""
