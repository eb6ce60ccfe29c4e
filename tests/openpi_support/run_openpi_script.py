"""Runs one of openpi's own scripts (scripts/train.py, ...) unmodified, with a tiny SigLIP, for the tests.

    python run_openpi_script.py OPENPI_REPO/scripts/train.py debug_lora --exp-name x ...

openpi's smallest model (the `dummy` gemma variants) still carries a full-size So400m SigLIP image encoder, which
makes a CPU train step take minutes. The tests shrink it in this process, before the script runs; nothing in openpi
is edited. The LLM (which is what carries the LoRA adapters) is untouched. It also registers the variants and train
configs of `user_variants.py`, as a user's launcher would.

For the crash-safety tests, `OPENPI_MERGE_TEST_KILL=<function>:<n>[:after]` SIGKILLs this process at the n-th call
of one of the plugin's functions during training, before it runs (or once it has returned, with `:after`):
`write_staged` (a merge on save starting: in async mode in the background, once its save has returned),
`merge_slice` (a layer slice of a merge), `move_into` (the commit that moves a finished merge into its step).
`OPENPI_MERGE_TEST_AVAILABLE_BYTES=<n>` makes the plugin see a host with n bytes of memory available.
"""

import os
import runpy
import signal
import sys

import openpi.models.siglip as siglip

_original_decode_variant = siglip.decode_variant


def _tiny_decode_variant(variant):
    if variant == "So400m/14":
        return {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": (56, 56)}
    return _original_decode_variant(variant)


siglip.decode_variant = _tiny_decode_variant


def _tiny_pytorch_layout() -> None:
    """The PyTorch export's layout with the same tiny SigLIP, and a projector of the tiny paligemma's width (upstream's
    PI0Pytorch hard-codes both; the PyTorch tests patch PI0Pytorch the same way)."""
    from openpi_merge_plugin.formats import tensors as pytorch_layout

    tiny = _tiny_decode_variant("So400m/14")
    patch = tiny["patch_size"][0]
    pytorch_layout.VISION = {
        "width": tiny["width"],
        "depth": tiny["depth"],
        "mlp_dim": tiny["mlp_dim"],
        "num_heads": tiny["num_heads"],
        "head_dim": tiny["width"] // tiny["num_heads"],
        "patch": patch,
        "positions": (224 // patch) ** 2,
    }
    pytorch_layout.PROJECTION_DIM = int(os.environ.get("OPENPI_MERGE_TEST_PROJECTION_DIM", "64"))


_tiny_pytorch_layout()

import user_variants  # noqa: E402,F401  (the tests' own variants and configs, registered as users do)


def _shim_create_data_loader_framework() -> None:
    """openpi 2d70d96's create_data_loader requires `framework=` and its own scripts/train.py does not pass it, so
    that train.py fails with a TypeError, plugin or not (fixed upstream later). Passes the JAX default it later got,
    only when the checkout needs it; nothing changes at 15a9616 or c23745b."""
    import inspect

    import openpi.training.data_loader as data_loader

    framework = inspect.signature(data_loader.create_data_loader).parameters.get("framework")
    if framework is None or framework.default is not inspect.Parameter.empty:
        return
    original = data_loader.create_data_loader

    def create_data_loader(*args, framework="jax", **kwargs):
        return original(*args, framework=framework, **kwargs)

    data_loader.create_data_loader = create_data_loader


_shim_create_data_loader_framework()


def _kill_at(spec: str) -> None:
    from openpi_merge_plugin.merge import slice_ops
    from openpi_merge_plugin.openpi_glue import merged_item

    name, n, *when = spec.split(":")
    module = {"merge_slice": slice_ops, "move_into": merged_item, "write_staged": merged_item}[name]
    real, calls = getattr(module, name), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == int(n)
        if hit and when != ["after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, dying)


if os.environ.get("OPENPI_MERGE_TEST_KILL"):
    _kill_at(os.environ["OPENPI_MERGE_TEST_KILL"])

if os.environ.get("OPENPI_MERGE_TEST_AVAILABLE_BYTES"):  # a host with this much memory available
    from openpi_merge_plugin.openpi_glue import host_copy

    host_copy.available_bytes = lambda: int(os.environ["OPENPI_MERGE_TEST_AVAILABLE_BYTES"])

if __name__ == "__main__":
    script, *argv = sys.argv[1:]
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
