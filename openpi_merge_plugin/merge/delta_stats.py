"""How large one adapter's update is, layer by layer, measured with the merge kernel without writing anything.

Per layer slice: ||dW|| / ||W||, and the fraction of ||dW|| that survives storing W + dW in bfloat16. The same
numbers a merge records in its manifest, since both come from the same engine and kernel.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
import math

from openpi_merge_plugin.checkpoint import sources as _sources
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.merge.report import MergeReport
from openpi_merge_plugin.merge.report import WeightReport

logger = logging.getLogger("openpi_merge_plugin")

ProgressFn = Callable[[str, int], None]  # (adapter path, layer slices done in this call)


def measure(
    source: _sources.ParamSource, adapter: _adapters.Adapter, progress: ProgressFn | None = None
) -> WeightReport:
    """Reads this adapter's three arrays (and nothing else) and returns its per-layer statistics.

    The merge itself (the same kernel as a float32 merge, without verification), its slices dropped as they come.
    """
    options = engine.MergeOptions(output_dtype="float32", verify=False, allow_nonfinite=True)
    report = MergeReport()
    for _ in engine.merged_weight(source, adapter, options, report, progress).pieces():
        pass
    (weight,) = report.weights
    if not all(math.isfinite(r) for r in weight.delta_rel_norm):
        logger.warning("adapter %s / %s holds NaN or Inf values", adapter.a_path, adapter.b_path)
    return weight
