"""Checkpoint directories recognised by their structure, never by their names: what no output may be written into.

- an Orbax checkpoint (an item such as a step's `params/` or `train_state/`): holds `_METADATA`, `manifest.ocdbt`
  or `_sharding`;
- an openpi checkpoint step: holds Orbax's step metadata `_CHECKPOINT_METADATA` or an Orbax `train_state/`
  (whatever else it holds, a manifest.json included), or an Orbax `params/` without a manifest of this tool;
- an output of this tool: a manifest.json whose "plugin" is this plugin (and none of a step's markers).

A training run's checkpoint directory (Orbax's root) is not a checkpoint itself: it holds steps.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import pathlib
from typing import Literal

MANIFEST = "manifest.json"
PLUGIN = "openpi-merge-plugin"  # the manifest's "plugin" field, which marks an output of this tool
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM_MARKERS = ("_METADATA", "manifest.ocdbt", "_sharding")
_MAX_MANIFEST_BYTES = 256 << 20  # a full-size merge's manifest is about 1 MB

Kind = Literal["step", "orbax", "output"]
DESCRIPTION: dict[Kind, str] = {
    "step": "the openpi checkpoint step",
    "orbax": "the Orbax checkpoint",
    "output": "the output of openpi-merge-lora",
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: pathlib.Path
    kind: Kind


def is_orbax_item(path: pathlib.Path) -> bool:
    return any((path / marker).is_file() for marker in ITEM_MARKERS)


def has_step_markers(path: pathlib.Path) -> bool:
    """Markers only openpi's (Orbax's) steps carry, never an output of this tool."""
    return (path / STEP_METADATA).is_file() or is_orbax_item(path / "train_state")


def read_our_manifest(path: pathlib.Path) -> dict | None:
    """`path`'s manifest.json if it is one of this tool's (a JSON object naming this plugin), else None."""
    manifest = path / MANIFEST
    try:
        if not manifest.is_file() or manifest.is_symlink() or manifest.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("plugin") == PLUGIN else None


def kind_of(path: pathlib.Path) -> Kind | None:
    """What checkpoint the directory `path` is, if any."""
    try:
        if not path.is_dir():
            return None
        if is_orbax_item(path):
            return "orbax"
        if has_step_markers(path):
            return "step"
        if read_our_manifest(path) is not None:
            return "output"
        if is_orbax_item(path / "params"):
            return "step"
    except OSError:  # a directory we may not look into: not recognisably a checkpoint
        return None
    return None


def is_step(path: pathlib.Path) -> bool:
    return kind_of(path) == "step"


def steps_in(path: pathlib.Path) -> list[str]:
    """The names of the checkpoint steps directly in `path`, a training run's checkpoint directory (numbered, as
    Orbax names them)."""
    try:
        return sorted((p.name for p in path.glob("[0-9]*") if p.name.isdigit() and is_step(p)), key=int)
    except OSError:
        return []


def containing(path: pathlib.Path) -> Iterator[Checkpoint]:
    """The checkpoints `path` lies inside, nearest first (the directories above it; `path` itself is not one)."""
    for parent in path.parents:
        kind = kind_of(parent)
        if kind is not None:
            yield Checkpoint(parent, kind)
