"""Section `save`: the streamed merge's memory (merge on save's blocking mode, the engine alone), and what the write
buffer buys. (Saves in training, async and blocking: section `merge_on_save`.)"""

from __future__ import annotations

from collections.abc import Callable
import pathlib
import shutil
from typing import Any

from benchmarks.config import BUFFER_SWEEP_MIB
from benchmarks.config import Args
from benchmarks.config import Expert
from benchmarks.inputs import largest_slice_f32_bytes
from benchmarks.inputs import merge_inputs
from benchmarks.layout import experts_for
from benchmarks.layout import nbytes
from benchmarks.timing import measure_all


def section_save(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    from openpi_merge_plugin.checkpoint import orbax_stream

    experts = experts_for(args)
    # The streamed merge's memory at its steady state and at twice that depth: does it grow with the model?
    # Also with no write buffer (`host_buffer_mib=0`): the engine's own memory, without written data waiting for
    # TensorStore.
    mem, more, mem0, more0 = (
        _saves(experts, depth, workdir, repeats=1, warmup=False, buffers={"merged": buffer})
        for buffer in (orbax_stream.MAX_INFLIGHT_BYTES, 0)
        for depth in (args.memory_depth, 2 * args.memory_depth)
    )
    # What the write buffer buys: time and memory at the measured depth, per buffer size, the sizes taking turns.
    sizes = sorted({0, orbax_stream.MAX_INFLIGHT_BYTES >> 20, *BUFFER_SWEEP_MIB})
    sweep = _saves(
        experts,
        args.memory_depth,
        workdir,
        repeats=2,
        warmup=False,
        buffers={str(mib): mib << 20 for mib in sizes},
    )
    return {
        "largest_slice_f32_bytes": mem["largest_slice_f32_bytes"],
        "depth": args.depth,
        "memory_depth": args.memory_depth,
        "host_buffer_mib": orbax_stream.MAX_INFLIGHT_BYTES >> 20,
        "buffer_sweep": {str(mib): sweep[str(mib)] for mib in sizes},
        "merged_mem": mem["merged"],
        "tree_bytes_mem": mem["tree_bytes"],
        "merged_more": more["merged"],
        "tree_bytes_more": more["tree_bytes"],
        "merged_mem_nobuffer": mem0["merged"],
        "merged_more_nobuffer": more0["merged"],
    }


def _saves(
    experts: tuple[Expert, ...],
    depth: int,
    workdir: pathlib.Path,
    *,
    repeats: int,
    warmup: bool = True,
    buffers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Times the `merged` item's write of live params (jax.Arrays), as merge on save's blocking mode writes it.

    `buffers` (name -> `host_buffer_bytes`): one merged write per entry, under that name; by default one, "merged",
    with the default write buffer.
    """
    import jax

    from openpi_merge_plugin.checkpoint import orbax_stream
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.merge import engine
    from openpi_merge_plugin.pipeline import checkpoint_merge
    from openpi_merge_plugin.serving import names as serving

    inputs = merge_inputs(experts, depth)
    params = jax.tree.map(jax.device_put, inputs.params)  # as in training: jax.Arrays on the device
    jax.block_until_ready(params)
    counter = iter(range(1_000_000))

    def fresh() -> pathlib.Path:
        d = workdir / f"save{next(counter)}"
        d.mkdir()
        return d

    def clean() -> None:  # untimed: removes what the previous run wrote
        for d in workdir.glob("save*"):
            shutil.rmtree(d)

    def merged_write(host_buffer_bytes: int) -> Callable[[], None]:
        def write() -> None:
            # What the `merged` item's handler does with openpi's live params (merged_item._merge).
            d = fresh()
            source = sources.InMemorySource(params)
            checkpoint_merge.write_merged(
                d,
                source,
                inputs.adapters,
                inputs.resolved,
                engine.MergeOptions(),
                source_info={},
                output_path=d,
                serving_config=serving.ServingConfig(None, "benchmark"),
                host_buffer_bytes=host_buffer_bytes,
            )

        return write

    buffers = {"merged": orbax_stream.MAX_INFLIGHT_BYTES} if buffers is None else buffers
    fns = {name: merged_write(size) for name, size in buffers.items()}
    out: dict[str, Any] = measure_all(fns, repeats, warmup=warmup, setup=clean)
    clean()
    out["tree_bytes"] = nbytes(inputs.flat)
    out["largest_slice_f32_bytes"] = largest_slice_f32_bytes(inputs)
    return out
