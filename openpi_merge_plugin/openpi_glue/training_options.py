"""Options of merge-on-save, as they appear on openpi's TrainConfig (`--merge-lora.*` on the command line).

Imported by openpi's own config module while it is being built, so this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from openpi_merge_plugin import options as _options


@dataclasses.dataclass(frozen=True)
class MergeOnSaveOptions:
    """How `merge_lora_on_save` merges; the defaults are what a serving checkpoint should get."""

    # Which saves also write <step>/merged: every save, or only the last step of training.
    when: Literal["every_save", "final"] = "every_save"
    # How a save waits for the merge. async: the save copies the params to host memory, as Orbax copies openpi's own
    # `params` item, and the merge and its write run in the background, in Orbax's commit of the step (host memory: a
    # copy of the params while it runs). blocking: the merge streams from the live params before the save returns,
    # so training waits for it (host memory: ~0.6 GiB).
    mode: Literal["async", "blocking"] = "async"
    # dtype of merged weights (float32 keeps the whole adapter contribution; preserve = the base's dtype).
    output_dtype: Literal["float32", "bfloat16", "preserve"] = "float32"
    # Multiplier on the LoRA term (1.0 reproduces training exactly).
    strength: float = 1.0
    # Check every merged layer against openpi's LoRA forward.
    verify: bool = True
    # Largest allowed relative error of the verification.
    tolerance: float = 1e-4
    # Merged data allowed to wait for TensorStore's writes, in MiB, so that writing overlaps merging. TensorStore
    # holds it with its zstd output, up to about twice this; 0 writes each piece before merging the next.
    host_buffer_mib: int = 64
    # Also write openpi's PyTorch checkpoint (model.safetensors, config.json) to <step>/merged_pytorch, on the same
    # saves as <step>/merged (pi0 and pi0.5).
    export_pytorch: bool = False
    # Also write LeRobot 0.6.1's policy directory (weights, config.json, pre/post-processors with the run's norm
    # stats) to <step>/merged_lerobot, on the same saves (pi0, pi0.5, pi0-FAST; gemma_2b / gemma_300m dims only).
    export_lerobot: bool = False
    # Also write the LoRA step's adapters as a LeRobot PEFT adapter on export_base to <step>/lerobot_peft, on the same
    # saves (pi0, pi0.5): a small file per save that LeRobot loads on one base policy.
    export_lerobot_peft: bool = False
    # The base policy of that adapter: a LeRobot policy directory of the run's base weights (compared with the
    # step's frozen weights at every save: it reads all of BASE) or a hub id. Needed by export_lerobot_peft.
    export_base: str | None = None
    # The hub revision of a hub export_base.
    export_base_revision: str | None = None
    # Tensor dtype of those exports (default float32; the PEFT adapter: a local export_base's dtype). PyTorch:
    # upstream's converter's rules; LeRobot: also the policy's config dtype.
    export_precision: Literal["float32", "bfloat16"] | None = None
    # A failed merge stops training (by default it is logged, recorded in <step>/merged/MERGE_FAILED.json,
    # and training goes on; the LoRA checkpoint is saved either way). In async mode the failure is known only after
    # the save returned: training stops at its next save (before it), or at the end of training.
    fatal: bool = False

    def __post_init__(self) -> None:
        # Checked when the TrainConfig is built, not at the first save; named as on openpi's command line.
        try:
            self._validate()
        except _options.OptionError as e:
            raise _options.OptionError(f"merge_lora.{e.option}", e.problem) from None
        if self.export_lerobot_peft and self.export_base is None:
            raise _options.OptionError(
                "merge_lora.export_base", "is needed by export_lerobot_peft: the base policy the adapter loads on"
            )

    def merge_options(self) -> _options.MergeOptions:
        """The merge options these stand for (the same fields, checked by the same rules)."""
        return _options.MergeOptions(
            output_dtype=self.output_dtype, strength=self.strength, verify=self.verify, tolerance=self.tolerance
        )

    def _validate(self) -> None:
        _options.validate(
            self,
            {
                "when": _options.choice(MergeOnSaveOptions, "when"),
                "mode": _options.choice(MergeOnSaveOptions, "mode"),
                "output_dtype": _options.choice(MergeOnSaveOptions, "output_dtype"),
                "strength": _options.MERGE_OPTION_CHECKS["strength"],
                "verify": _options.MERGE_OPTION_CHECKS["verify"],
                "tolerance": _options.MERGE_OPTION_CHECKS["tolerance"],
                "host_buffer_mib": _options.non_negative_int,
                "export_pytorch": _options.flag,
                "export_lerobot": _options.flag,
                "export_lerobot_peft": _options.flag,
                "export_base": _options.optional(_options.text),
                "export_base_revision": _options.optional(_options.text),
                "export_precision": _options.optional(_options.one_of(("float32", "bfloat16"))),
                "fatal": _options.flag,
            },
        )
