"""Section `merge`: floor, engine in memory and on disk, naive, kernel profile."""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import numpy as np

from benchmarks.config import Args
from benchmarks.floor import floor_device
from benchmarks.floor import floor_disk
from benchmarks.floor import floor_numpy
from benchmarks.inputs import MergeInputs
from benchmarks.inputs import largest_slice_f32_bytes
from benchmarks.inputs import merge_inputs
from benchmarks.inputs import write_step
from benchmarks.kernel_profile import kernel_profile
from benchmarks.layout import check_layout_against_openpi
from benchmarks.layout import experts_for
from benchmarks.layout import nbytes
from benchmarks.naive import naive_merge
from benchmarks.timing import measure
from benchmarks.timing import measure_all


def engine_in_memory(inputs: MergeInputs, out_dtype: str, *, verify: bool = True):
    from openpi_merge_plugin.merge import engine

    return engine.merge_params(
        inputs.params, inputs.resolved, engine.MergeOptions(output_dtype=out_dtype, verify=verify)
    )


def section_merge(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    """Floors, engine in memory and on disk, kernel profile, naive; in increasing order of device memory use."""
    from openpi_merge_plugin.pipeline import checkpoint_merge

    experts = experts_for(args)
    if not args.tiny:
        check_layout_against_openpi(args.depth)
    one = merge_inputs(experts, 1, seed=1)
    for out_dtype in ("float32", "bfloat16"):  # compiles every kernel (layer slices do not depend on depth)
        engine_in_memory(one, out_dtype)
    engine_in_memory(one, "float32", verify=False)
    floor_device(one, "float32")
    runs = {"engine_mem_f32_depth1": measure(lambda: engine_in_memory(one, "float32"), 1, warmup=False)}
    inputs = merge_inputs(experts, args.depth)
    r = args.repeats
    in_memory = {
        "floor_numpy": lambda: floor_numpy(inputs, "float32"),
        "floor_device": lambda: floor_device(inputs, "float32"),
        "engine_mem_f32": lambda: engine_in_memory(inputs, "float32"),
        "engine_mem_bf16": lambda: engine_in_memory(inputs, "bfloat16"),
        "engine_mem_f32_noverify": lambda: engine_in_memory(inputs, "float32", verify=False),
    }
    runs.update(measure_all(in_memory, r, warmup=False))  # compiled above
    report = engine_in_memory(inputs, "float32").report

    step, out = workdir / "step" / "1", workdir / "merged"
    write_step(step, inputs.flat)  # also warms Orbax and TensorStore up for both sides

    def clear() -> None:
        shutil.rmtree(out, ignore_errors=True)

    on_disk = {
        "floor_disk": lambda: floor_disk(step, out, inputs, "float32"),
        "engine_disk": lambda: checkpoint_merge.merge_checkpoint(
            step, output=out, lora=inputs.resolved, overwrite=True
        ),
    }
    runs.update(measure_all(on_disk, r, warmup=False, setup=clear))
    clear()
    shutil.rmtree(step.parent)
    profile = kernel_profile(inputs, r)
    runs["naive_depth1"] = measure(lambda: naive_merge(one, "float32"), 1)
    runs["naive"] = measure(lambda: naive_merge(inputs, "float32"), r)  # last: the largest device peak
    return {
        "depth": args.depth,
        "adapted_params": inputs.adapted_params,
        "tree_bytes": nbytes(inputs.flat),
        "tree_bytes_depth1": nbytes(one.flat),
        "base_bytes": sum(inputs.flat[a.base_path].nbytes for a in inputs.adapters),
        "largest_slice_f32_bytes": largest_slice_f32_bytes(inputs),
        "runs": runs,
        "max_rel_err": report.max_rel_err,
        "weights": [{"path": w.path, "seconds": w.seconds, "params": int(np.prod(w.shape))} for w in report.weights],
        "profile": profile,
    }
