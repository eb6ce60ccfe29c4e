"""LeRobot's side of the PEFT adapter checks (issue 32): loads adapters written by `export --format lerobot-peft`
through LeRobot's own factory (`make_policy` with `use_peft`), and measures them. Runs in LeRobot's Python
(lerobot 0.6.1, peft 0.21.2), offline:

    HF_HUB_OFFLINE=1 LEROBOT_PYTHON tests/lerobot_support/peft_check.py JOB.json OUT.json

JOB: {"dims": ... (as lerobot_check's reference.json), "kind": "pi0" | "pi05", "adapters": [{"name", "dir",
"merged_export", "reference_dir" or null}], "hot_swap": [name, name] or null, "merge": true}. OUT, per adapter: what
loading printed and warned, whether PEFT's own state dict of the loaded adapter is the file (every key, bitwise), what
a second `load_adapter` of the same directory reports missing / unexpected, the actions against the adapter's merged
export (in LeRobot) and against openpi's JAX LoRA model, and `merge_and_unload()` against the merged export, every
tensor; for `hot_swap`, the actions of both adapters loaded on one base, switched back and forth.
"""

import contextlib
import io
import json
import pathlib
import sys
import types
import warnings

import lerobot_check  # beside this script (its folder is first on sys.path)
import numpy as np
from safetensors.torch import load_file
import torch


def _dataset_meta(config: dict) -> types.SimpleNamespace:
    """What `make_policy` reads of a dataset's metadata: its features (the config's, in dataset form)."""
    features = {}
    for key, feature in {**config["input_features"], **config["output_features"]}.items():
        if feature["type"] == "VISUAL":
            c, h, w = feature["shape"]
            features[key] = {"dtype": "image", "shape": (h, w, c), "names": ["height", "width", "channels"]}
        else:
            features[key] = {"dtype": "float32", "shape": tuple(feature["shape"]), "names": None}
    return types.SimpleNamespace(features=features, stats=None)


_TINY_DIMS = lerobot_check.tiny_dims


@contextlib.contextmanager
def tiny_dims(modeling, config: dict, dims: dict):
    """`lerobot_check.tiny_dims`, and the action expert's (unused) lm_head with the model's vocabulary, as the
    export writes it (LeRobot hard-codes 257152; the bundled example's vocabulary is 1024)."""
    original = modeling.PiGemmaForCausalLM

    def expert(config):
        config.vocab_size = dims["paligemma"]["vocab_size"]
        return original(config=config)

    modeling.PiGemmaForCausalLM = expert
    try:
        with _TINY_DIMS(modeling, config, dims):
            yield
    finally:
        modeling.PiGemmaForCausalLM = original


def load(kind: str, export: pathlib.Path, dims: dict):
    """`lerobot_check.load` under `tiny_dims`: `<Policy>.from_pretrained(export)` and what it printed."""
    lerobot_check.tiny_dims = tiny_dims
    try:
        return lerobot_check.load(kind, export, dims)
    finally:
        lerobot_check.tiny_dims = _TINY_DIMS


def make_peft_policy(kind: str, adapter_dir: pathlib.Path, dims: dict):
    """LeRobot's factory: the adapter directory's config (`use_peft`), `pretrained_path` = the directory, as
    `--policy.path=DIR` sets it; `make_policy` loads BASE from `base_model_name_or_path` and the adapter with PEFT."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_policy

    _, modeling = lerobot_check._policy_class(kind)  # noqa: SLF001
    config_json = json.loads((adapter_dir / "config.json").read_text())
    cfg = PreTrainedConfig.from_pretrained(adapter_dir)
    cfg.pretrained_path = adapter_dir
    printed = io.StringIO()
    with (
        tiny_dims(modeling, config_json, dims),
        lerobot_check._fixture_tools()._offline_tokenizers(),  # noqa: SLF001
        contextlib.redirect_stdout(printed),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        policy = make_policy(cfg, ds_meta=_dataset_meta(config_json))
    policy.eval()
    return policy, {
        "use_peft": bool(cfg.use_peft),
        "class": type(policy).__name__,
        "printed": [line for line in printed.getvalue().splitlines() if line.strip()],
        "warnings": [str(w.message) for w in caught if "adapter" in str(w.message).lower()],
    }


def adapter_state(policy, adapter_dir: pathlib.Path, adapter_name: str = "default") -> dict:
    """PEFT's own state dict of the loaded adapter (`get_peft_model_state_dict`, the inverse of its load mapping)
    against the file: every key, bitwise; and a second `load_adapter` of the directory: its missing / unexpected
    keys (PeftModel.from_pretrained only warns on missing LoRA keys and says nothing of unexpected ones)."""
    from peft import get_peft_model_state_dict

    file = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(policy, adapter_name=adapter_name)
    common = sorted(set(file) & set(loaded))
    result = policy.load_adapter(str(adapter_dir), adapter_name="probe")
    policy.delete_adapter("probe")
    policy.set_adapter(adapter_name)
    return {
        "file_tensors": len(file),
        "loaded_tensors": len(loaded),
        "only_in_file": sorted(set(file) - set(loaded)),
        "only_in_model": sorted(set(loaded) - set(file)),
        "not_bitwise_equal": [k for k in common if not torch.equal(file[k], loaded[k].to(file[k].dtype))],
        "load_adapter_missing": list(result.missing_keys),
        "load_adapter_unexpected": list(result.unexpected_keys),
    }


def _actions(kind: str, policy, ref) -> np.ndarray:
    return lerobot_check.actions(kind, policy, ref)


def _rel(a, b, scale) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / scale)


def merge_check(policy, merged_export: pathlib.Path) -> dict:
    """PEFT's `merge_and_unload()` against our merged export, every tensor: max |diff| / max |export tensor| (a zero
    tensor must be equal)."""
    merged = policy.merge_and_unload().state_dict()
    want = load_file(str(merged_export / "model.safetensors"))
    errors = {}
    for key in sorted(set(merged) & set(want)):
        got, ref = merged[key].float(), want[key].float()
        scale = float(ref.abs().max())
        diff = float((got - ref).abs().max())
        errors[key] = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
    worst = max(errors, key=errors.get)
    return {
        "tensors": len(errors),
        "only_in_merge": sorted(set(merged) - set(want)),
        "only_in_export": sorted(set(want) - set(merged)),
        "max_rel_err": errors[worst],
        "worst_tensor": worst,
        "dtypes": sorted({str(v.dtype) for v in merged.values()}),
    }


def main(job_path: pathlib.Path, out: pathlib.Path) -> None:
    job = json.loads(job_path.read_text())
    kind, dims = job["kind"], job["dims"]
    result = {"kind": kind, "adapters": {}}
    merged_actions, refs = {}, {}
    for item in job["adapters"]:
        name, adapter_dir = item["name"], pathlib.Path(item["dir"])
        entry = result["adapters"][name] = {}
        ref = dict(np.load(pathlib.Path(item["reference_dir"]) / "reference.npz")) if item["reference_dir"] else None
        refs[name] = ref
        if ref is not None:
            merged_policy, printed = load(kind, pathlib.Path(item["merged_export"]), dims)
            entry["merged_export_loading"] = printed
            merged_actions[name] = _actions(kind, merged_policy, ref)
            del merged_policy
        policy, loading = make_peft_policy(kind, adapter_dir, dims)
        entry["loading"] = loading
        entry["adapter_state"] = adapter_state(policy, adapter_dir)
        if ref is not None:
            got = _actions(kind, policy.get_base_model(), ref)
            scale = float(np.max(np.abs(ref["actions_lora"])))
            entry["actions"] = {
                "scale": scale,
                "adapter_vs_jax_lora": _rel(got, ref["actions_lora"], scale),
                "adapter_vs_merged_export": _rel(got, merged_actions[name], scale),
                "merged_export_vs_jax_lora": _rel(merged_actions[name], ref["actions_lora"], scale),
                "jax_base_vs_jax_lora": _rel(ref["actions_base"], ref["actions_lora"], scale),
            }
        if job.get("merge", True):
            entry["merge_and_unload"] = merge_check(policy, pathlib.Path(item["merged_export"]))
        del policy
    if job.get("hot_swap"):
        result["hot_swap"] = hot_swap(kind, job, dims, merged_actions, refs)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary(result), indent=1))


def summary(result: dict) -> dict:
    """The numbers, without the key lists."""
    out = {}
    for name, entry in result["adapters"].items():
        state = entry["adapter_state"]
        out[name] = {
            "adapter_tensors_loaded": f"{state['loaded_tensors']}/{state['file_tensors']}",
            "problems": sum(len(v) for k, v in state.items() if isinstance(v, list))
            + len(entry["loading"]["warnings"]),
            **entry.get("actions", {}),
            **{f"merge_{k}": v for k, v in entry.get("merge_and_unload", {}).items() if not isinstance(v, list)},
        }
    if "hot_swap" in result:
        swap = result["hot_swap"]
        out["hot_swap"] = {k: v for k, v in swap.items() if not isinstance(v, list)}
        out["hot_swap"]["load_problems"] = len(swap["load_adapter_missing"]) + len(swap["load_adapter_unexpected"])
    return out


def hot_swap(kind: str, job: dict, dims: dict, merged_actions: dict, refs: dict) -> dict:
    """Both adapters on one base: the first through make_policy, the second with `load_adapter`; `set_adapter`
    back and forth. Each adapter's actions against its own merged export's; repeated switches must give the same
    bits."""
    first, second = job["hot_swap"]
    dirs = {item["name"]: pathlib.Path(item["dir"]) for item in job["adapters"]}
    policy, _ = make_peft_policy(kind, dirs[first], dims)
    # PEFT's load_adapter reports as missing every key of the model that holds the new adapter's name as a substring
    # (its filter: `adapter_name in key`), so the name must not occur in the model's keys ("b" would: "base_model").
    names = {first: "default", second: "second_finetune"}
    load = policy.load_adapter(str(dirs[second]), adapter_name=names[second])
    ref = refs[first]  # jax_reference's fixed observation and noise: the same for both runs (same model config)
    sequence, runs = [first, second, first, second, first], []
    for name in sequence:
        policy.set_adapter(names[name])
        runs.append(_actions(kind, policy.get_base_model(), ref))
    out = {"sequence": sequence, "load_adapter_missing": list(load.missing_keys)}
    out["load_adapter_unexpected"] = list(load.unexpected_keys)
    for name in (first, second):
        mine = [a for n, a in zip(sequence, runs, strict=True) if n == name]
        scale = float(np.max(np.abs(refs[name]["actions_lora"])))  # each run's JAX LoRA actions, as above
        out[name] = {
            "vs_own_merged_export": max(_rel(a, merged_actions[name], scale) for a in mine),
            "repeats_bitwise_equal": all(np.array_equal(mine[0], a) for a in mine[1:]),
        }
    out["adapters_differ_by"] = _rel(runs[0], runs[1], float(np.max(np.abs(runs[0]))))
    return out


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
