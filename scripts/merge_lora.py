"""Merge an openpi LoRA checkpoint step into a serving-ready checkpoint.

    python scripts/merge_lora.py <checkpoint_dir>/<step> --config <train config name>

Same interface as the `openpi-merge-lora` command; see `python scripts/merge_lora.py --help`.
"""

import sys

from openpi_merge_plugin.cli import app as cli

if __name__ == "__main__":
    sys.exit(cli.main())
