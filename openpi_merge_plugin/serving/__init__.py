"""What serves a merged checkpoint: the `<config>_merged` names and the non-LoRA twins found by structure."""
