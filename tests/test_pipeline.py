"""The three entry points (offline merge, export of a LoRA step, merge on save) run the one pipeline:
`checkpoint_merge.plan_merge`, then `write_merge` (a merged checkpoint) or, for the export of a LoRA step, the
export's one pass (`export_stream.laid_out_tensors`, merged per slice by the same engine); nothing else merges. And
an export, of any source to any format, goes through its stages' modules once each, in order."""

import sys
import types

from helpers import FIXTURE_LORA_CONFIG
import pytest

from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.openpi_glue import merged_item
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export
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
    options = ExportOptions(allow_nonstandard_dims=True)
    export.export(step_dir, "pytorch", options=options, lora=lora, output=step_dir.parent / "pt")
    assert calls == ["plan_merge", "laid_out_tensors"]  # one pass: no merged checkpoint written first


def test_a_peft_adapter_is_the_same_one_pass_without_a_merge(step_dir, calls):
    """The adapter of a LoRA step: no merge planned or done, the one pass reads the adapters and what is saved."""
    lora = checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
    options = ExportOptions(allow_nonstandard_dims=True, base="lerobot/pi0_base")
    export.export(step_dir, "lerobot-peft", options=options, lora=lora, output=step_dir.parent / "peft")
    assert calls == ["plan_merge", "laid_out_tensors"]  # plan_merge pairs the adapters; nothing merges


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


# The stages of an export, by the module that does each: where `src` goes, call by call.
STAGES = {
    "openpi_merge_plugin.pipeline.export_source": "source (and the merge on the way, planned, or the identity)",
    "openpi_merge_plugin.pipeline.model_facts": "what the params cannot tell",
    "openpi_merge_plugin.formats": "format",
    "openpi_merge_plugin.pipeline.export_stream": "streamed write (merged per slice), then read back",
    "openpi_merge_plugin.checkpoint.output": "manifest",
}


def _stages_entered(run) -> list[str]:
    """The stage of each call the pipeline's own module makes into another module of the package, in order, each
    run of calls into one stage counted once. The staging directory (`output.staged_directory`, entered through
    contextlib) is the commit's wrapper around the stages, not one that `src` goes through."""
    entered: list[str] = []
    pipeline = export.__file__

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None or frame.f_back.f_code.co_filename != pipeline:
            return
        module = frame.f_globals.get("__name__", "")
        stage = next((s for prefix, s in STAGES.items() if module.startswith(prefix)), None)
        if module.startswith("openpi_merge_plugin.") and module != export.__name__:
            assert stage is not None, f"the pipeline calls {module}.{frame.f_code.co_name}, which is no stage"
            if not entered or entered[-1] != stage:
                entered.append(stage)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.parametrize(
    ("kind", "to"),
    [(k, f) for k in ("lora_step", "merged") for f in ("pytorch", "lerobot")] + [("lora_step", "lerobot-peft")],
)
def test_an_export_enters_each_stage_once_in_order(step_dir, fixture_lora, kind, to):
    src, lora = step_dir, checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
    if kind == "merged":
        src, lora = checkpoint_merge.merge_checkpoint(step_dir, lora=fixture_lora).output, None
    options = ExportOptions(allow_nonstandard_dims=True, base="lerobot/pi0_base" if to == "lerobot-peft" else None)
    out = step_dir.parent / f"{kind}-{to}"
    stages = _stages_entered(lambda: export.export(src, to, options=options, lora=lora, output=out))
    assert stages == list(STAGES.values())
    assert (out / "manifest.json").is_file()
