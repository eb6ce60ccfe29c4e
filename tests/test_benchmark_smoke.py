"""scripts/benchmark.py on tiny sizes: it runs, writes its markdown, and every row is there.

Rows of the parts that need torch and peft (the `bench` extra) or openpi say `skipped: ...` where those are not
installed; every other row of the CPU column holds a figure (tiny sizes: the figures themselves mean nothing).
The benchmark itself is not part of the tests.
"""

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "scripts" / "benchmark.py"
# First cell of a row -> the section that fills it.
ROWS = {
    "merged weights": "merge",
    "floor, in memory: numpy `astype(float32)`": "merge",
    "floor, in memory: per layer slice": "merge",
    "engine, in memory: `merge_params`, fp32 out": "merge",
    "**engine / numpy floor, in memory**": "merge",
    "floor, on disk": "merge",
    "engine, on disk: `merge_checkpoint`": "merge",
    "**engine / floor, on disk**": "merge",
    "PEFT `merge_and_unload()`": "peft",
    "PEFT `merge_and_unload(safe_merge=True)`": "peft",
    "engine `merge_params`, bf16 out": "merge",
    "**engine (bf16 out) / PEFT": "merge+peft",
    "naive: the whole tree on the device": "merge",
    "**engine / naive**": "merge",
    "extra host memory per added layer": "merge",
    "one fp32 layer slice of the largest weight": "save",
    "streamed from memory (merge on save": "save",
    "**growth per added layer**": "save",
    "streamed from disk": "merge",
    "in memory (`merge_params`": "merge",
    "**LLM layers**: the model saved": "merge_on_save",
    "LLM layers: openpi's save without the merged item": "merge_on_save",
    "LLM layers: with the merged item, async": "merge_on_save",
    "LLM layers: with the merged item, `--merge-lora.mode blocking`": "merge_on_save",
    "**LLM layers: async / without, time the save blocks**": "merge_on_save",
    "LLM layers: async / without, save start to commit": "merge_on_save",
    "**whole tree**: the model saved": "merge_on_save",
    "whole tree: with the merged item, async (default), float32 output": "merge_on_save",
    "whole tree: the same, bfloat16 output": "merge_on_save",
    "**whole tree: async / without, time the save blocks**": "merge_on_save",
    "openpi `scripts/train.py debug_lora`": "train",
    "**async / no merge, the loop's wait per save**": "train",
    "prefix: LoRA model": "serving",
    "prefix: merged model": "serving",
    "**prefix: speedup": "serving",
    "suffix: LoRA model": "serving",
    "**suffix: speedup": "serving",
    "the engine's slice merge": "merge",
    "whole kernel, fp32 out, verify": "merge",
    "merge + statistics": "merge",
    "merge + verification": "merge",
    "the engine's time by weight": "merge",
    "1. merge <= 1.5x the floor, in memory": "merge",
    "2. no slower than PEFT": "merge+peft",
    "4. extra memory <= one layer slice": "save",
    "4. the same with the default 64 MiB write buffer": "save",
    "write buffer: none": "save",
    "write buffer: 64 MiB (default)": "save",
    "write buffer: 512 MiB": "save",
    "streamed from memory with no write buffer": "save",
    "**growth per added layer** (no write buffer)": "save",
}


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            first, *rest = (c.strip() for c in line.strip().strip("|").split(" | "))
            rows[first] = rest
    return rows


def test_benchmark_tiny_writes_every_row(tmp_path):
    out = tmp_path / "benchmark.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--no-accelerator", "--output", str(out)]
    cmd += ["--workdir", str(tmp_path), "--sections", "merge", "peft", "save", "merge_on_save", "serving", "train"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text == proc.stdout  # printed and written
    again = tmp_path / "again.md"  # the raw results next to it render to the same markdown
    cmd = [sys.executable, str(SCRIPT), "--from-json", str(out.with_suffix(".json")), "--output", str(again)]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert again.read_text() == text
    # A run without the save section (e.g. `--sections merge`) still renders: its rows say so.
    raw = json.loads(out.with_suffix(".json").read_text())
    for results in raw["results"].values():
        results.pop("save")
    partial_json, partial = tmp_path / "partial.json", tmp_path / "partial.md"
    partial_json.write_text(json.dumps(raw))
    cmd = [sys.executable, str(SCRIPT), "--from-json", str(partial_json), "--output", str(partial)]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert _rows(partial.read_text())["4. the same with the default write buffer (see section 4)"][0] == "not run"
    for heading in (
        "## 1.",
        "## 2.",
        "## 3.",
        "## 4.",
        "## 5.",
        "## 6.",
        "## Where the engine's time goes",
        "## Targets",
    ):
        assert heading in text
    assert "**Machine**" in text
    assert "**Load**" in text
    assert "| merge (cpu) |" in text  # the load while it ran
    rows = _rows(text)
    ran = {"merge": True, "save": True, "merge_on_save": True, "peft": _installed("torch", "peft")}
    ran["serving"] = _installed("openpi")
    ran["merge+peft"] = ran["peft"]
    ran["train"] = False  # not with --tiny
    for prefix, section in ROWS.items():
        found = [cells for first, cells in rows.items() if first.startswith(prefix)]
        assert found, f"no row {prefix!r}"
        cpu, accelerator = found[0]
        assert accelerator == "not run", (prefix, accelerator)
        if ran[section]:  # a figure: not skipped, and no error while rendering it ("- (KeyError: ...)")
            assert cpu != "-", prefix
            assert not cpu.startswith(("skipped", "not run", "- (")), (prefix, cpu)
        else:
            assert cpu.startswith(("skipped", "-")), (prefix, cpu)
