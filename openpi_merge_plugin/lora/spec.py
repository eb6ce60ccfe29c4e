"""LoRA hyper-parameters as openpi defines them (`openpi.models.lora.LoRAConfig`), per expert, and resolved for a
checkpoint (`ResolvedLoRA`), without importing openpi."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from openpi_merge_plugin import options as _options


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The fields of `openpi.models.lora.LoRAConfig` that the merge depends on."""

    rank: int
    alpha: float = 1.0
    rslora: bool = False
    axes: tuple[int, int] = (-2, -1)
    label: str = "L"

    def __post_init__(self) -> None:
        _options.validate(
            self,
            {
                "rank": _options.positive_int,
                "alpha": _options.positive,
                "rslora": _options.flag,
                "axes": _axes,
                "label": _options.text,
            },
        )

    @property
    def scaling_value(self) -> float:
        """Same formula as `LoRAConfig.scaling_value`."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "rslora": self.rslora,
            "axes": list(self.axes),
            "label": self.label,
            "scaling_value": self.scaling_value,
        }

    @classmethod
    def from_openpi(cls, config: Any) -> LoRASpec:
        """Converts a live `openpi.models.lora.LoRAConfig`."""
        return cls(
            rank=int(config.rank),
            alpha=float(config.alpha),
            rslora=bool(config.rslora),
            axes=tuple(int(a) for a in config.axes),  # type: ignore[arg-type]
            label=str(config.label),
        )


@dataclasses.dataclass(frozen=True)
class ExpertLoRA:
    """LoRA configs of one gemma expert, keyed as in `gemma.Config.lora_configs` ("attn", "ffn")."""

    variant: str
    attn: LoRASpec | None = None
    ffn: LoRASpec | None = None

    def get(self, kind: str) -> LoRASpec | None:
        return {"attn": self.attn, "ffn": self.ffn}[kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "attn": None if self.attn is None else self.attn.to_json(),
            "ffn": None if self.ffn is None else self.ffn.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class ResolvedLoRA:
    """LoRA configs per expert index, and where they came from (recorded in the manifest)."""

    experts: dict[int, ExpertLoRA]
    source: str
    config_name: str | None = None  # the openpi TrainConfig they were read from, if any

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "config_name": self.config_name,
            "experts": {str(i): e.to_json() for i, e in sorted(self.experts.items())},
        }


def _axes(value: Any) -> str | None:
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(a, int) and not isinstance(a, bool) for a in value)
    ):
        return None
    return f"must be two integer axes, got {value!r}"
