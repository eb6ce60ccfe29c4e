"""What the fields added to openpi's TrainConfig refer to (imported into openpi's config module under an alias)."""

import dataclasses  # noqa: F401 (used by the generated field default)
from typing import Annotated  # noqa: F401 (used by the generated annotations)

import tyro

from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions  # noqa: F401 (the field's type)


def tyro_help(text: str):
    return tyro.conf.arg(help=text)
