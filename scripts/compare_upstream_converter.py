"""Every tensor of a PyTorch export against what upstream's converter makes of the same checkpoint, full size
included (needs openpi and torch: run it with the Python of `scripts/openpi_env.sh`).

    OPENPI_VENV/bin/python scripts/compare_upstream_converter.py CHECKPOINT EXPORT [--precision P] [--model-dtype D]

CHECKPOINT: an openpi checkpoint (a directory with `params/`); EXPORT: `openpi-merge-lora export CHECKPOINT --format
pytorch --precision P [--model-dtype D]` of it. Upstream's `examples/convert_jax_model_to_pytorch.py` (from the
openpi checkout installed here) is imported unchanged, and `convert_pi0_checkpoint`'s steps are run as it runs them,
but that the model never is whole in memory (upstream holds it in float32 twice, ~26 GB at full size):
- its slicing functions, `slice_paligemma_state_dict` and `slice_gemma_state_dict`, run one layer at a time: each
  call gets a config of one layer (the dims otherwise the params', which at full size are those it hard-codes) and
  that layer's slices, read as float32 as its `restore_params(..., dtype="float32")` reads them;
- its projection loop (kernel `.T`, bias as it is: inline in `convert_pi0_checkpoint`, so repeated here);
- its precision step, `PI0Pytorch(Pi0Config(dtype=D))`, `load_state_dict` and `.to(P)`: each sliced tensor cast to
  the dtype its parameter has in that PI0Pytorch (built on the meta device), then to P.
Each result must equal the export's tensor of that name bitwise (`embed_tokens` is saved as the tied `lm_head`), and
the export must hold every parameter of PI0Pytorch's state dict; the action expert's `lm_head` (random in upstream's
file, no JAX source) must be zeros. Prints a summary and exits 1 on any difference.
"""

import dataclasses
import importlib.util
import pathlib
import sys
import types
from typing import Literal

import numpy as np
import tyro


@dataclasses.dataclass
class Args:
    checkpoint: tyro.conf.Positional[pathlib.Path]
    export: tyro.conf.Positional[pathlib.Path]
    precision: Literal["float32", "bfloat16"] = "float32"
    # Pi0Config.dtype the export was made for (openpi's default).
    model_dtype: Literal["float32", "bfloat16"] = "bfloat16"


def converter() -> types.ModuleType:
    import openpi

    path = pathlib.Path(openpi.__file__).resolve().parents[2] / "examples" / "convert_jax_model_to_pytorch.py"
    spec = importlib.util.spec_from_file_location("convert_jax_model_to_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(**fields) -> types.SimpleNamespace:
    return types.SimpleNamespace(**fields)


def main(args: Args) -> int:
    import safetensors
    import torch

    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.formats import tensors

    conv = converter()
    source = sources.OrbaxSource(args.checkpoint / "params")
    tree = source.tree
    pi05 = tensors.detect_pi05({p: (sd.shape, sd.dtype) for p, sd in tree.items()})
    pg, ae = tensors.dims_from_params(tree, ""), tensors.dims_from_params(tree, "_1")
    vision_layers = tree["PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    vision_width = tree["PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale"].shape[1]
    dtypes = _param_dtypes(pg, ae, args.model_dtype, pi05=pi05)
    precision = getattr(torch, args.precision)

    def read(path: str, layer: int | None = None) -> np.ndarray:
        array = source.sliced(path)
        array = array[()] if layer is None else array[(layer,)][None]  # a layer keeps its axis: depth 1
        return np.asarray(array).astype(np.float32)

    whole = [p for p in tree if p.startswith("PaliGemma/") and not _layered(p)]
    fixed = {p.removeprefix("PaliGemma/"): read(p) for p in whole}  # the embedding, norms, projector: read once
    compared, differ = 0, []
    done: set[str] = set()
    with safetensors.safe_open(str(args.export / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())

        def check(name: str, value: torch.Tensor) -> None:
            nonlocal compared
            if name in done:
                return
            done.add(name)
            saved = tensors.LM_HEAD if name == tensors.EMBED_TOKENS else name
            want = value.to(dtypes[name]).to(precision)
            got = f.get_tensor(saved)
            if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(_bits(got), _bits(want)):
                differ.append(f"{name}: export {got.dtype}{list(got.shape)}, upstream {want.dtype}{list(want.shape)}")
            compared += 1

        for key in ("action_in_proj", "action_out_proj", *_projections(pi05=pi05)):  # convert_pi0_checkpoint's loop
            kernel, bias = read(f"{key}/kernel"), read(f"{key}/bias")
            check(f"{key}.weight", torch.from_numpy(np.array(kernel)).T)
            check(f"{key}.bias", torch.from_numpy(np.array(bias)))
        for layer in range(max(vision_layers, pg.depth)):
            state = dict(fixed)
            for path in tree:
                if path.startswith("PaliGemma/") and _layered(path):
                    is_vision = path.startswith("PaliGemma/img/")
                    at = layer if layer < (vision_layers if is_vision else pg.depth) else 0
                    state[path.removeprefix("PaliGemma/")] = read(path, at)
            config = _config(
                vision_config=_config(hidden_size=vision_width, num_hidden_layers=1),
                text_config=_config(
                    hidden_size=pg.width,
                    num_hidden_layers=1,
                    num_attention_heads=pg.num_heads,
                    head_dim=pg.head_dim,
                    intermediate_size=pg.mlp_dim,
                ),
            )
            paligemma, expert = conv.slice_paligemma_state_dict(state, config)
            expert_config = _config(**dataclasses.asdict(ae), num_hidden_layers=1)
            expert_config.depth = 1
            checkpoint_dir = "pi05" if pi05 else "pi0"  # slice_gemma_state_dict tells pi0.5 by the path's name
            gemma = conv.slice_gemma_state_dict(
                expert, expert_config, num_expert=1, checkpoint_dir=checkpoint_dir, pi05=pi05
            )
            for name, value in {**paligemma, **gemma}.items():
                own = _own_layer(name, layer, vision_layers, pg.depth)
                if own is not None:
                    check(own, value)
            print(f"layer {layer}: {compared} tensors compared", file=sys.stderr)
        expert_head = f.get_tensor(tensors.EXPERT_LM_HEAD)
    expected = {n for n in dtypes if _vision_layer(n) < vision_layers} - {tensors.LM_HEAD, tensors.EXPERT_LM_HEAD}
    missing = sorted(expected - done)
    extra = sorted(names - {tensors.LM_HEAD, tensors.EXPERT_LM_HEAD} - done)
    if missing or extra:
        differ.append(
            f"PI0Pytorch parameters not compared: {missing[:5]}; export tensors upstream has not: {extra[:5]}"
        )
    if torch.count_nonzero(expert_head):
        differ.append(f"{tensors.EXPERT_LM_HEAD} is not zeros")
    what = f"{'pi0.5' if pi05 else 'pi0'}, precision {args.precision}, Pi0Config.dtype {args.model_dtype}"
    if differ:
        print(f"{len(differ)} of {compared} tensors differ from upstream's converter ({what}):", *differ[:20], sep="\n")
        return 1
    print(
        f"all {compared} tensors bitwise equal to upstream's converter ({what}); {len(names)} tensors in the export, "
        f"{tensors.EXPERT_LM_HEAD} zeros (upstream: random, no JAX source)"
    )
    return 0


def _projections(*, pi05: bool) -> tuple[str, ...]:
    return ("time_mlp_in", "time_mlp_out") if pi05 else ("state_proj", "action_time_mlp_in", "action_time_mlp_out")


def _layered(path: str) -> bool:
    """A leaf with the scanned depth axis: the SigLIP encoder blocks and the LLM layers."""
    return "/encoderblock/" in path or "/llm/layers/" in path


def _vision_layer(name: str) -> int:
    """The SigLIP layer of a parameter name, or -1 (the meta PI0Pytorch has SigLIP So400m's 27 layers)."""
    if ".vision_model.encoder.layers." not in name:
        return -1
    return int(name.split(".vision_model.encoder.layers.")[1].split(".", maxsplit=1)[0])


def _own_layer(name: str, layer: int, vision_layers: int, depth: int) -> str | None:
    """An output of the call for `layer` under its own name (`layers.0` is that layer), or None where the call
    only repeated layer 0 to fill a loop (SigLIP has more layers than the LLM) or a tensor already compared."""
    if ".layers.0." not in name:
        return name
    is_vision = ".vision_model." in name
    if layer >= (vision_layers if is_vision else depth):
        return None
    return name.replace(".layers.0.", f".layers.{layer}.")


def _param_dtypes(pg, ae, model_dtype: str, *, pi05: bool) -> dict:
    """PI0Pytorch's state dict, name -> dtype, built on the meta device under Pi0Config(dtype=model_dtype); its
    gemma variants are the params' dims (at full size gemma_2b and gemma_300m)."""
    from openpi.models import gemma
    from openpi.models import pi0_config
    from openpi.models_pytorch import pi0_pytorch
    import torch

    dims = {"paligemma": pg, "expert": ae}
    named = {name: tensors_of(d) for name, d in dims.items()}
    original = gemma.get_config
    gemma.get_config = lambda v: named[v] if v in named else original(v)
    try:
        config = pi0_config.Pi0Config(
            pi05=pi05,
            paligemma_variant="paligemma",
            action_expert_variant="expert",
            dtype=model_dtype,
            pytorch_compile_mode=None,
        )
        with torch.device("meta"):
            model = pi0_pytorch.PI0Pytorch(config)
    finally:
        gemma.get_config = original
    return {name: t.dtype for name, t in model.state_dict().items()}


def tensors_of(dims):
    from openpi.models import gemma

    return gemma.Config(**dataclasses.asdict(dims))


def _bits(t):
    import torch

    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
