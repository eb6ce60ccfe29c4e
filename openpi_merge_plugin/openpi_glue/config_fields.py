"""`openpi.training.config`: the merge fields on TrainConfig, serving configs on lookup, the shipped configs.

The fields must exist before the module body builds `_CONFIGS` (so that configs written in openpi's own
config.py can set them), which no patch after import can do: the module's source is parsed and two annotated
fields are appended to `class TrainConfig` before it is compiled. Nothing else in the module changes.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from openpi_merge_plugin import openpi_glue

_ALIAS = "_openpi_merge_plugin_options"
_FIELDS = f"""
merge_lora_on_save: {_ALIAS}.Annotated[
    bool,
    {_ALIAS}.tyro_help(
        "Also write a merged, serving-ready checkpoint to <checkpoint_dir>/<step>/merged at each save "
        "(openpi-merge-plugin). Serve it with the config named <this config>_merged."
    ),
] = False
merge_lora: {_ALIAS}.Annotated[
    {_ALIAS}.MergeOnSaveOptions, {_ALIAS}.tyro_help("How merge_lora_on_save merges (openpi-merge-plugin).")
] = {_ALIAS}.dataclasses.field(default_factory={_ALIAS}.MergeOnSaveOptions)
"""


def transform_source(source: bytes, path: str) -> Any:
    """openpi's config.py with the plugin's fields appended to TrainConfig, compiled; None if it does not fit."""
    module = ast.parse(source, path)
    train_config = next((n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig"), None)
    if train_config is None:
        openpi_glue.inactive("openpi.training.config has no class TrainConfig; merge_lora_on_save is not available")
        return None
    existing = {
        n.target.id for n in train_config.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    if existing & {"merge_lora_on_save", "merge_lora"}:
        return None  # openpi (or another tool) already has them
    fields = ast.parse(_FIELDS).body
    last_field = max(i for i, n in enumerate(train_config.body) if isinstance(n, ast.AnnAssign))
    train_config.body[last_field + 1 : last_field + 1] = fields
    imports = ast.parse(f"import openpi_merge_plugin.openpi_glue.config_namespace as {_ALIAS}").body
    first_import = next(
        i
        for i, n in enumerate(module.body)
        if isinstance(n, ast.Import | ast.ImportFrom)
        and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
    )
    module.body[first_import:first_import] = imports
    for node in (*fields, *imports):
        for child in ast.walk(node):
            child.lineno = child.end_lineno = train_config.lineno
            child.col_offset = child.end_col_offset = 0
    return compile(module, path, "exec", dont_inherit=True)


def after_import(module: Any) -> None:
    fields = {f.name for f in dataclasses.fields(module.TrainConfig)}
    if "merge_lora_on_save" not in fields:
        openpi_glue.inactive("TrainConfig has no merge_lora_on_save field; merge on save is off")
    from openpi_merge_plugin.openpi_glue import shipped_configs
    from openpi_merge_plugin.serving import twins

    twins.patch_get_config(module)
    shipped_configs.register(module)
