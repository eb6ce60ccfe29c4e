"""`openpi-merge-lora`: the command line (subcommands merge, verify, inspect, export) and its views."""

from openpi_merge_plugin.cli.app import entrypoint
from openpi_merge_plugin.cli.app import main

__all__ = ["entrypoint", "main"]
