"""Naming rule of the serving configs: the non-LoRA twin of train config NAME is registered as NAME + SUFFIX."""

SERVING_SUFFIX = "_merged"


def serving_config_name(train_config_name: str) -> str:
    return f"{train_config_name}{SERVING_SUFFIX}"
