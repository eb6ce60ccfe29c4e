"""Full-size pi0: the LeRobot PEFT adapter of a LoRA step against its merged LeRobot export (issue 32).

    flock /tmp/heavy.lock python scripts/benchmark_lerobot_peft.py run --workdir /path/with/40GB/free

Builds a random full-size pi0 LoRA step in openpi's exact layout (`benchmarks/full_size.build_step`: openpi's
`pi0_lora` tree, its default LoRA variants gemma_2b_lora / gemma_300m_lora, frozen LLM bf16, the rest fp32), or
measures `--step`, then, each in a child process under `/usr/bin/time -v`:

- `export --format lerobot` of the step (float32, merged on the way): the merged export;
- the adapter on a hub BASE (`lerobot/pi0_base`): LoRA factors and every module openpi's freeze filter left
  trainable (SigLIP, projector, action projections: fp32 in the step);
- BASE made locally from the step's own weights, as a user makes it: `openpi-merge-lora STEP --strength 0` then
  `export --format lerobot` of that (the strength-0 merge deleted after), then the adapter on it: BASE read whole and
  compared tensor by tensor; only what differs is saved (nothing: BASE is this step's own weights).
  `--base-precision bfloat16` (LeRobot's bfloat16 policy: half the disk) makes the adapter's precision bfloat16 too.

Every export runs `openpi-merge-lora export` (in-process `cli.main`), as a user would.

Prints a markdown table: wall time, peak RSS and the size of each file (adapter_model.safetensors vs
model.safetensors). The norm stats are tests/data/lerobot-0.6.1/norm_stats.json (the random step has none).
"""

import dataclasses
import json
import pathlib
import shutil
import sys
import tempfile
import time

import tyro

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/, next to scripts/
from benchmarks import full_size  # noqa: E402

NORM_STATS = REPO / "tests" / "data" / "lerobot-0.6.1" / "norm_stats.json"
HORIZON = 50


@dataclasses.dataclass
class Run:
    # Where to build the step and the outputs (about 40 GB free); default: a temporary directory.
    workdir: pathlib.Path | None = None
    # A full-depth LoRA step built before (`full_size.build_step`) to measure instead of building one.
    step: pathlib.Path | None = None
    # BASE's dtype (LeRobot's config `dtype`); the adapter on the local BASE takes it.
    base_precision: str = "float32"
    # Also time the merged export (16 GB on disk for a moment); without it the adapters are compared with the size the
    # merged export's layout gives (the file's, to the byte: the manifest's `merged_export_model_bytes`).
    merged: bool = True


@dataclasses.dataclass
class Child:
    """Child process: one export, by the command line. `what`: merged | adapter | base."""

    what: tyro.conf.Positional[str]
    step: tyro.conf.Positional[pathlib.Path]
    output: tyro.conf.Positional[pathlib.Path]
    base: str = "lerobot/pi0_base"
    precision: str = "float32"  # BASE's


def child(args: Child) -> None:
    from openpi_merge_plugin.cli import app as cli

    def main(*argv) -> None:
        if cli.main([str(a) for a in argv]) != 0:
            raise SystemExit(1)

    lerobot = ["--action-horizon", HORIZON, "--norm-stats", NORM_STATS, "--device", "cpu", "--no-progress"]
    if args.what == "merged":
        main("export", args.step, "--format", "lerobot", "--precision", "float32", "--output", args.output, *lerobot)
    elif args.what == "adapter":
        main("export", args.step, "--format", "lerobot-peft", "--base", args.base, "--output", args.output, *lerobot)
    elif args.what == "base":  # the step's own weights: merged at strength 0, then exported (the user's two commands)
        own = args.output.parent / f"{args.output.name}_strength0"
        main(args.step, "--strength", "0", "--output", own, "--no-progress")
        main("export", own, "--format", "lerobot", "--precision", args.precision, "--output", args.output, *lerobot)
        shutil.rmtree(own)
    else:
        raise SystemExit(f"unknown child {args.what!r}")


def run(args: Run) -> None:
    me = [sys.executable, str(pathlib.Path(__file__).resolve()), "child"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = pathlib.Path(tmp_name)
        step = args.step or tmp / "ckpt" / "100"
        if args.step is None:
            start = time.perf_counter()
            nbytes = full_size.build_step(step, 18)
            print(f"built the step: {nbytes / 1e9:.2f} GB of params in {time.perf_counter() - start:.0f}s", flush=True)
        full_size._warm(step)  # noqa: SLF001
        for label, what, out, extra in (
            ("export --format lerobot (merged, float32)", "merged", tmp / "merged", []),
            ("PEFT adapter, hub BASE (trainable modules saved)", "adapter", tmp / "adapter_hub", []),
            (f"BASE: the step's own weights as export --format lerobot ({args.base_precision})", "base", tmp / "base",
             ["--precision", args.base_precision]),
            ("PEFT adapter, local BASE (compared; only what differs saved)", "adapter", tmp / "adapter_local",
             ["--base", str(tmp / "base")]),
        ):  # fmt: skip
            if what == "merged" and not args.merged:
                continue
            wall, rss, note = full_size._timed([*me, what, str(step), str(out), *extra])  # noqa: SLF001
            if what == "base" and (out / "model.safetensors").is_file():
                note = f"model.safetensors {(out / 'model.safetensors').stat().st_size / 1e9:.2f} GB"
            if (out / "manifest.json").is_file():
                manifest = json.loads((out / "manifest.json").read_text())
                name = "model.safetensors" if what != "adapter" else "adapter_model.safetensors"
                size = manifest["files"][name]["bytes"]
                if what == "merged":
                    note = f"model.safetensors {size / 1e9:.2f} GB"
                elif what == "adapter":
                    adapter = manifest["adapter"]
                    merged = manifest["size"]["merged_export_model_bytes"]  # the merged export at this precision
                    note = (
                        f"adapter_model.safetensors {size / 1e9:.3f} GB = {size / merged:.1%} of the merged export "
                        f"({manifest['precision']}: {merged / 1e9:.2f} GB); {adapter['lora_targets']} LoRA targets, "
                        f"ranks {adapter['ranks']}, "
                        f"{len(adapter['modules_to_save'])} modules to save ({adapter['saved_tensors']} tensors); "
                        f"factors max rel err {manifest['verification']['factors']['max_rel_err']:.1e}"
                    )
                    if manifest["base"]["check"]:
                        check = manifest["base"]["check"]
                        note += f"; BASE: {check['bitwise_equal']}/{check['tensors_compared']} tensors bitwise equal"
            rows.append((label, wall, rss, note))
            print(rows[-1], flush=True)
            if what == "merged":
                shutil.rmtree(out, ignore_errors=True)
        if args.step is None:
            shutil.rmtree(step.parent)
    import os
    import platform

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, CPU; full-size pi0 LoRA step (18 layers)")
    print("| run | wall (s) | peak RSS (GB) | notes |")
    print("|---|---|---|---|")
    for label, wall, rss, note in rows:
        print(f"| {label} | {wall:.0f} | {rss:.1f} | {note} |")


def main() -> None:
    cmd = tyro.extras.subcommand_cli_from_dict({"run": Run, "child": Child})
    (run if isinstance(cmd, Run) else child)(cmd)


if __name__ == "__main__":
    main()
