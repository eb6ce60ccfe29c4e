"""Subcommands of `openpi-merge-lora`; each module has an `Args` dataclass and `run(args) -> exit code`."""
