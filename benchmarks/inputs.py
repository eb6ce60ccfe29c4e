"""The inputs of a merge at a given depth (random params and their adapters), and an openpi-style step of them."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from benchmarks.config import Expert
from benchmarks.layout import layer_layout
from benchmarks.layout import random_params
from benchmarks.layout import resolved_lora


@dataclasses.dataclass
class MergeInputs:
    experts: tuple[Expert, ...]
    depth: int
    flat: dict[str, np.ndarray]
    adapters: list
    resolved: Any

    @property
    def params(self) -> dict[str, Any]:
        from openpi_merge_plugin.checkpoint import sources

        return sources.unflatten(self.flat)

    @property
    def adapted_params(self) -> int:
        return sum(int(np.prod(self.flat[a.base_path].shape)) for a in self.adapters)


def largest_slice_f32_bytes(inputs: MergeInputs) -> int:
    return max(int(np.prod(inputs.flat[a.base_path].shape[len(a.lead_shape) :])) * 4 for a in inputs.adapters)


def merge_inputs(experts: tuple[Expert, ...], depth: int, seed: int = 0) -> MergeInputs:
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.merge import engine

    flat = random_params(layer_layout(experts, depth), seed)
    resolved = resolved_lora(experts)
    adapters = engine.plan(sources.InMemorySource(sources.unflatten(flat)).tree, resolved)
    return MergeInputs(experts, depth, flat, adapters, resolved)


def write_step(step: pathlib.Path, flat: dict[str, np.ndarray]) -> None:
    """An openpi-style step directory (`params/` with leaves ending in `value`, `assets/`) holding `flat`."""
    from openpi_merge_plugin.checkpoint import orbax_stream
    from openpi_merge_plugin.lora.adapters import ShapeDtype

    def stream():
        for path, x in flat.items():
            lead = 1 if x.ndim >= 3 else 0
            slices = ((index, x[index]) for index in np.ndindex(*x.shape[:lead]))
            yield orbax_stream.LeafWrite(f"{path}/value", slices, lead)

    step.mkdir(parents=True)
    structure = {f"{p}/value": ShapeDtype(tuple(x.shape), x.dtype.name) for p, x in flat.items()}
    orbax_stream.save(step / "params", structure, stream)
    (step / "assets").mkdir()
