"""The PyTorch export layout and the streaming safetensors writer, against fixtures made by upstream openpi 15a9616.

Fixtures (tests/data/pytorch, see PROVENANCE.md): PI0Pytorch state-dict listings, JAX param shapes, and the
header, config.json and per-tensor sha256 of upstream's converter run on checkpoints whose values `gen` makes.
"""

import base64
import collections
import functools
import gzip
import hashlib
import importlib.util
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
import safetensors.numpy

from openpi_merge_plugin.checkpoint import safetensors_stream as ss
from openpi_merge_plugin.formats import pytorch
from openpi_merge_plugin.formats import tensors as pl

DATA = pathlib.Path(__file__).parent / "data" / "pytorch"
VISION_LAYERS = (0, 26)  # SigLIP layers whose values are checked (each is ~15M values)
RUNS = ["pi0_float32", "pi0_bfloat16", "pi05_float32", "pi05_bfloat16", "pi0_float32_dtype-float32"]


@functools.cache
def _fixture(name: str):
    with gzip.open(DATA / name) as f:
        return json.load(f)


@functools.cache
def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dims(variant: str) -> pl.GemmaDims:
    return pl.GemmaDims(**_fixture("jax_shapes.json.gz")["dims"][variant])


def _tree(raw: dict) -> dict:
    return {p: (tuple(s), d) for p, (s, d) in raw.items()}


def _layout(tree, case: str, precision: str, model_dtype: str = "bfloat16", **kw) -> pytorch.Layout:
    cfg = _fixture("jax_shapes.json.gz")["configs"][case]
    kw.setdefault("allow_nonstandard_dims", cfg["paligemma_variant"] == "dummy")
    return pytorch.build_layout(
        _tree(tree),
        paligemma=_dims(cfg["paligemma_variant"]),
        action_expert=_dims(cfg["action_expert_variant"]),
        action_dim=cfg["action_dim"],
        precision=precision,
        model_dtype=model_dtype,
        pi05=cfg["pi05"],
        **kw,
    )


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("size", ["dummy", "full"])
@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_layout_matches_pi0pytorch_state_dict(kind, size, model_dtype):
    listing = _fixture("state_dicts.json.gz")[
        f"{kind}_{'dummy-projector-patch' if size == 'dummy' else 'full'}_{model_dtype}"
    ]
    want = {n: (s, d) for n, s, d in listing["state_dict"]}
    for precision in ("float32", "bfloat16"):
        layout = _layout(
            _fixture("jax_shapes.json.gz")["trees"][f"{kind}_{size}"], f"{kind}_{size}", precision, model_dtype
        )
        got = {t.name: (list(t.shape), t.param_dtype) for t in layout}
        got |= {a: got[t.name] for t in layout for a in t.aliases}
        assert got == want
        assert layout.state_dict_names() == sorted(want)
        names = [t.name for t in layout]
        assert names == sorted(names)
        assert {t.dtype for t in layout} == {"F32" if precision == "float32" else "BF16"}
        # save_model keeps the smallest name of each tied group and records the others in the metadata.
        assert listing["tied"] == [[pl.LM_HEAD, pl.EMBED_TOKENS]]
        assert layout.metadata == {g[1]: g[0] for g in listing["tied"]}
        assert pl.EMBED_TOKENS not in names
        assert len(layout) == len(want) - 1


@pytest.mark.parametrize("case", ["pi0_dummy", "pi05_dummy", "pi0_full", "pi05_full"])
def test_layout_table_spells_each_jax_path_once(case):
    """The table is the JAX tree (each path once, with its shape), and its tensors are the layout's, name for name."""
    tree, cfg = _tree(_fixture("jax_shapes.json.gz")["trees"][case]), _fixture("jax_shapes.json.gz")["configs"][case]
    pg = _dims(cfg["paligemma_variant"])
    table = pl.layout_table(
        pg, _dims(cfg["action_expert_variant"]), cfg["action_dim"], pi05=cfg["pi05"], dims=pl.model_dims(tree, pg)
    )
    paths = [leaf.path for leaf in table if leaf.path is not None]
    assert len(paths) == len(set(paths)) == len(tree)
    assert {leaf.path: leaf.shape for leaf in table if leaf.path is not None} == {p: s for p, (s, _) in tree.items()}
    rows = list(pl.pytorch_tensors(table))
    names = [name for name, *_ in rows]
    assert len(names) == len(set(names))
    assert sorted(names) == [t.name for t in _layout(tree, case, "bfloat16")]


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_projector_width_refused_unless_patched(kind):
    """PI0Pytorch hard-codes the projector to 2048 rows, so a "dummy" paligemma (width 64) cannot be loaded."""
    sd = _fixture("state_dicts.json.gz")
    plain, patched = (
        sd[f"{kind}_dummy_bfloat16"]["state_dict"],
        sd[f"{kind}_dummy-projector-patch_bfloat16"]["state_dict"],
    )
    diff = [(a[0], a[1], b[1]) for a, b in zip(plain, patched, strict=True) if a != b]
    proj = pl.PG + "model.multi_modal_projector.linear."
    assert diff == [(proj + "weight", [2048, 1152], [64, 1152]), (proj + "bias", [2048], [64])]
    tree = _fixture("jax_shapes.json.gz")["trees"][f"{kind}_dummy"]
    with pytest.raises(
        pl.LayoutError, match=r"hard-codes dimensions this model does not have: projection_dim 64 \(PI0Pytorch: 2048\);"
    ):
        _layout(tree, f"{kind}_dummy", "bfloat16", allow_nonstandard_dims=False)


@pytest.mark.parametrize("run", RUNS)
def test_header_and_config_equal_upstream(run):
    conv = _fixture("converted.json.gz")
    r = conv["runs"][run]
    layout = _layout(conv["trees"][r["kind"]], f"{r['kind']}_dummy", r["precision"], r["model_dtype"])
    header = base64.b64decode(r["header"])
    assert ss.header_bytes(layout.tensors, layout.metadata) == header
    assert ss.file_size(layout.tensors, layout.metadata) == r["file_size"]
    assert set(r["tensors"]) == {t.name for t in layout} - {pl.EXPERT_LM_HEAD}
    cfg = _fixture("jax_shapes.json.gz")["configs"][f"{r['kind']}_dummy"]
    text = pytorch.config_json(
        action_dim=cfg["action_dim"],
        action_horizon=cfg["action_horizon"],
        paligemma_variant=cfg["paligemma_variant"],
        action_expert_variant=cfg["action_expert_variant"],
        precision=r["precision"],
    )
    assert text == r["config_json"]


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_apply_equals_upstream_converter(kind):
    """`apply` on the checkpoint's values gives upstream's converted tensors bit for bit (sha256), all precisions."""
    conv, gen = _fixture("converted.json.gz"), _make_fixtures().gen
    tree = conv["trees"][kind]
    runs = [r for r in conv["runs"].values() if r["kind"] == kind]
    layouts = [(r, _layout(tree, f"{kind}_dummy", r["precision"], r["model_dtype"])) for r in runs]
    groups = collections.defaultdict(list)
    for r, layout in layouts:
        for t in layout:
            if t.recipe.source is not None:
                groups[t.recipe.source, t.recipe.layer].append((r, t))
    checked, bad = 0, []
    for (src, layer), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if "/encoderblock/" in src and layer not in VISION_LAYERS:
            continue
        shape, dtype = tree[src]
        if layer is not None and "/llm/layers/" in src:  # small: the whole stack, which apply indexes
            x = np.stack([gen(src, i, shape[1:]) for i in range(shape[0])])
        else:
            x = gen(src, layer, shape[1:] if layer is not None else shape)
        if dtype == "bfloat16":
            x = x.astype(ml_dtypes.bfloat16)
        part = x[layer] if x.ndim == len(shape) and layer is not None else x
        assert _sha(part.astype(np.float32)) == conv["sources"][kind][f"{src}#{layer}"], (src, layer)
        for r, t in items:
            y = pl.apply(t.recipe, x)
            assert y.shape == t.shape
            assert y.dtype == ss.DTYPES[t.dtype]
            checked += 1
            if _sha(y) != r["tensors"][t.name]:
                bad.append((r["precision"], r["model_dtype"], t.name))
    assert bad == []
    n_vision = 16 * (27 - len(VISION_LAYERS))
    assert checked == sum(len(r["tensors"]) - n_vision for r in runs)


def _special_values(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random values of `dtype` with NaNs (payloads and signs), infinities, signed zeros, subnormals (of float32
    and of bfloat16) and values halfway between two bfloat16s."""
    if dtype == "bfloat16":  # every bit pattern is a value: NaN payloads included
        return rng.integers(0, 1 << 16, shape, dtype=np.uint16).view(ml_dtypes.bfloat16)
    bits = rng.integers(0, 1 << 32, shape, dtype=np.uint32)
    special = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF, 0x7F800000, 0xFF800000, 0, 0x80000000,
                        0x00000001, 0x807FFFFF, 0x00010000, 0x3F808000, 0x3F818000, 0xBF808000], np.uint32)  # fmt: skip
    picks = rng.random(shape) < 0.3
    bits[picks] = rng.choice(special, int(picks.sum()))
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return x if dtype == "float32" else x.astype(dtype)


def _apply_reference(recipe: pl.Recipe, x: np.ndarray) -> np.ndarray:
    """The values `apply` must give, spelled out: f32(source), the ops, bfloat16 rounding (none for a bfloat16
    source: bf16 -> f32 -> bf16 is exact, NaN payloads kept), the output dtype."""
    a = x[recipe.layer] if recipe.layer is not None and x.shape == recipe.source_shape else x
    a = (a[recipe.split] if recipe.split is not None else a).astype(np.float32)
    for op, arg in recipe.ops:
        a = a.transpose(arg) if op == "transpose" else a.reshape(arg)
    if recipe.round_bf16 and x.dtype != ml_dtypes.bfloat16:
        a = a.astype(ml_dtypes.bfloat16)
    return np.ascontiguousarray(a.astype(ml_dtypes.bfloat16 if recipe.dtype == "bfloat16" else np.float32))


@pytest.mark.parametrize(("kind", "tile"), [("pi0", 16), ("pi05", pl.TILE)])
def test_apply_is_bitwise_the_plain_casts_on_every_recipe_and_special_value(kind, tile, monkeypatch):
    """Every recipe (transposes, reshapes, splits, rounding; float32 and bfloat16 output) on sources of every
    dtype, NaNs, infinities, -0 and subnormals included: `apply` gives exactly the bytes of the plain cast-then-lay-out
    sequence, whether or not its transposes are copied in tiles (a small TILE tiles these small shapes)."""
    monkeypatch.setattr(pl, "TILE", tile)
    tree = _fixture("jax_shapes.json.gz")["trees"][f"{kind}_dummy"]
    rng = np.random.default_rng(24)
    checked = set()
    for precision, model_dtype in (("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32")):
        for t in _layout(tree, f"{kind}_dummy", precision, model_dtype):
            r = t.recipe
            if r.source is None or r.layer not in (None, 0):  # every layer has layer 0's recipe
                continue
            for dtype in pl.SOURCE_DTYPES:
                x = _special_values(r.source_shape[r.layer is not None :], dtype, rng)
                with np.errstate(invalid="ignore", over="ignore"):
                    want = _apply_reference(r, x)
                    got = pl.apply(r, x)
                assert got.flags.c_contiguous, t.name
                assert (got.dtype, got.shape) == (want.dtype, want.shape) == (ss.DTYPES[t.dtype], t.shape), t.name
                assert got.tobytes() == want.tobytes(), (t.name, dtype, precision, model_dtype)
                checked.add((r.ops, r.split is not None, r.round_bf16, r.dtype, dtype))
    assert len({ops for ops, *_ in checked}) >= 6  # every kind of op sequence of the table
    assert {(rnd, out) for _, _, rnd, out, _ in checked} == {(True, "float32"), (False, "float32"), (True, "bfloat16")}


def test_precision_rules():
    tree = _fixture("jax_shapes.json.gz")["trees"]["pi0_dummy"]

    def rounded(precision, model_dtype):
        layout = _layout(tree, "pi0_dummy", precision, model_dtype)
        return sum(t.recipe.round_bf16 for t in layout if t.recipe.source is not None)

    assert rounded("float32", "bfloat16") == 493  # of 524 JAX-sourced tensors (NOTES §4)
    assert rounded("float32", "float32") == 0
    assert rounded("bfloat16", "float32") == rounded("bfloat16", "bfloat16") == 524
    recipe = _layout(tree, "pi0_dummy", "float32").by_name()["state_proj.weight"].recipe
    assert np.all(pl.apply(recipe, np.full((32, 64), 1 + 2**-9, np.float32)) == np.float32(1 + 2**-9))  # exact
    q = _layout(tree, "pi0_dummy", "float32").by_name()[pl.LM + "layers.0.self_attn.q_proj.weight"].recipe
    y = pl.apply(q, np.full(q.source_shape, 1 + 2**-9, np.float32))
    assert y.dtype == np.float32
    assert np.all(y == 1)  # bf16-rounded on load (tie to even), stored as float32


def test_mismatched_dims_are_clear_errors():
    trees, cfg = _fixture("jax_shapes.json.gz")["trees"], "pi0_dummy"
    tree = trees["pi0_dummy"]
    full, ae = _tree(trees["pi0_full"]), _dims("gemma_300m")
    with pytest.raises(pl.LayoutError, match=r"q_einsum/w: shape \(18, 8, 2048, 256\), expected \(18, 8, 1024, 256\)"):
        pytorch.build_layout(
            full, paligemma=_dims("gemma_300m"), action_expert=ae, action_dim=32, allow_nonstandard_dims=True
        )
    assert len(pytorch.build_layout(full, paligemma=_dims("gemma_2b"), action_expert=ae, action_dim=32)) == 777
    with pytest.raises(pl.LayoutError, match=r"equal depth"):
        pytorch.build_layout(
            _tree(trees["pi0_full"]), paligemma=_dims("gemma_2b"), action_expert=_dims("dummy"), action_dim=32
        )
    with pytest.raises(pl.LayoutError, match=r"action_in_proj/kernel: shape \(32, 64\), expected \(14, 64\)"):
        pytorch.build_layout(
            _tree(tree),
            paligemma=_dims("dummy"),
            action_expert=_dims("dummy"),
            action_dim=14,
            allow_nonstandard_dims=True,
        )
    with pytest.raises(pl.LayoutError, match="config says pi05=True, but the params are those of pi0"):
        pytorch.build_layout(
            _tree(tree), paligemma=_dims("dummy"), action_expert=_dims("dummy"), action_dim=32, pi05=True
        )
    lora = {**tree, "PaliGemma/llm/layers/attn/q_einsum/lora_a": [[4, 8, 64, 16], "float32"]}
    with pytest.raises(pl.LayoutError, match="unmerged LoRA"):
        _layout(lora, cfg, "bfloat16")
    missing = {k: v for k, v in tree.items() if k != "state_proj/bias"}
    with pytest.raises(pl.LayoutError, match=r"missing params: \['state_proj/bias'\]"):
        _layout(missing, cfg, "bfloat16")
    with pytest.raises(pl.LayoutError, match="dtype int8"):
        _layout({**tree, "state_proj/bias": [[64], "int8"]}, cfg, "bfloat16")
    with pytest.raises(pl.LayoutError, match="precision"):
        _layout(tree, cfg, "float16")
    assert pl.detect_pi05(_tree(trees["pi05_dummy"]))
    assert not pl.detect_pi05(_tree(tree))
    recipe = _layout(tree, cfg, "bfloat16").by_name()[pl.LM + "layers.1.mlp.up_proj.weight"].recipe
    assert pl.apply(recipe, np.zeros((4, 2, 64, 128), np.float32)).shape == (128, 64)
    assert pl.apply(recipe, np.zeros((2, 64, 128), np.float32)).shape == (128, 64)
    with pytest.raises(pl.LayoutError, match=r"layer 1 of .*gating_einsum: got shape"):
        pl.apply(recipe, np.zeros((2, 64, 64), np.float32))


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    return {
        "layers.2.w": rng.standard_normal((3, 5), np.float32),
        "layers.10.w": rng.standard_normal((7,), np.float32).astype(bf),
        "layers.10.b": rng.standard_normal((2, 3, 4), np.float32),
        "a.scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), bf),
        "z.bf16": np.array([0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38], np.float32).astype(bf),
        "é.unicode": np.ones((1,), np.float32),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"tied.embed": "tied.lm_head"}])
def test_writer_byte_identical_to_safetensors(tmp_path, metadata):
    tensors = _sample_tensors()
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    heads = [ss.TensorHeader(n, "F32" if a.dtype == np.float32 else "BF16", a.shape) for n, a in tensors.items()]
    ss.write(tmp_path / "ours.safetensors", heads, lambda t: tensors[t.name], metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert ours.startswith(ss.header_bytes(heads, metadata))
    assert len(ours) == ss.file_size(heads, metadata)
    with safe_open(tmp_path / "ours.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata() == metadata
        for n, a in tensors.items():
            b = f.get_tensor(n)
            assert b.dtype == a.dtype
            assert b.shape == a.shape
            assert b.tobytes() == a.tobytes()
    loaded = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    assert {n: a.tobytes() for n, a in loaded.items()} == {n: a.tobytes() for n, a in tensors.items()}


def test_writer_streams_in_order_and_zeros(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "CHUNK_BYTES", 24)
    tensors = _sample_tensors()
    tensors["zeros"] = np.zeros((5, 7), ml_dtypes.bfloat16)
    heads = [ss.TensorHeader(n, "F32" if a.dtype == np.float32 else "BF16", a.shape) for n, a in tensors.items()]
    asked = []

    def produce(t):
        asked.append(t.name)
        return None if t.name == "zeros" else tensors[t.name]

    ss.write(tmp_path / "s.safetensors", heads, produce)
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # F32 first, then BF16, each by name (so "layers.10" before "layers.2").
    assert asked == ["a.scalar", "layers.10.b", "layers.2.w", "é.unicode", "empty", "layers.10.w", "z.bf16", "zeros"]


def test_writer_rejects_and_cleans_up(tmp_path):
    heads = [ss.TensorHeader("a", "F32", (2,)), ss.TensorHeader("b", "BF16", (3,))]
    path = tmp_path / "x.safetensors"
    for name, array, match in [
        ("b", np.zeros(3, ml_dtypes.bfloat16), "got 'b', expected 'a'"),
        ("a", np.zeros(2, ml_dtypes.bfloat16), "declared F32"),
        ("a", np.zeros(3, np.float32), "declared F32"),
    ]:
        with pytest.raises(ss.SafetensorsWriteError, match=match), ss.StreamWriter(path, heads) as w:
            w.write(name, array)
        assert not path.exists()
    with pytest.raises(ss.SafetensorsWriteError, match="closed before b"), ss.StreamWriter(path, heads) as w:
        w.write("a", np.zeros(2, np.float32))
    assert not path.exists()
    with pytest.raises(ss.SafetensorsWriteError, match="not supported"):
        ss.header_bytes([ss.TensorHeader("a", "F16", (1,))])


def test_positional_writer_any_order_and_row_blocks_gives_safetensors_bytes_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "CHUNK_BYTES", 24)
    tensors = _sample_tensors()
    tensors["zeros"] = np.zeros((5, 7), ml_dtypes.bfloat16)
    heads = [ss.TensorHeader(n, "F32" if a.dtype == np.float32 else "BF16", a.shape) for n, a in tensors.items()]
    path = tmp_path / "p.safetensors"
    with ss.PositionalWriter(path, heads, {"tied.embed": "tied.lm_head"}) as w:
        for name in sorted(tensors, reverse=True):  # not the file's order
            a = tensors[name]
            if name == "zeros":
                w.write_zeros(name)
            elif name == "layers.10.b":  # in row blocks
                w.write(name, a[:1], slice(0, 1))
                w.write(name, a[1:], slice(1, 2))
            else:
                w.write(name, a)
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata={"tied.embed": "tied.lm_head"})
    data = path.read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes()
    assert w.digests == {n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in tensors.items()}
    checked = ss.read_back(path, w.digests, w.header, block_bytes=8)
    assert (checked.tensors_checked, checked.bytes) == (len(tensors), len(data))
    assert checked.file_sha256 == hashlib.sha256(data).hexdigest()


def test_positional_writer_refuses_gaps_and_read_back_finds_a_changed_byte(tmp_path):
    heads = [ss.TensorHeader("a", "F32", (4, 2)), ss.TensorHeader("b", "BF16", (3,))]
    path = tmp_path / "x.safetensors"
    with pytest.raises(ss.SafetensorsWriteError, match="bytes from 8 given, expected from 0"):  # noqa: SIM117
        with ss.PositionalWriter(path, heads) as w:
            w.write("a", np.ones((1, 2), np.float32), slice(1, 2))
    assert not path.exists()
    with pytest.raises(ss.SafetensorsWriteError, match="closed before a"):  # noqa: PT012, SIM117
        with ss.PositionalWriter(path, heads) as w:
            w.write("b", np.zeros(3, ml_dtypes.bfloat16))
            w.write("a", np.ones((2, 2), np.float32), slice(0, 2))
    assert not path.exists()
    with ss.PositionalWriter(path, heads) as w:
        w.write("b", np.zeros(3, ml_dtypes.bfloat16))
        w.write("a", np.arange(8, dtype=np.float32).reshape(4, 2))
    ss.read_back(path, w.digests, w.header)
    data = bytearray(path.read_bytes())
    data[len(w.header) + 5] ^= 1  # one bit of tensor a
    path.write_bytes(bytes(data))
    with pytest.raises(ss.SafetensorsWriteError, match="tensor a does not read back as written"):
        ss.read_back(path, w.digests, w.header)


def test_read_back_cross_checks_safe_open_against_the_bytes_at_the_offsets(tmp_path, monkeypatch):
    """Bytes read at the header's offsets that hash as the digests say, but are not what `safe_open` reads for the
    tensor (here: the reads see a changed last row), fail the read-back."""
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "x.safetensors"
    with ss.PositionalWriter(path, [ss.TensorHeader("a", "F32", a.shape)]) as w:
        w.write("a", a)
    assert ss.read_back(path, w.digests, w.header).tensors_checked == 1
    changed = a.copy()
    changed[-1, -1] = -1
    read = ss.read_into

    def misread(fd, buffer, offset):  # as if the offsets pointed elsewhere: other bytes, hashed as such
        read(fd, buffer, offset)
        if offset == len(w.header):
            buffer[:] = memoryview(changed.tobytes())

    monkeypatch.setattr(ss, "read_into", misread)
    digests = {"a": hashlib.sha256(changed.tobytes()).hexdigest()}
    with pytest.raises(ss.SafetensorsWriteError, match="a is not at its offsets as safe_open reads it"):
        ss.read_back(path, digests, w.header)
