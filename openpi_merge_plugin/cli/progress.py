"""The per-layer-slice progress bar the merge and inspect commands show on stderr."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import sys
from typing import Any

from openpi_merge_plugin.lora import adapters as _adapters


@dataclasses.dataclass
class SliceBar:
    """`on_plan` opens a tqdm bar over all layer slices (if enabled); `progress` advances it, naming the weight."""

    desc: str
    enabled: bool = True
    bar: Any = None

    def on_plan(self, adapters: Sequence[_adapters.Adapter]) -> None:
        if self.enabled:
            import tqdm

            total = sum(a.num_slices for a in adapters)
            self.bar = tqdm.tqdm(total=total, unit="slice", desc=self.desc, file=sys.stderr)

    def progress(self, path: str, n: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(path.removeprefix("PaliGemma/llm/layers/"), refresh=False)
            self.bar.update(n)


@contextlib.contextmanager
def slice_bar(desc: str, *, enabled: bool) -> Iterator[SliceBar]:
    bar = SliceBar(desc, enabled)
    try:
        yield bar
    finally:
        if bar.bar is not None:
            bar.bar.close()
