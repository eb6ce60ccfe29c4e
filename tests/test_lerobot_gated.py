"""`export --format lerobot` loaded and run by LeRobot 0.6.1's own policy classes, against openpi's JAX models (issue 23).

Needs upstream openpi here (the runs, the export, the JAX references) and LeRobot's Python (3.12, lerobot 0.6.1) named
by OPENPI_MERGE_LEROBOT_PYTHON; skipped without either. Tiny pi0, pi0.5 and pi0-FAST LoRA runs are trained with
openpi's scripts/train.py; each step's merge on save and its base weights (a strength-0 merge) are exported with
`openpi-merge-lora export --format lerobot --precision float32 --device cpu --allow-nonstandard-dims` (the tiny dims
are not LeRobot's); `lerobot_support/jax_reference.py` writes openpi's outputs, and `lerobot_support/lerobot_check.py`, in
LeRobot's Python, loads both exports with `<Policy>.from_pretrained` and measures them. The tiny SigLIP and projector
are those of the other gated tests (run_openpi_script), on both sides. Measured numbers: docs/lerobot.md.

    OPENPI_MERGE_LEROBOT_PYTHON=LEROBOT_VENV/bin/python PYTHONPATH=. \
        OPENPI_VENV/bin/python -m pytest -m lerobot tests/test_lerobot_gated.py -s

OPENPI_MERGE_TEST_RUNS_DIR=DIR keeps the trained runs there and reuses them (development only).
"""

import importlib.util
import json
import os
import pathlib
import subprocess

import numpy as np
from openpi_support import gate
import pytest

LEROBOT_PYTHON = os.environ.get("OPENPI_MERGE_LEROBOT_PYTHON", "")
if not pathlib.Path(LEROBOT_PYTHON).is_file():
    pytest.skip("LeRobot's Python is not given (OPENPI_MERGE_LEROBOT_PYTHON)", allow_module_level=True)
openpi_config = gate.require_openpi()
from lerobot_support import jax_reference  # noqa: E402
from openpi.shared import normalize  # noqa: E402
import training  # noqa: E402

from openpi_merge_plugin import cli  # noqa: E402
from openpi_merge_plugin.options import MergeOptions  # noqa: E402
from openpi_merge_plugin.pipeline import checkpoint_merge  # noqa: E402

pytestmark = [pytest.mark.openpi, pytest.mark.lerobot]
CHECK = pathlib.Path(__file__).resolve().parent / "lerobot_support" / "lerobot_check.py"
# pi0: the shipped debug_lora; pi0.5 and pi0-FAST: user_variants' configs, whose LLM weights are random (their zero
# inits would make the action expert's layers, or every logit, vanish).
CASES = {"pi0": "debug_lora", "pi05": "my_pi05_lora", "pi0_fast": "my_pi0_fast_lora"}
# openpi's normalization per model (training/config.py: use_quantile_norm = model_type != PI0), in LeRobot's names.
OPENPI_MODE = {"pi0": "MEAN_STD", "pi05": "QUANTILES", "pi0_fast": "QUANTILES"}


def _export_argv(src: pathlib.Path, output: pathlib.Path) -> list[str]:
    argv = ["export", str(src), "--format", "lerobot", "--precision", "float32", "--device", "cpu"]
    return [*argv, "--allow-nonstandard-dims", "--output", str(output), "--no-progress"]


def _lerobot_pipeline():
    """The exporter's pipeline module (its `PI0_FAST_REFUSED` switch), or None where this tree has none."""
    try:
        return importlib.import_module("openpi_merge_plugin.formats.lerobot")
    except ModuleNotFoundError:
        return None


def lerobot_export(src: pathlib.Path, output: pathlib.Path, *, past_pi0_fast_refusal: bool = False) -> pathlib.Path:
    """`openpi-merge-lora export SRC --format lerobot --device cpu` of a merged checkpoint (its manifest names the
    openpi config), run in this process, where the tiny SigLIP layout is set. `--device cpu`: the processors' device
    (LeRobot refuses to load them for a device it does not have). `past_pi0_fast_refusal`: with the exporter's pi0-FAST
    switch off, so that what it would write can be measured (that measurement is why it refuses).
    OPENPI_MERGE_TEST_LEROBOT_EXPORTER=FILE.py runs that file's `main(argv)` with the same argv instead."""
    main = cli.main
    if os.environ.get("OPENPI_MERGE_TEST_LEROBOT_EXPORTER"):
        spec = importlib.util.spec_from_file_location("exporter", os.environ["OPENPI_MERGE_TEST_LEROBOT_EXPORTER"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    with pytest.MonkeyPatch.context() as patch:
        if past_pi0_fast_refusal and _lerobot_pipeline() is not None:
            patch.setattr(_lerobot_pipeline(), "PI0_FAST_REFUSED", None)
        assert main(_export_argv(src, output)) == 0
    return output


def _known_norm_stats(step: pathlib.Path, config) -> pathlib.Path:
    """Replaces the run's norm stats (train.py's fake data has none, or mean 0 / std 1) by known, non-trivial ones
    with quantiles, under the config's asset id (its repo id when it has none), in the step and in its merge."""
    data = config.data.create(config.assets_dirs, config.model)
    folder = pathlib.Path("assets") / (data.asset_id or data.repo_id)
    ramp = np.linspace(0.0, 1.0, config.model.action_dim)
    mean, std = -0.5 + ramp, 0.5 + ramp
    stats = {
        key: normalize.NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2.5 * std)
        for key in ("state", "actions")
    }
    for root in (step, step / "merged"):
        if root.is_dir():
            normalize.save(root / folder, stats)
    return step / folder


def _run(kind: str, tmp: pathlib.Path) -> pathlib.Path:
    config = CASES[kind]
    runs = os.environ.get("OPENPI_MERGE_TEST_RUNS_DIR")
    base = pathlib.Path(runs) / kind if runs else tmp
    step = training.step_dir(base, config, "lerobot", 9)
    if not step.exists():
        base.mkdir(parents=True, exist_ok=True)
        training.train(base, config, "lerobot", "--keep-period", "None")
    return step


@pytest.fixture(scope="module", params=list(CASES))
def compared(request, tmp_path_factory) -> dict:
    """One run: both exports, openpi's references and LeRobot's measurements (lerobot_check.py's JSON)."""
    kind, name = request.param, CASES[request.param]
    tmp = tmp_path_factory.mktemp(kind)
    step = _run(kind, tmp)
    lora, serving = openpi_config.get_config(name), openpi_config.get_config(f"{name}_merged")
    stats_dir = _known_norm_stats(step, lora)
    base_merged = tmp / "base_merged"  # the frozen weights, no adapters (strength 0), float32
    checkpoint_merge.merge_checkpoint(
        step, output=base_merged, lora=checkpoint_merge.LoRASource(config=name), options=MergeOptions(strength=0.0)
    )
    fast = kind == "pi0_fast"
    merged_export = lerobot_export(step / "merged", tmp / "lerobot_merged", past_pi0_fast_refusal=fast)
    base_export = lerobot_export(base_merged, tmp / "lerobot_base", past_pi0_fast_refusal=fast)
    jax_reference.write(tmp, lora, serving, step / "params", stats_dir)
    out = tmp / "lerobot_check.json"
    cmd = [LEROBOT_PYTHON, str(CHECK), str(tmp), str(merged_export), str(base_export), str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"\n{kind} ({name}):\n{proc.stdout}")
    return {**json.loads(out.read_text()), "merged_source": str(step / "merged")}


def test_policy_loads_the_export_bitwise(compared):
    """`<Policy>.from_pretrained(dir)` holds exactly the file's tensors: same keys, dtypes and bits (LeRobot's loader
    would only print a mismatch and keep random weights)."""
    for name, export in compared["exports"].items():
        sd = export["state_dict"]
        assert sd["file_tensors"] == sd["state_dict_tensors"] > 0, (name, sd)
        for problem in ("only_in_file", "only_in_state_dict", "dtype_differs", "not_bitwise_equal"):
            assert sd[problem] == [], (name, problem, sd[problem])
        assert sd["dtypes"] == ["torch.float32"], name


def test_processors_normalize_as_openpi(compared):
    """The processors load from the directory, in openpi's mode for the model, and normalize a known state as openpi's
    `transforms.Normalize` does with the same stats, but for the eps (LeRobot 1e-8 on std or none on the quantile
    range, openpi 1e-6 on both): relative difference about 1e-6 / (std or q99 - q01)."""
    for name, export in compared["exports"].items():
        norm = export["normalization"]
        assert norm["state_mode"] == norm["action_mode"] == OPENPI_MODE[compared["kind"]], (name, norm)
        assert "NormalizerProcessorStep" in norm["pre_steps"], norm
        assert norm["max_rel_diff"] <= 1e-5, (name, norm)


def test_actions_match_the_jax_lora_model(compared):
    """pi0 / pi0.5, float32, same noise and inputs: LeRobot's model on the merged export is within 2% of what the
    adapters change (JAX base vs JAX LoRA), and as close as the same LeRobot model is on the base weights."""
    if compared["kind"] == "pi0_fast":
        pytest.skip("pi0-FAST decodes tokens: see the logits test")
    a = compared["actions"]
    assert a["merged_export_vs_jax_lora"] <= 0.02 * a["jax_base_vs_jax_lora"], a
    assert a["merged_export_vs_jax_lora"] <= 2 * a["base_export_vs_jax_base"], a


def _fast(compared) -> dict:
    if compared["kind"] != "pi0_fast":
        pytest.skip("pi0 / pi0.5 sample actions: see the actions test")
    return compared["fast"]


def test_pi0_fast_prefix_logits_match_openpi(compared):
    """pi0-FAST, float32, the same token ids: PI0FastPytorch's logits over the prompt (images and text, prefix-LM
    mask; the last one is what openpi decodes its first token from) are openpi's Pi0FAST's to 1e-3 of their scale,
    for the merged export against the JAX LoRA model and for the base export against the JAX base model."""
    fast = _fast(compared)
    for name in ("lora", "base"):
        f = fast[name]
        assert f["prefix_logits_rel_diff"] <= 1e-3, (name, f)
        assert f["last_prefix_argmax_lerobot"] == f["last_prefix_argmax_openpi"] == f["greedy_tokens_openpi"][0]
    assert fast["lora_vs_base_prefix_logits_rel"] >= 100 * fast["lora"]["prefix_logits_rel_diff"]


def test_pi0_fast_lerobot_decodes_other_tokens_than_openpi_because_of_its_bos(compared):
    """LeRobot's greedy decoding (`sample_actions_fast`) appends BOS to the prompt and predicts the first action token
    from it; openpi's Pi0FAST predicts it from the prompt's last token. So for the same weights (base and merged) the
    tokens differ, while the same modules decoded as openpi decodes (no BOS) give openpi's tokens: the decode, not the
    weights or the forward pass, differs. This is why the export refuses pi0-FAST (docs/lerobot.md)."""
    fast = _fast(compared)
    for name in ("lora", "base"):
        f = fast[name]
        assert f["greedy_tokens_without_bos_equal"], (name, f)
        assert not f["greedy_tokens_equal"], (name, f)
        assert f["first_step_logits_rel_diff"] > 100 * f["prefix_logits_rel_diff"], (name, f)


def test_pi0_fast_export_is_refused_saying_what_differs(compared, tmp_path, capsys):
    """What the measurements above decide: the export refuses pi0-FAST, before writing anything, with one error line
    that names LeRobot's BOS."""
    _fast(compared)
    pipeline = _lerobot_pipeline()
    if pipeline is None or os.environ.get("OPENPI_MERGE_TEST_LEROBOT_EXPORTER"):
        pytest.skip("this tree has no LeRobot exporter")
    assert pipeline.PI0_FAST_REFUSED
    assert cli.main(_export_argv(pathlib.Path(compared["merged_source"]), tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    assert "pi0-FAST" in err[0], err
    assert "BOS" in err[0], err
    assert not (tmp_path / "out").exists()
