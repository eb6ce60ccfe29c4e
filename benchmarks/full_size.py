"""`python scripts/benchmark_full_size.py` (see its docstring): a full-size pi0 LoRA checkpoint, the streaming
merge against a naive restore-convert-save copy; the exports of it and of a full-size non-LoRA pi0.5 checkpoint
against their I/O floor."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tyro

REPO = pathlib.Path(__file__).resolve().parent.parent
TREES = REPO / "tests" / "data" / "openpi-15a9616" / "trees"
TREE = TREES / "pi0_lora.json"
LLM_LAYERS = "PaliGemma/llm/layers/"
NORM_STATS = REPO / "tests" / "data" / "lerobot-0.6.1" / "norm_stats.json"  # state 8, actions 7; mean, std, q01, q99


@dataclasses.dataclass
class Run:
    """Build the checkpoints and measure."""

    # Where to build checkpoints and outputs (needs about 40 GB free); default: a temporary directory.
    workdir: pathlib.Path | None = None
    # Skip the full-depth case.
    half_only: bool = False
    # Skip the half-depth case.
    full_only: bool = False
    # Skip the naive copy at full depth (it needs more memory than a 24 GB machine has).
    skip_full_naive: bool = True
    # A full-depth LoRA step built before (`build_step`, 18 layers) to measure instead of building one; never modified.
    step: pathlib.Path | None = None
    # At full depth, also measure the PyTorch export of the LoRA step against the I/O floor.
    export: bool = True
    # The LoRA step's cases (merge, naive copy, its export); --no-lora measures only the non-LoRA checkpoint.
    lora: bool = True
    # Also a non-LoRA pi0.5 checkpoint in openpi's released layout (random float32 weights, every leaf of openpi's
    # pi05 tree, no `value` suffix; no norm stats, as a base): its exports to PyTorch and to LeRobot (with the
    # norm stats of tests/data/lerobot-0.6.1) against the I/O floor of the same checkpoint.
    plain: bool = True
    # A non-LoRA checkpoint built before (`build_plain`) to measure instead of building one; never modified.
    plain_checkpoint: pathlib.Path | None = None


@dataclasses.dataclass
class FloorExport:
    """Child process: the export's I/O floor: read every leaf of STEP once, widen it to float32, append it to one
    file (OUTPUT), fsync."""

    step: tyro.conf.Positional[pathlib.Path]
    output: tyro.conf.Positional[pathlib.Path]


@dataclasses.dataclass
class NaiveCopy:
    """Child process: restore the whole params item, convert adapted weights to float32, drop LoRA leaves, save."""

    step: tyro.conf.Positional[pathlib.Path]
    output: tyro.conf.Positional[pathlib.Path]


@dataclasses.dataclass
class CheckBitwise:
    """Child process: the streamed merge of STEP (at MERGED) equals the in-memory merge, leaf by leaf, bitwise."""

    step: tyro.conf.Positional[pathlib.Path]
    merged: tyro.conf.Positional[pathlib.Path]


def training_layout(depth: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of a pi0 LoRA training checkpoint's params with `depth` LLM layers."""
    params = json.loads(TREE.read_text())["params"]
    out = {}
    for path, leaf in params.items():
        shape = list(leaf["shape"])
        if path.startswith(LLM_LAYERS):
            shape[0] = depth
        out[f"{path}/value"] = (tuple(shape), "bfloat16" if leaf["frozen"] else "float32")
    return out


def released_layout(tree: str = "pi05") -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of a non-LoRA model's params as openpi's released checkpoints hold them: every leaf of
    the shipped tree, float32, no `value` suffix."""
    params = json.loads((TREES / f"{tree}.json").read_text())["params"]
    return {path: (tuple(leaf["shape"]), "float32") for path, leaf in params.items()}


def build_plain(directory: pathlib.Path, tree: str = "pi05", seed: int = 0) -> int:
    """Writes a random non-LoRA checkpoint in openpi's released layout (`<dir>/params`, `<dir>/assets`, no norm
    stats), one leaf at a time; returns its params' bytes."""
    return build_step(directory, 0, seed, layout=released_layout(tree))


def build_step(
    step: pathlib.Path, depth: int, seed: int = 0, *, layout: dict[str, tuple[tuple[int, ...], str]] | None = None
) -> int:
    """Writes a random LoRA step directory (streamed one leaf at a time, so it fits in memory); returns its params'
    bytes. Each leaf is one chunk, as `save_state` writes the params of a run on one device (Orbax's write shape is
    the array's), so a reader has to decode each weight whole, as it would for a real checkpoint. `layout`: other
    leaves than the LoRA step's at `depth`."""
    from openpi_merge_plugin.checkpoint import orbax_stream
    from openpi_merge_plugin.lora.adapters import ShapeDtype

    layout = training_layout(depth) if layout is None else layout
    rng = np.random.default_rng(seed)

    def leaf(shape: tuple[int, ...], dtype: str) -> np.ndarray:
        out = np.empty(shape, dtype)
        for index in np.ndindex(*shape[:1]):  # filled a layer at a time, to keep the float32 draw small
            x = rng.random(shape[1:], dtype=np.float32)
            x -= 0.5
            x *= 0.04
            out[index] = x
        return out

    def stream():
        for path, (shape, dtype) in layout.items():
            yield orbax_stream.whole(path, leaf(shape, dtype))

    step.mkdir(parents=True)
    orbax_stream.save(step / "params", {p: ShapeDtype(s, d) for p, (s, d) in layout.items()}, stream)
    (step / "assets").mkdir()
    return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in layout.values())


def naive_copy(args: NaiveCopy) -> None:
    import orbax.checkpoint as ocp

    from openpi_merge_plugin.checkpoint import orbax_compat
    from openpi_merge_plugin.checkpoint import sources

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = orbax_compat.tree_metadata(args.step / "params")
        restore_args = {"params": _as_numpy_restore(meta["params"])}
        tree = ckptr.restore(args.step / "params", args=ocp.args.PyTreeRestore(meta, restore_args=restore_args))
    flat = sources.flatten(tree["params"])
    lora = {p for p in flat if "lora" in p}
    adapted = {p.replace("_lora_a", "").replace("lora_a", "w") for p in lora if p.endswith(("lora_a", "_lora_a"))}
    out = {p: (v.astype(np.float32) if p in adapted else v) for p, v in flat.items() if p not in lora}
    del tree, flat
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(args.output.resolve(), {"params": sources.unflatten(out)})


def _as_numpy_restore(meta):
    import orbax.checkpoint as ocp

    if isinstance(meta, dict):
        return {k: _as_numpy_restore(v) for k, v in meta.items()}
    return ocp.RestoreArgs(restore_type=np.ndarray)


def check_bitwise(args: CheckBitwise) -> None:
    from openpi_merge_plugin.checkpoint import params_io
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.merge import engine
    from openpi_merge_plugin.pipeline import checkpoint_merge

    source = sources.OrbaxSource(args.step / "params")
    merged = sources.OrbaxSource(args.merged / "params")
    resolved = checkpoint_merge.resolve_lora(source.tree, checkpoint_merge.LoRASource())
    adapters = engine.plan(source.tree, resolved)
    adapted = {a.base_path: a for a in adapters}
    dropped = {p for a in adapters for p in (a.a_path, a.b_path)}
    assert set(merged.tree) == set(source.tree) - dropped, "merged structure differs"
    compared = 0
    for path in merged.tree:
        got = merged.read([path])[path]
        if path in adapted:
            a = adapted[path]
            sub = source.read([a.base_path, a.a_path, a.b_path])
            flat = engine.merge_params(sources.unflatten(sub), resolved).params
            with tempfile.TemporaryDirectory(dir=args.merged.parent) as tmp:
                params_io.save_params(pathlib.Path(tmp) / "params", sources.flatten(flat))
                want = sources.OrbaxSource(pathlib.Path(tmp) / "params").read([path])[path]
        else:
            want = source.read([path])[path]
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            raise SystemExit(f"{path}: streamed output differs from the in-memory path")
        compared += 1
    print(f"bitwise equal: {compared} leaves ({len(adapted)} merged)")


def floor_export(args: FloorExport) -> None:
    import os

    from openpi_merge_plugin.checkpoint import sources

    source = sources.OrbaxSource(args.step / "params")
    written = 0
    with open(args.output, "wb") as f:
        for path in source.tree:
            array = source.read([path])[path].astype(np.float32)
            written += f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array
        f.flush()
        os.fsync(f.fileno())
    print(f"{len(source.tree)} leaves, {written / 1e9:.1f} GB written")


def _warm(step: pathlib.Path) -> None:
    """Reads the step's files once, so that every row finds them in the page cache (as the first would not)."""
    for path in step.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e6
    if proc.returncode != 0:
        killed = "killed" if proc.returncode < 0 or "signal 9" in proc.stderr else f"exit {proc.returncode}"
        return wall, rss, f"failed ({killed}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
    return wall, rss, proc.stdout.strip()


def run(args: Run) -> None:
    me = [sys.executable, str(REPO / "scripts" / "benchmark_full_size.py")]
    merge_cli = [sys.executable, "-m", "openpi_merge_plugin.cli", "--no-progress"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if args.plain:
            rows += _plain_rows(me, tmp, args.plain_checkpoint)
        for depth in () if not args.lora else (9,) if args.half_only else (18,) if args.full_only else (9, 18):
            given = args.step if depth == 18 and args.step is not None else None
            step = given or tmp / f"depth{depth}" / "100"
            if given is None:
                start = time.perf_counter()
                nbytes = build_step(step, depth)
                print(f"built depth {depth}: {nbytes / 1e9:.2f} GB of params in {time.perf_counter() - start:.0f}s")
            else:
                import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

                nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in training_layout(depth).values())
                _warm(step)
            label = f"{depth}/18 layers, {nbytes / 1e9:.1f} GB params"
            if depth == 9 or not args.skip_full_naive:
                wall, rss, note = _timed([*me, "naive-copy", str(step), str(tmp / f"naive{depth}")])
                rows.append(("naive restore-convert-save copy", label, wall, rss, note))
                shutil.rmtree(tmp / f"naive{depth}", ignore_errors=True)
            if depth == 18 and args.export:
                rows += _export_rows(me, step, tmp, label)
            wall, rss, _ = _timed([*merge_cli, str(step), "--output", str(tmp / f"merged{depth}")])
            manifest = json.loads((tmp / f"merged{depth}" / "manifest.json").read_text())
            note = f"max rel err {manifest['max_rel_err']:.1e}; merge math {manifest['timings_s']['merge']:.0f}s"
            if depth == 9:
                _, _, check = _timed([*me, "check-bitwise", str(step), str(tmp / f"merged{depth}")])
                note += f"; {check}"
            rows.append(("openpi-merge-lora (streaming, fp32 out)", label, wall, rss, note))
            if given is None:
                shutil.rmtree(step.parent)
            shutil.rmtree(tmp / f"merged{depth}")
    import os

    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, CPU"
    )
    print("| run | checkpoint | wall (s) | peak RSS (GB) | notes |")
    print("|---|---|---|---|---|")
    for name, label, wall, rss, note in rows:
        print(f"| {name} | {label} | {wall:.0f} | {rss:.1f} | {note} |")
    naive = {r[1]: r[2] for r in rows if r[0].startswith("naive")}
    for name, label, wall, _, _ in rows:
        if name.startswith("openpi") and label in naive:
            print(f"streaming merge / naive copy at {label}: {wall / naive[label]:.2f}x")
    floor = {r[1]: r[2] for r in rows if r[0].startswith(FLOOR_ROW)}
    for name, label, wall, rss, _ in rows:
        if name.startswith("openpi-merge-lora export") and label in floor:
            print(f"{name} at {label}: {wall / floor[label]:.2f}x the I/O floor, {rss:.2f} GB peak RSS")


FLOOR_ROW = "I/O floor: read every leaf once, widen to float32, write one file"
EXPORT_ROW = "openpi-merge-lora export STEP --format pytorch (one pass)"


def _export_rows(me: list[str], step: pathlib.Path, tmp: pathlib.Path, label: str) -> list[tuple]:
    """The I/O floor and the export of the LoRA step, one after the other."""
    wall, rss, note = _timed([*me, "floor-export", str(step), str(tmp / "floor.bin")])
    (tmp / "floor.bin").unlink(missing_ok=True)
    rows = [(FLOOR_ROW, label, wall, rss, note)]
    out = tmp / "exported"
    cli = [sys.executable, "-m", "openpi_merge_plugin.cli", "export", str(step), "--output", str(out)]
    wall, rss, note = _timed([*cli, "--action-horizon", "50", "--no-progress"])
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        model = manifest["files"]["model.safetensors"]
        merge = manifest["verification"]["merge"]
        note = (
            f"{manifest['tensors']} tensors, {model['bytes'] / 1e9:.1f} GB, read back "
            f"({manifest['verification']['file']['reader']}); merge max rel err {merge['max_rel_err']:.1e}; "
            f"model.safetensors sha256 {model['sha256']}"
        )
    rows.append((EXPORT_ROW, label, wall, rss, f"{note}; {wall / rows[0][2]:.2f}x the floor"))
    shutil.rmtree(out, ignore_errors=True)
    return rows


PLAIN_ROW = "openpi-merge-lora export CHECKPOINT --format {fmt} (no config, float32)"


def _plain_rows(me: list[str], tmp: pathlib.Path, given: pathlib.Path | None) -> list[tuple]:
    """A non-LoRA pi0.5 checkpoint (released layout): the I/O floor, then its export to each format, one after
    the other, each output deleted before the next."""
    checkpoint = given or tmp / "pi05_base"
    if given is None:
        start = time.perf_counter()
        nbytes = build_plain(checkpoint)
        print(f"built pi0.5 (released layout): {nbytes / 1e9:.2f} GB of params in {time.perf_counter() - start:.0f}s")
    else:
        nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in released_layout().values())
    label = f"non-LoRA pi0.5, released layout, {nbytes / 1e9:.1f} GB float32 params"
    # Each row starts from the checkpoint read once into the page cache: the checkpoint and a file written from it
    # (13 GB each) do not both fit in 24 GB, so the row after another would otherwise read it from disk.
    _warm(checkpoint)
    wall, rss, note = _timed([*me, "floor-export", str(checkpoint), str(tmp / "floor.bin")])
    (tmp / "floor.bin").unlink(missing_ok=True)
    rows = [(FLOOR_ROW, label, wall, rss, note)]
    cli = [sys.executable, "-m", "openpi_merge_plugin.cli", "export", str(checkpoint), "--no-progress"]
    for fmt, flags in (("pytorch", []), ("lerobot", ["--norm-stats", str(NORM_STATS)])):
        out = tmp / f"plain_{fmt}"
        _warm(checkpoint)
        wall, rss, note = _timed([*cli, "--format", fmt, "--output", str(out), *flags])
        if (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text())
            model = manifest["files"]["model.safetensors"]
            note = (
                f"{manifest['tensors']} tensors, {model['bytes'] / 1e9:.1f} GB, read back; "
                f"model.safetensors sha256 {model['sha256']}"
            )
        rows.append((PLAIN_ROW.format(fmt=fmt), label, wall, rss, f"{note}; {wall / rows[0][2]:.2f}x the floor"))
        shutil.rmtree(out, ignore_errors=True)
    if given is None:
        shutil.rmtree(checkpoint)
    return rows


def main() -> None:
    """`python scripts/benchmark_full_size.py`: the subcommand `run`, or a child process's."""
    cmd = tyro.extras.subcommand_cli_from_dict(
        {"run": Run, "naive-copy": NaiveCopy, "check-bitwise": CheckBitwise, "floor-export": FloorExport}
    )
    {Run: run, NaiveCopy: naive_copy, CheckBitwise: check_bitwise, FloorExport: floor_export}[type(cmd)](cmd)
