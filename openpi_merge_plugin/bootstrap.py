"""Activation inside openpi: an import hook, installed at interpreter start-up by `openpi_merge_plugin.pth`.

Installing the package puts `openpi_merge_plugin.pth` into site-packages; Python runs its one line at start-up,
which calls `install()`. That adds a `sys.meta_path` finder and nothing else: no openpi, JAX or Orbax import, so
processes that never import openpi pay nothing. When openpi imports one of the modules in `openpi_glue.PATCHES`,
the finder loads it with a loader that applies the plugin's patch (for `openpi.training.config`, before the
module body runs, so that the `TrainConfig` fields exist when openpi builds its config list).

Switch it off with `OPENPI_MERGE_PLUGIN_DISABLE=1`. If a patch no longer fits openpi's code, openpi runs
unpatched and the plugin logs once why it is inactive.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any

from openpi_merge_plugin import disabled

logger = logging.getLogger("openpi_merge_plugin")

# The openpi modules `openpi_glue.PATCHES` patches; checked before anything is imported for a module's lookup.
PATCHED_MODULES = frozenset(
    {
        "openpi.models.gemma",
        "openpi.models.gemma_fast",
        "openpi.training.config",
        "openpi.training.data_loader",
        "openpi.training.checkpoints",
    }
)


def install() -> None:
    """Adds the import hook (once); never raises, since it runs at interpreter start-up."""
    try:
        if disabled() or any(isinstance(f, _Finder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _Finder())
    except Exception as e:  # start-up of every Python process must survive a broken plugin
        print(f"openpi-merge-plugin: not activated: {e}", file=sys.stderr)


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PATCHED_MODULES or disabled():
            return None
        from openpi_merge_plugin import openpi_glue

        patch = openpi_glue.PATCHES[fullname]
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            openpi_glue.inactive(f"{fullname} is not loaded from a source file; it was left unpatched")
            return None
        spec.loader = _PatchingLoader(fullname, spec.origin, patch)
        return spec


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, patch: Any):
        super().__init__(fullname, path)
        self._patch = patch

    def get_code(self, fullname: str) -> Any:
        if self._patch.transform_source is None:
            return super().get_code(fullname)
        # Compiled from the transformed source every time, and never cached: a .pyc of it would be picked up by
        # an unpatched import later (OPENPI_MERGE_PLUGIN_DISABLE=1).
        source = self.get_data(self.path)
        code = self._patch.transform_source(source, self.path)
        return code if code is not None else super().source_to_code(source, self.path)

    def exec_module(self, module: Any) -> None:
        super().exec_module(module)
        if self._patch.after_import is not None:
            self._patch.after_import(module)
