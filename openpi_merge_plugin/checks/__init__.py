"""Checks on written checkpoints: verify against the manifest and the LoRA forward, and inspect."""
