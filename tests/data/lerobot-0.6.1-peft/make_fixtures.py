"""Makes the PEFT fixtures of issue 32 by running LeRobot 0.6.1 and PEFT 0.21.2's own code. See PROVENANCE.md.

    HF_HUB_OFFLINE=1 /work/lerobot-venv/bin/python tests/data/lerobot-0.6.1-peft/make_fixtures.py SCRATCH ADAPTER_DIR

ADAPTER_DIR: the adapter `openpi-merge-lora export --format lerobot-peft` writes for the bundled example on the hub BASE `lerobot/pi0_base`
(PROVENANCE.md says how). A `PI0Policy` is built at the bundled example's dimensions (random weights, float32, CPU;
no network: tokenizers stand in as in ../lerobot-0.6.1/make_fixtures.py), then:
- `lerobot_default/`: LeRobot's own PEFT adapter of it (`PreTrainedPolicy.wrap_with_peft()` with PI0's default
  targets and LeRobot's default rank), saved as LeRobot's `save_checkpoint` saves one (`PeftModel.save_pretrained`,
  then the policy config's `save_pretrained`): `adapter_config.json` and `config.json` verbatim, and the
  `adapter_model.safetensors` header (names, dtypes, shapes; offsets dropped).
- `resaved/`: PEFT reads ADAPTER_DIR's `adapter_config.json` (`PeftConfig.from_pretrained`), wraps the policy with it
  (`get_peft_model`) and saves it (`save_pretrained`): its `adapter_config.json` verbatim and its safetensors header,
  i.e. the names, shapes and dtypes PEFT itself writes for that config.
Writes into this folder; SCRATCH holds the saved directories.
"""

import json
import pathlib
import shutil
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parents[1]
sys.path.insert(0, str(TESTS / "lerobot_support"))

import peft_check  # noqa: E402  (tiny_dims at the example's dims, LeRobot's tokenizers stood in)

MODEL = json.loads((TESTS / "data" / "openpi-15a9616" / "lora-tiny" / "model_config.json").read_text())


def dims() -> dict:
    keys = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    variants = MODEL["gemma_variants"]
    pg, ae = (variants[MODEL["pi0_config"][k]] for k in ("paligemma_variant", "action_expert_variant"))
    siglip = MODEL["siglip_variant_patch"]
    return {
        "paligemma": {k: pg[k] for k in keys} | {"vocab_size": MODEL["paligemma_vocab_size"]},
        "action_expert": {k: ae[k] for k in keys},
        "siglip": {k: siglip[k] for k in ("width", "depth", "mlp_dim", "num_heads")} | {"patch_size": 14},
        "projection_dim": pg["width"],
    }


def header(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = json.loads(f.read(n))
    return {
        "__metadata__": raw.pop("__metadata__", None),
        "tensors": {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(raw.items())},
    }


def policy(pretrained_path: str | None = None):
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    import torch

    torch.manual_seed(0)
    config = PI0Config(device="cpu", dtype="float32", max_state_dim=32, max_action_dim=32)
    config.pretrained_path = pretrained_path
    names = {"paligemma_variant": config.paligemma_variant, "action_expert_variant": config.action_expert_variant}
    tokenizers = peft_check.lerobot_check._fixture_tools()._offline_tokenizers()  # noqa: SLF001
    with peft_check.tiny_dims(modeling_pi0, names, dims()), tokenizers:
        return modeling_pi0.PI0Policy(config)


def save(directory: pathlib.Path, out: pathlib.Path, files: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(directory / name, out / name)
    (out / "header.json").write_text(json.dumps(header(directory / "adapter_model.safetensors"), indent=1) + "\n")
    print("wrote", out, sorted(p.name for p in out.iterdir()))


def main(scratch: pathlib.Path, adapter_dir: pathlib.Path) -> None:
    from peft import PeftConfig
    from peft import get_peft_model

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    # LeRobot's own: wrap_with_peft needs a pretrained path (it refuses to train PEFT from scratch).
    wrapped = policy("lerobot/pi0_base").wrap_with_peft(peft_cli_overrides={})
    default = scratch / "lerobot_default"
    wrapped.save_pretrained(default)
    wrapped.config.save_pretrained(default)
    save(default, HERE / "lerobot_default", ("adapter_config.json", "config.json"))
    # PEFT's own writing of the config our exporter wrote.
    config = PeftConfig.from_pretrained(str(adapter_dir))
    resaved = scratch / "resaved"
    get_peft_model(policy(), config).save_pretrained(resaved)
    save(resaved, HERE / "resaved", ("adapter_config.json",))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
