"""What a merge did, per adapted weight: config used, delta sizes, bf16 survival, verification error, time."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class AdaptedWeight:
    """One adapted weight: its adapter, the LoRA config that trained it, and the multiplier a merge applies.

    The one record of it; what a merge (`WeightReport`) or an inspection (`WeightStats`) measures extends it.
    """

    path: str
    module: str
    expert: int
    kind: str  # "attn" or "ffn"
    rank: int
    alpha: float
    rslora: bool
    scale: float  # what openpi multiplies the LoRA term by (attn: alpha/rank or alpha/sqrt(rank); ffn: 1)
    strength: float  # extra multiplier a merge applied (1.0 reproduces training)

    @classmethod
    def of(cls, adapter: Any, strength: float = 1.0, **measured: Any) -> Any:
        """This record (or a subclass's, with its `measured` fields) of an `adapters.Adapter`."""
        return cls(
            path=adapter.base_path,
            module=adapter.module,
            expert=adapter.expert,
            kind=adapter.kind,
            rank=adapter.rank,
            alpha=adapter.spec.alpha,
            rslora=adapter.spec.rslora,
            scale=adapter.scale,
            strength=strength,
            **measured,
        )

    @classmethod
    def fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        """This record's fields read back from a manifest's weight entry."""
        return {
            "path": data["path"],
            "module": data["module"],
            "expert": int(data["expert"]),
            "kind": data["kind"],
            "rank": int(data["rank"]),
            "alpha": float(data["alpha"]),
            "rslora": bool(data["rslora"]),
            "scale": float(data["scale"]),
            "strength": float(data.get("strength", 1.0)),
        }

    def adapted_weight_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AdaptedWeight)}


@dataclasses.dataclass
class WeightReport(AdaptedWeight):
    """What a merge did to one adapted weight."""

    shape: tuple[int, ...]
    input_dtype: str
    output_dtype: str
    delta_rel_norm: list[float] = dataclasses.field(default_factory=list)  # ||dW|| / ||W|| per layer slice
    bf16_survival: list[float] = dataclasses.field(default_factory=list)  # 1 - ||bf16 error of dW|| / ||dW||
    rel_err: list[float] = dataclasses.field(default_factory=list)  # merged vs LoRA forward, float32 merged weight
    rel_err_stored: list[float] = dataclasses.field(default_factory=list)  # same, with the weight as written
    seconds: float = 0.0
    _sq: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0], repr=False)

    def add_slice(self, stats: dict[str, float]) -> None:
        d, w, lost = stats["delta_norm"], stats["base_norm"], stats["bf16_lost_norm"]
        self.delta_rel_norm.append(d / w if w > 0 else math.inf)
        self.bf16_survival.append(1.0 - lost / d if d > 0 else 1.0)
        self._sq[0] += d * d
        self._sq[1] += w * w
        self._sq[2] += lost * lost
        if "rel_err" in stats:
            self.rel_err.append(stats["rel_err"])
            self.rel_err_stored.append(stats["rel_err_stored"])

    @property
    def delta_rel_norm_total(self) -> float:
        return math.sqrt(self._sq[0]) / math.sqrt(self._sq[1]) if self._sq[1] > 0 else math.inf

    @property
    def bf16_survival_total(self) -> float:
        return 1.0 - math.sqrt(self._sq[2]) / math.sqrt(self._sq[0]) if self._sq[0] > 0 else 1.0

    @property
    def max_rel_err(self) -> float | None:
        return max(self.rel_err) if self.rel_err else None

    @property
    def max_rel_err_stored(self) -> float | None:
        return max(self.rel_err_stored) if self.rel_err_stored else None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        out["shape"] = list(self.shape)
        out["delta_rel_norm_total"] = self.delta_rel_norm_total
        out["bf16_survival_total"] = self.bf16_survival_total
        out["max_rel_err"] = self.max_rel_err
        out["max_rel_err_stored"] = self.max_rel_err_stored
        return out


@dataclasses.dataclass
class MergeReport:
    weights: list[WeightReport] = dataclasses.field(default_factory=list)
    verified: bool = False
    tolerance: float | None = None
    passthrough_leaves: int = 0
    removed_leaves: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def max_rel_err(self) -> float | None:
        errs = [w.max_rel_err for w in self.weights if w.max_rel_err is not None]
        return max(errs) if errs else None

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "tolerance": self.tolerance,
            "max_rel_err": self.max_rel_err,
            "passthrough_leaves": self.passthrough_leaves,
            "removed_leaves": self.removed_leaves,
            "timings_s": self.timings,
            "weights": [w.to_json() for w in self.weights],
        }
