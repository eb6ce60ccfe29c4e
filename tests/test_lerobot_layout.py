"""The LeRobot export's files against what LeRobot 0.6.1 itself produced (tests/data/lerobot-0.6.1, PROVENANCE.md).

- `model.safetensors`: the layout of openpi's own param trees (tests/data/openpi-15a9616/trees, built by upstream
  openpi) against `state_dict()` of LeRobot's policies: every key, shape and dtype, full size and tiny.
- `config.json` and the processor files: byte for byte what LeRobot's `save_pretrained` wrote for the same inputs.
Needs neither LeRobot nor openpi.
"""

import gzip
import json

from helpers import REPO
from helpers import TREES
import pytest

from openpi_merge_plugin.formats import lerobot_files
from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as pytorch_layout
from openpi_merge_plugin.lora.adapters import ShapeDtype

LEROBOT = REPO / "tests" / "data" / "lerobot-0.6.1"
LISTINGS = json.loads(gzip.decompress((LEROBOT / "state_dicts.json.gz").read_bytes()))
EXPERT = "_1"


def _tree(name: str, *, drop_expert: bool = False) -> dict[str, ShapeDtype]:
    params = json.loads((TREES / f"{name}.json").read_text())["params"]
    tree = {p: ShapeDtype(tuple(v["shape"]), v["dtype"]) for p, v in params.items()}
    if drop_expert:  # pi0-FAST is pi0's PaliGemma alone: no second expert, no action/state/time projections
        second = [p for p in tree if p.startswith("PaliGemma/llm/") and any(k.endswith(EXPERT) for k in p.split("/"))]
        tree = {p: v for p, v in tree.items() if p.startswith("PaliGemma/") and p not in second}
    return tree


def _layout(tree: dict[str, ShapeDtype], precision: str) -> lerobot_layout.LeRobotLayout:
    params = {p: (sd.shape, sd.dtype) for p, sd in tree.items()}
    fast = lerobot_layout.detect_kind(params) == "pi0_fast"
    return lerobot_layout.build_lerobot_layout(
        params,
        paligemma=pytorch_layout.dims_from_params(tree, ""),
        action_expert=None if fast else pytorch_layout.dims_from_params(tree, EXPERT),
        action_dim=None if fast else params["action_in_proj/kernel"][0][0],
        precision=precision,
        allow_nonstandard_dims=True,
    )


CASES = [
    ("pi0", {}, "pi0_full"),
    ("pi05", {}, "pi05_full"),
    ("pi0_fast", {}, "pi0_fast_full"),
    # openpi's dummy gemma (width 64) with So400m SigLIP: LeRobot's tiny policies with the projector at width 64.
    ("pi0_dummy", {}, "pi0_dummy-projector-patch"),
    ("pi0_dummy", {"drop_expert": True}, "pi0_fast_dummy-projector-patch"),
]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize(("tree", "kw", "listing"), CASES, ids=[c[2] for c in CASES])
def test_layout_is_lerobots_state_dict_key_for_key_shape_for_shape_dtype_for_dtype(tree, kw, listing, precision):
    layout = _layout(_tree(tree, **kw), precision)
    want = sorted(
        (name, tuple(shape), dtype) for name, shape, dtype in LISTINGS[f"{listing}_{precision}"]["state_dict"]
    )
    got = sorted((t.name, t.shape, t.recipe.dtype) for t in layout)
    assert got == want
    assert layout.kind == listing.split("_full")[0].split("_dummy")[0]
    assert all(t.dtype == {"float32": "F32", "bfloat16": "BF16"}[t.recipe.dtype] for t in layout)
    assert all(t.recipe.round_bf16 == (t.recipe.dtype == "bfloat16") for t in layout)  # float32 tensors exact
    # embed_tokens is its own tensor in LeRobot, made from the same JAX embedding as lm_head (openpi ties them).
    by_name = {t.name: t for t in layout}
    embed = by_name["model." + pytorch_layout.EMBED_TOKENS].recipe
    assert embed == by_name["model." + pytorch_layout.LM_HEAD].recipe


@pytest.mark.parametrize("tree", ["pi0", "pi05", "pi0_fast"])
def test_full_size_openpi_models_are_standard_for_lerobot(tree):
    layout = _layout(_tree(tree), "float32")
    assert layout.nonstandard_dims == {}
    assert (layout.paligemma_variant, layout.action_expert_variant) == ("gemma_2b", "gemma_300m")


def test_dims_lerobot_cannot_build_are_refused_and_named():
    tree = _tree("pi0_dummy")
    params = {p: (sd.shape, sd.dtype) for p, sd in tree.items()}
    with pytest.raises(
        pytorch_layout.NonstandardDimsError, match=r"projection_dim 64 \(LeRobot: 2048\).*paligemma_dims"
    ):
        lerobot_layout.build_lerobot_layout(
            params,
            paligemma=pytorch_layout.dims_from_params(tree, ""),
            action_expert=pytorch_layout.dims_from_params(tree, EXPERT),
            action_dim=32,
        )


def _saved_spec(kind: str) -> lerobot_files.PolicySpec:
    """The inputs of make_fixtures.py's `save` step (SAVE_CONFIGS), as the export would be given them."""
    return lerobot_files.PolicySpec(
        kind=kind,
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype={"pi0": "float32", "pi05": "bfloat16", "pi0_fast": "float32"}[kind],
        chunk_size={"pi0": 50, "pi05": 10, "pi0_fast": 10}[kind],
        n_action_steps={"pi0": 50, "pi05": 10, "pi0_fast": 10}[kind],
        max_dim=32,
        tokenizer_max_length={"pi0": 48, "pi05": 200, "pi0_fast": 200}[kind],
        cameras=lerobot_files.camera_names(),
        state_dim=8,
        action_dim=7,
        device="cpu",
    )


@pytest.mark.parametrize("kind", ["pi0", "pi05", "pi0_fast"])
def test_config_and_processor_files_are_byte_for_byte_lerobots(kind, tmp_path):
    stats = lerobot_files.normalizer_tensors(lerobot_files.read_openpi_norm_stats(LEROBOT / "norm_stats.json"), kind)
    written = lerobot_files.all_files(_saved_spec(kind), stats)
    saved = LEROBOT / "saved" / kind
    assert sorted(written) == sorted(p.name for p in saved.iterdir())
    for name, data in written.items():
        assert data == (saved / name).read_bytes(), name


def test_quantile_normalization_needs_quantiles():
    stats = lerobot_files.read_openpi_norm_stats(LEROBOT / "norm_stats.json")
    stats["actions"].pop("q99")
    lerobot_files.normalizer_tensors(stats, "pi0")  # MEAN_STD: mean and std are enough
    with pytest.raises(lerobot_files.LeRobotFilesError, match=r"'actions' lack \['q99'\], which QUANTILES"):
        lerobot_files.normalizer_tensors(stats, "pi05")


def test_cameras_default_to_openpis_names_and_are_renamed_in_model_order():
    assert lerobot_files.camera_names() == tuple(f"observation.images.{c}" for c in lerobot_files.OPENPI_CAMERAS)
    renamed = lerobot_files.camera_names({"left_wrist_0_rgb": "observation.images.wrist"})
    assert renamed[1] == "observation.images.wrist"
    assert renamed[0] == "observation.images.base_0_rgb"
    with pytest.raises(lerobot_files.LeRobotFilesError, match="unknown camera"):
        lerobot_files.camera_names({"top": "observation.images.top"})
    with pytest.raises(lerobot_files.LeRobotFilesError, match=r"must be named observation\.images\."):
        lerobot_files.camera_names({"base_0_rgb": "top"})
    with pytest.raises(lerobot_files.LeRobotFilesError, match="same feature name"):
        lerobot_files.camera_names({"base_0_rgb": "observation.images.left_wrist_0_rgb"})
