"""The formats `export` writes, each one module behind one interface (`base.Format`).

`FORMATS` is the command line's `--format` choices, in order: a new format is a module with a `FORMAT` and a row here.
"""

from openpi_merge_plugin.formats import lerobot
from openpi_merge_plugin.formats import lerobot_peft
from openpi_merge_plugin.formats import pytorch
from openpi_merge_plugin.formats.base import Format

FORMATS: dict[str, Format] = {f.name: f for f in (pytorch.FORMAT, lerobot.FORMAT, lerobot_peft.FORMAT)}
