"""What an export format is: one small interface, planned once from the params' structure, before any work.

A format is a `Format`: a name (`--format NAME`, and the output's name) and a `plan` that turns a `PlanInput` (the
structure of the params the export's one pass yields, what the model is beyond them, the options, the checkpoint's
assets) into a `FormatPlan`: each tensor of one safetensors file (name, dtype, shape, and the `Recipe` that makes it
from one source leaf or layer slice), the files beside it (bytes, or directories copied as they are), what the
manifest says of them, and a check of its own to run on the file once it is written. `plan` reads shapes and small
files; whatever it refuses, it refuses before the pass. The pipeline (`pipeline/export.py`) does the rest, the same
for every format: the merge on the way (or none), the streamed write, the read back and the manifest.

A format that writes LoRA adapters rather than merged weights (a PEFT adapter) sets `merged=False`: its plan then
gets the checkpoint's own leaves (adapters included) and the adapters paired with their base weights and configs,
and its recipes read the `lora_a` / `lora_b` leaves. A plan that must compare values before it decides (the PEFT
adapter's local BASE) reads them through `PlanInput.values`, the pass's own reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import logging
import pathlib
from typing import Any

from openpi_merge_plugin import options as _options
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats.tensors import Precision
from openpi_merge_plugin.formats.tensors import TensorSpec
from openpi_merge_plugin.lora.adapters import Adapter
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.lora.adapters import is_lora_path
from openpi_merge_plugin.lora.spec import ResolvedLoRA

logger = logging.getLogger("openpi_merge_plugin")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How to export. What the params cannot tell comes from --config (or the openpi config a merge records) when
    there is one, else from these options, else from openpi's defaults (named below)."""

    # Tensor dtype (default float32; lerobot-peft: a local --base's dtype). pytorch, as upstream's converter:
    # bfloat16 rounds every tensor; float32 keeps exact values for the parameters PI0Pytorch holds in float32 (all of
    # them when the model dtype is float32). lerobot, lerobot-peft: also the policy's config dtype; bfloat16 keeps
    # the vision tower, projector, norms and the action/state/time projections float32, as LeRobot does.
    precision: Precision | None = None
    # The model's action horizon (openpi's action_horizon; default: the openpi config's, else openpi's default,
    # 50 for pi0 and pi0.5, 32 for pi0-FAST).
    action_horizon: int | None = None
    # lerobot: the prompt's token length (openpi's max_token_len; default: the openpi config's, else openpi's
    # default, 48 pi0, 200 pi0.5, 250 pi0-FAST).
    max_token_len: int | None = None
    # pytorch: Pi0Config.dtype, which decides which params PI0Pytorch rounds to bfloat16 (default: the openpi
    # config's, else openpi's default, bfloat16).
    model_dtype: Precision | None = None
    # lerobot: the norm stats' asset_id (assets/<asset_id>/norm_stats.json); default: the openpi config's asset_id
    # where the checkpoint has it, else the only norm stats in the checkpoint's assets/.
    asset_id: str | None = None
    # lerobot: an openpi norm_stats.json to take instead of the checkpoint's (a base checkpoint has none).
    norm_stats: pathlib.Path | None = None
    # lerobot: name cameras as your LeRobot dataset does, one or more OPENPI_NAME=FEATURE, e.g.
    # --camera base_0_rgb=observation.images.top left_wrist_0_rgb=observation.images.wrist; openpi's cameras are
    # base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb, in model order, and default to observation.images.<name>.
    camera: tuple[str, ...] = ()
    # lerobot: actions executed per predicted chunk (LeRobot's n_action_steps); default: the whole chunk.
    n_action_steps: int | None = None
    # lerobot: the device in config.json and the processors. LeRobot's entry points replace it with the policy's
    # device, and the policy falls back to an available one; a direct make_pre_post_processors needs it present.
    device: str = "cuda"
    # lerobot-peft: the base policy the adapter loads on, its base_model_name_or_path: a LeRobot policy directory
    # (checked tensor by tensor against the step's frozen weights) or a hub id (owner/name).
    base: str | None = None
    # lerobot-peft: the hub revision of a hub --base.
    base_revision: str | None = None
    # Write a model whose dimensions differ from those the runtime hard-codes (PI0Pytorch: SigLIP, vocabulary,
    # projector; LeRobot also the gemma_2b / gemma_300m experts); it then loads only into a model built with them,
    # and the manifest lists them.
    allow_nonstandard_dims: bool = False

    def __post_init__(self) -> None:
        _options.validate(self, EXPORT_OPTION_CHECKS)
        self.cameras()  # each NAME=FEATURE well formed (the LeRobot format checks the names)

    def precision_or(self, default: Precision = "float32") -> Precision:
        """--precision, or the format's default where it was not given."""
        return self.precision if self.precision is not None else default

    def cameras(self) -> dict[str, str]:
        """--camera NAME=FEATURE pairs as a dict."""
        pairs = {}
        for item in self.camera:
            name, sep, feature = item.partition("=")
            if not sep or not name or not feature or name in pairs:
                raise ConfigError(f"--camera {item!r}: give each camera once, as OPENPI_NAME=FEATURE")
            pairs[name] = feature
        return pairs

    @property
    def model_options(self) -> dict[str, Any]:
        """The options that say what the model is (alternatives to an openpi config), as given."""
        return {f: getattr(self, f) for f in MODEL_OPTIONS if getattr(self, f) is not None}


# The options that say what the model is: an openpi config says all of them, so they are its alternatives.
MODEL_OPTIONS = ("action_horizon", "max_token_len", "model_dtype")
EXPORT_OPTION_CHECKS: dict[str, _options.Check] = {
    "precision": _options.optional(_options.one_of(Precision)),
    "action_horizon": _options.optional(_options.sequence_length),
    "max_token_len": _options.optional(_options.sequence_length),
    "model_dtype": _options.optional(_options.one_of(Precision)),
    "asset_id": _options.optional(_options.text),
    "norm_stats": _options.optional(_options.existing_file),
    "camera": _options.ANY,  # checked by `cameras`: NAME=FEATURE
    "n_action_steps": _options.optional(_options.positive_int),
    "device": _options.torch_device,
    "base": _options.optional(_options.text),
    "base_revision": _options.optional(_options.text),
    "allow_nonstandard_dims": _options.flag,
}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the model is beyond its params' structure, as its openpi model config says it (`pipeline/model_facts`)."""

    action_horizon: int
    max_token_len: int
    model_dtype: Precision  # Pi0Config.dtype
    variants: tuple[str, ...]  # each expert's gemma variant name, in expert order
    action_dim: int | None = None  # pi0-FAST's (its params have no action projection); None: told otherwise
    pi05: bool | None = None  # the config's; None: the params decide
    config_name: str | None = None  # the openpi TrainConfig they came from
    asset_id: str | None = None  # its data config's asset_id (where openpi's serving looks for the norm stats)
    norm_stats: pathlib.Path | None = None  # openpi's norm_stats.json of the model, if there is one
    norm_stats_missing: str = ""  # why there is none: the error of a format that needs them, naming the option
    norm_stats_note: str = ""  # how they were chosen, when the user should hear it: said once a format uses them
    origin: Mapping[str, str] = dataclasses.field(default_factory=dict)  # fact -> where it came from

    def require_norm_stats(self) -> pathlib.Path:
        if self.norm_stats is None:
            raise ConfigError(self.norm_stats_missing)
        if self.norm_stats_note:  # not before: a refusal of the model comes as one error line, with no warning first
            logger.warning("%s", self.norm_stats_note)
        return self.norm_stats


def shape_table(structure: Mapping[str, ShapeDtype]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each leaf's (shape, dtype name), as the layout builders take them."""
    return {p: (tuple(sd.shape), str(sd.dtype)) for p, sd in structure.items()}


def merged_shape_table(structure: Mapping[str, ShapeDtype], what: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`shape_table` of params a runtime loads as they are: refused while they hold LoRA leaves."""
    tree = shape_table(structure)
    if any(is_lora_path(p) for p in tree):
        raise CheckpointError(f"{what} still holds LoRA leaves: not a merged checkpoint")
    return tree


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """What a format plans from."""

    structure: Mapping[str, ShapeDtype]  # path -> shape, dtype of the leaves the pass yields
    facts: ModelFacts
    options: ExportOptions
    assets: pathlib.Path | None  # where the checkpoint's assets/ (openpi's norm stats) are (they may not exist)
    adapters: Sequence[Adapter] = ()  # a LoRA step's adapters; merged already in `structure` unless not `merged`
    lora: ResolvedLoRA | None = None  # their configs
    what: str = ""  # the source, for messages
    # The source's values laid out as the tensors of a plan-like object (`.tensors`), the pass's own reader without
    # a merge: (spec, rows or None, array) in the source's order. For a plan that must compare values before it
    # decides (lerobot-peft's local BASE); None where the caller offers none.
    values: Callable[[Any], Iterator[tuple[TensorSpec, slice | None, Any]]] | None = None


@dataclasses.dataclass(frozen=True)
class FormatPlan:
    """Everything a format writes, decided before the pass: one safetensors file and the files beside it."""

    tensors: tuple[TensorSpec, ...]  # the file's entries (any order: the writer puts each at its offset)
    metadata: Mapping[str, str] | None = None  # the file header's `__metadata__`
    files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)  # written beside it, as they are
    copies: Mapping[str, pathlib.Path] = dataclasses.field(default_factory=dict)  # directories copied as they are
    manifest: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the format's part of the manifest
    model_file: str = "model.safetensors"
    precision: Precision = "float32"  # what the format wrote (the manifest's `precision`)
    # Run on the output directory once the file and side files read back as written, with the source's reader: the
    # format's own check of what it wrote (a PEFT adapter's factors against openpi's LoRA einsums); returns the
    # manifest's `verification` entries, raises to stop the commit.
    check: Callable[[pathlib.Path, Any], Mapping[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Format:
    """One output format of `export`."""

    name: str  # --format NAME (the step slot of its kind: `output_guard.SLOT_KIND`)
    plan: Callable[[PlanInput], FormatPlan]
    merged: bool = True  # lays out merged weights (a LoRA step is merged on the way); False: the leaves as they are
    options: frozenset[str] = frozenset()  # the ExportOptions only this format reads (others refuse them)
    describe: Callable[[Mapping[str, Any]], list[str]] = lambda manifest: []  # lines the command prints after it
    # Directories the format reads besides the source, given the options (lerobot-peft's local --base), each with
    # what to call it: the output is never one of them, around one or inside one.
    reads: Callable[[ExportOptions], Sequence[tuple[pathlib.Path, str]]] = lambda options: ()
