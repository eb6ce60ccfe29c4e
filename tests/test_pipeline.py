"""The three entry points (offline merge, export of a LoRA step, merge on save) run the one pipeline:
`checkpoint_merge.plan_merge`, then `write_merge` (a merged checkpoint) or, for the export of a LoRA step, the
export's one pass (`export_stream.laid_out_tensors`, merged per slice by the same engine); nothing else merges."""

import types

from helpers import FIXTURE_LORA_CONFIG
import pytest

from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.openpi_glue import merged_item
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export as pytorch_export
from openpi_merge_plugin.pipeline import export_stream


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Records, in order, each call of the pipeline's two halves and of the engine's writer."""
    seen: list[str] = []
    for module, name in (
        (checkpoint_merge, "plan_merge"),
        (checkpoint_merge, "write_merge"),
        (engine, "write_stream"),
        (export_stream, "laid_out_tensors"),
    ):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


def test_offline_merge_runs_the_pipeline(step_dir, fixture_lora, calls):
    checkpoint_merge.merge_checkpoint(step_dir, lora=fixture_lora)
    assert calls == ["plan_merge", "write_merge", "write_stream"]


def test_export_of_a_lora_step_runs_the_pipeline(step_dir, calls):
    lora = checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
    pytorch_export.export_pytorch(
        step_dir, lora=lora, action_horizon=50, allow_nonstandard_dims=True, output=step_dir.parent / "pt"
    )
    assert calls == ["plan_merge", "laid_out_tensors"]  # one pass: no merged checkpoint written first


def test_merge_on_save_runs_the_pipeline(tmp_path, fixture_params, fixture_lora, calls, monkeypatch):
    monkeypatch.setattr(openpi_configs, "lora_from_model", lambda model, config_name=None: fixture_lora)
    config = types.SimpleNamespace(name="fixture", model=None, merge_lora=MergeOnSaveOptions())
    request = merged_item.MergeRequest(
        params=sources.unflatten(dict(fixture_params)),
        save_assets=None,
        config=config,
        step=5,
        step_dir=tmp_path / "5",
    )
    staging = merged_item.write_staged(request)
    assert request.outcome.error is None, request.outcome.error
    assert (staging / "manifest.json").is_file()
    assert calls == ["plan_merge", "write_merge", "write_stream"]
    assert staging.parent == tmp_path  # staged next to the steps, committed into 5/merged by Orbax
