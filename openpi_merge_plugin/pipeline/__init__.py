"""Whole jobs on checkpoints: merge a LoRA step into `merged/`, export it for PyTorch."""
