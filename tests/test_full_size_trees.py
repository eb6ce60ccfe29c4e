"""Adapter discovery on the full-size param trees of openpi's shipped models (shapes only, nothing allocated)."""

import json

from helpers import TREES
import numpy as np
import pytest

from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora import configs as lora_configs


def _tree(name: str) -> tuple[dict, dict[str, _adapters.ShapeDtype]]:
    data = json.loads((TREES / f"{name}.json").read_text())
    # As saved by scripts/train.py: params selected by the LoRA freeze filter are cast to bfloat16.
    tree = {
        p: _adapters.ShapeDtype(tuple(v["shape"]), "bfloat16" if v["frozen"] else v["dtype"])
        for p, v in data["params"].items()
    }
    return data, tree


CASES = [
    # (LoRA tree, non-LoRA twin, adapted weights per expert, variant per expert)
    ("pi0_lora", "pi0", {0: 5, 1: 5}, {0: ("gemma_2b_lora", 16, 16.0), 1: ("gemma_300m_lora", 32, 32.0)}),
    ("pi05_lora", "pi05", {0: 5, 1: 5}, {0: ("gemma_2b_lora", 16, 16.0), 1: ("gemma_300m_lora", 32, 32.0)}),
    ("pi0_fast_lora", "pi0_fast", {0: 5}, {0: ("gemma_2b_lora", 16, 16.0)}),
]


@pytest.mark.parametrize(("lora_name", "twin_name", "per_expert", "variants"), CASES)
def test_finds_every_adapter_of_the_shipped_models(lora_name, twin_name, per_expert, variants):
    data, tree = _tree(lora_name)
    resolved = lora_configs.infer_shipped(tree)
    adapters = _adapters.find_adapters(tree, resolved.experts)

    lora_tensors = {p for p in tree if "lora" in p}
    assert len(lora_tensors) == data["lora_tensor_count"]  # 20 / 20 / 10
    assert {p for a in adapters for p in (a.a_path, a.b_path)} == lora_tensors
    counts = {}
    for a in adapters:
        counts[a.expert] = counts.get(a.expert, 0) + 1
        variant, rank, alpha = variants[a.expert]
        assert resolved.experts[a.expert].variant == variant
        assert (a.rank, a.spec.alpha) == (rank, alpha)
        assert a.scale == (alpha / rank if a.kind == "attn" else 1.0)
        assert a.lead_shape == (18,)  # nn.scan depth
        suffix = "_1" if a.expert == 1 else ""
        module = a.base_path.split("/")[-2]
        assert module.endswith(suffix) if suffix else not module.endswith("_1")
        assert tree[a.base_path].dtype == "bfloat16"
    assert counts == per_expert
    assert sum(int(np.prod(tree[p].shape)) for p in lora_tensors) == data["lora_param_count"]

    merged = _adapters.merged_structure(tree, adapters, lambda a: "float32")
    twin = json.loads((TREES / f"{twin_name}.json").read_text())["params"]
    assert set(merged) == set(twin)
    for path, sd in merged.items():
        assert list(sd.shape) == twin[path]["shape"], path


def test_pi0_attn_vec_and_mlp_pairs_use_the_right_equations():
    _, tree = _tree("pi0_lora")
    adapters = {a.module: a for a in _adapters.find_adapters(tree, lora_configs.infer_shipped(tree).experts)}
    assert adapters["attn_vec_einsum"].delta.lora_equations == ("BTNH,NHL->BTL", "BTL,NLD->BTD")
    assert adapters["kv_einsum_1"].delta.layer_equation == "BSD,2KDH->2BSKH"
    assert adapters["mlp/gating_einsum"].kind == "ffn"
    assert adapters["mlp_1/linear"].base_path == "PaliGemma/llm/layers/mlp_1/linear"
    assert adapters["mlp_1/linear"].rank == 32


def test_unknown_width_or_rank_is_not_guessed():
    _, tree = _tree("pi0_lora")
    a = "PaliGemma/llm/layers/attn/q_einsum/lora_a"
    tree = {**tree, a: _adapters.ShapeDtype((*tree[a].shape[:-1], 8), "float32")}
    with pytest.raises(Exception, match="cannot tell the LoRA alpha of expert 0"):
        lora_configs.infer_shipped(tree)
