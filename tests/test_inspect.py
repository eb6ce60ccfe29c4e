"""`inspect`: the numbers of a LoRA step against an independent numpy computation, a merged checkpoint's manifest
and checksums, the table, the picture, and bad inputs."""

import json
import re
import shutil
import statistics
import struct
import sys

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
import ml_dtypes
import numpy as np
import pytest

from openpi_merge_plugin import cli
from openpi_merge_plugin import inspect_checkpoint
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora import configs as lora_configs
from openpi_merge_plugin.pipeline.checkpoint_merge import LoRASource

RTOL = 1e-5  # float32 kernel against a float64 reference
# The weight openpi's LoRA term amounts to, per layer, written out by hand for each adapted module of the fixture.
# attn_vec_einsum (BTNH,NHD->BTD) runs `BTNH,NHL->BTL` then `BTL,NLD->BTD`: lora_b is summed over heads.
DELTA_EINSUM = {
    "attn/q_einsum": "ndl,nlh->ndh",  # w [N, D, H]
    "attn/kv_einsum": "ckdl,cklh->ckdh",  # w [2, K, D, H]
    "attn/attn_vec_einsum": "nhl,mld->nhd",  # w [N, H, D]
    "mlp/gating_einsum": "gdl,glf->gdf",  # w [2, D, F]
    "mlp/linear": "fl,ld->fd",  # w [F, D]
}
# (expert, weight) as the table lists them; the action expert's modules carry the suffix _1.
NAMES = [
    *((0, name) for name in sorted(DELTA_EINSUM)),
    *((1, name.replace("/", "_1/", 1) if name.startswith("mlp") else f"{name}_1") for name in sorted(DELTA_EINSUM)),
]


def _lora_paths(name: str) -> tuple[str, str, str]:
    base = f"PaliGemma/llm/layers/{name}"
    if name.startswith("attn/"):
        return f"{base}/w", f"{base}/lora_a", f"{base}/lora_b"
    return base, f"{base}_lora_a", f"{base}_lora_b"


def _expected(params: dict[str, np.ndarray]) -> dict[str, dict]:
    """Rank, alpha, scale and per-layer numbers of every adapted weight, from the fixture arrays and its config."""
    experts = json.loads(FIXTURE_LORA_CONFIG.read_text())["experts"]
    out = {}
    for expert, name in NAMES:
        w_path, a_path, b_path = _lora_paths(name)
        kind = "attn" if name.startswith("attn/") else "ffn"
        cfg = experts[expert][kind]
        # openpi: lora.Einsum scales by alpha / rank; lora.FeedForward never scales.
        scale = cfg["alpha"] / cfg["rank"] if kind == "attn" else 1.0
        rel, keep = [], []
        for layer in range(params[w_path].shape[0]):
            w = params[w_path][layer].astype(np.float64)
            a, b = params[a_path][layer].astype(np.float64), params[b_path][layer].astype(np.float64)
            delta = scale * np.einsum(DELTA_EINSUM[re.sub(r"_1\b", "", name)], a, b)
            stored = (w + delta).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
            rel.append(np.linalg.norm(delta) / np.linalg.norm(w))
            keep.append(1 - np.linalg.norm(stored - w - delta) / np.linalg.norm(delta))
        assert params[a_path].shape[-1] == cfg["rank"]
        out[name] = {
            "expert": expert,
            "rank": cfg["rank"],
            "alpha": cfg["alpha"],
            "scale": scale,
            "rel": rel,
            "keep": keep,
        }
    return out


def _mmm(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


@pytest.fixture(scope="module")
def expected(fixture_params):
    return _expected(fixture_params)


@pytest.fixture(scope="module")
def lora_inspection():
    return inspect_checkpoint(FIXTURE_STEP, lora=LoRASource(lora_config=FIXTURE_LORA_CONFIG))


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    step = tmp_path_factory.mktemp("ckpt") / "2"
    shutil.copytree(FIXTURE_STEP, step)
    return merge_checkpoint(step, lora=lora_configs.from_file(FIXTURE_LORA_CONFIG)).output


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["inspect", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_lora_step_numbers_match_an_independent_computation(lora_inspection, expected):
    ins = lora_inspection
    assert (ins.kind, ins.step, ins.checksums) == ("lora", 2, None)
    assert [(w.expert, w.name) for w in ins.weights] == NAMES
    for w in ins.weights:
        want = expected[w.name]
        assert (w.expert, w.rank, w.alpha, w.rslora) == (want["expert"], want["rank"], want["alpha"], False)
        assert (w.scale, w.strength) == (want["scale"], 1.0), w.name
        np.testing.assert_allclose(w.delta_rel_norm, want["rel"], rtol=RTOL, err_msg=w.name)
        np.testing.assert_allclose(w.bf16_survival, want["keep"], rtol=RTOL, err_msg=w.name)
        got = w.to_json()
        for key, values in (("delta_rel_norm_stats", want["rel"]), ("bf16_survival_stats", want["keep"])):
            np.testing.assert_allclose([got[key][k] for k in ("min", "median", "max")], _mmm(values), rtol=RTOL)
    # The fixture's adapters are large enough for both numbers to matter: updates of 2-17%, of which 90-99% kept.
    rel = [x for w in ins.weights for x in w.delta_rel_norm]
    keep = [x for w in ins.weights for x in w.bf16_survival]
    assert 0.01 < min(rel) < max(rel) < 0.2
    assert 0.85 < min(keep) < max(keep) < 1.0


def test_json_output_has_the_same_numbers(capsys, lora_inspection, expected):
    code, out, _ = _main(capsys, FIXTURE_STEP, "--lora-config", FIXTURE_LORA_CONFIG, "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["kind"], data["step"]) == ("lora", 2)
    assert data["lora_config"]["source"] == f"file {FIXTURE_LORA_CONFIG}"
    assert data["weights"] == [w.to_json() for w in lora_inspection.weights]
    q = next(w for w in data["weights"] if w["path"] == "PaliGemma/llm/layers/attn/q_einsum/w")
    assert (q["rank"], q["alpha"], q["rslora"], q["scale"], q["layers"]) == (4, 8.0, False, 2.0, 3)
    np.testing.assert_allclose(q["delta_rel_norm"], expected["attn/q_einsum"]["rel"], rtol=RTOL)


def test_reads_one_weight_at_a_time_with_progress(monkeypatch):
    reads, sliced, done = [], [], []
    real_read, real_sliced = sources.OrbaxSource.read, sources.OrbaxSource.sliced

    def spy_read(self, paths):
        paths = list(paths)
        reads.append(paths)
        return real_read(self, paths)

    def spy_sliced(self, path):
        out = real_sliced(self, path)
        sliced.append((path, type(out)))
        return out

    monkeypatch.setattr(sources.OrbaxSource, "read", spy_read)
    monkeypatch.setattr(sources.OrbaxSource, "sliced", spy_sliced)
    ins = inspect_checkpoint(
        FIXTURE_STEP, lora=LoRASource(lora_config=FIXTURE_LORA_CONFIG), progress=lambda path, n: done.append(n)
    )
    weights = sorted(w.path for w in ins.weights)
    # Each base weight is opened once and read a layer slice at a time; only its two adapters are read whole.
    assert sorted(sliced) == [(p, sources.SlicedArray) for p in weights]
    lora_leaves = [p for p in sources.OrbaxSource(FIXTURE_STEP / "params").tree if "lora" in p]
    assert len(reads) == len(weights)
    assert all(len(r) == 2 for r in reads)
    assert sorted(p for r in reads for p in r) == sorted(lora_leaves)
    assert sum(done) == 30  # 10 weights x 3 layers


def test_merged_dir_reports_its_manifest_and_checksums(merged_dir, lora_inspection):
    manifest = json.loads((merged_dir / "manifest.json").read_text())
    ins = inspect_checkpoint(merged_dir)
    assert (ins.kind, ins.step, ins.serving.name) == ("merged", 2, None)
    assert ins.serving.reason == manifest["serving_config_reason"]
    assert ins.checksums.ok
    assert ins.checksums.files == len(manifest["files"])
    assert ins.lora_config == manifest["lora_config"]
    assert ins.manifest["options"] == manifest["options"]
    by_path = {w["path"]: w for w in manifest["weights"]}
    assert sorted(by_path) == sorted(w.path for w in ins.weights)
    for w in ins.weights:
        m = by_path[w.path]
        assert (w.rank, w.alpha, w.rslora, w.scale) == (m["rank"], m["alpha"], m["rslora"], m["scale"])
        assert list(w.delta_rel_norm) == m["delta_rel_norm"]
        assert list(w.bf16_survival) == m["bf16_survival"]
    # Same kernel before and after the merge.
    for before, after in zip(lora_inspection.weights, ins.weights, strict=True):
        np.testing.assert_allclose(after.delta_rel_norm, before.delta_rel_norm, rtol=1e-6)


def test_merged_dir_with_a_corrupt_file(merged_dir, tmp_path, capsys):
    copy = tmp_path / "merged"
    shutil.copytree(merged_dir, copy)
    victim = max((p for p in (copy / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (copy / "notes.txt").write_text("extra")
    rel = victim.relative_to(copy).as_posix()

    status = inspect_checkpoint(copy).checksums
    assert not status.ok
    assert (status.mismatched, status.missing, status.extra) == ((rel,), (), ("notes.txt",))

    code, out, _ = _main(capsys, copy)
    assert code == 1
    assert f"checksums: FAILED: 1 mismatched ({rel}); 1 extra (notes.txt)" in out
    code, out, _ = _main(capsys, copy, "--json")
    assert code == 1
    assert json.loads(out)["checksums"]["mismatched"] == [rel]


def test_table_shows_names_and_numbers(capsys, expected, merged_dir):
    code, out, _ = _main(capsys, FIXTURE_STEP, "--lora-config", FIXTURE_LORA_CONFIG)
    assert code == 0
    assert f"LoRA checkpoint {FIXTURE_STEP} (step 2)" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert sorted(rows) == sorted(name for _, name in NAMES)
    for name, want in expected.items():
        cells = [c.strip() for c in rows[name].split("│")[1:-1]]
        kind = "attn" if name.startswith("attn/") else "ffn"
        assert cells[1:8] == [
            str(want["expert"]),
            kind,
            str(want["rank"]),
            f"{want['alpha']:g}",
            "no",
            f"{want['scale']:g}",
            "3",
        ]
        assert cells[8:11] == [f"{x:.3e}" for x in _mmm(want["rel"])], name
        assert cells[11:14] == [f"{100 * x:.2f}%" for x in _mmm(want["keep"])], name

    code, out, _ = _main(capsys, merged_dir)
    assert code == 0
    assert f"merged checkpoint {merged_dir} (step 2)" in out
    assert "no serving config: the LoRA config came from" in out
    assert "checksums: ok (" in out
    assert "attn/attn_vec_einsum_1" in out


def test_plot_writes_a_png_of_the_fixed_size(capsys, tmp_path):
    png = tmp_path / "inspect.png"
    code, _, err = _main(capsys, FIXTURE_STEP, "--lora-config", FIXTURE_LORA_CONFIG, "--plot", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1400, 900)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (900, 1400)


def test_neither_a_lora_step_nor_a_merged_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _main(capsys, tmp_path / "empty")
    assert code == 1
    assert f"error: {tmp_path / 'empty'} is neither an openpi LoRA checkpoint step (no params/) nor a merged" in err
    code, _, err = _main(capsys, tmp_path / "nope")
    assert code == 1
    assert f"error: checkpoint {tmp_path / 'nope'} does not exist" in err


def test_plot_into_a_missing_directory_fails_before_any_work(tmp_path, capsys):
    png = tmp_path / "no" / "such" / "dir" / "out.png"
    code, out, err = _main(capsys, FIXTURE_STEP, "--lora-config", FIXTURE_LORA_CONFIG, "--plot", png)
    assert code == 1
    assert f"error: cannot write plot {png}: parent directory {png.parent} does not exist" in err
    assert out == ""


def test_plot_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = _main(capsys, FIXTURE_STEP, "--lora-config", FIXTURE_LORA_CONFIG, "--plot", tmp_path / "x.png")
    assert code == 1
    assert "pip install 'openpi-merge-plugin[plot]'" in err
