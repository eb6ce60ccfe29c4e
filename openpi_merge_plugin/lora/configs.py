"""Where the LoRA configs of a checkpoint come from: openpi's live config, a file, explicit options, or shapes.

openpi does not record the LoRA config in its checkpoints, and alpha cannot be read off the weights. The sources,
most to least authoritative:
1. `--config NAME` with openpi importable: `gemma.get_config(variant).lora_configs` of the registered TrainConfig.
2. `--lora-config FILE`: a JSON file like those in `configs/`.
3. `--alpha A` (with `--rslora`): one alpha for every adapter, rank read from the shapes.
4. Nothing: each expert's (width, rank) must match one of openpi's shipped LoRA variants exactly, else an error.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import pathlib

from openpi_merge_plugin import options
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora import config_schema
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.lora.spec import ExpertLoRA
from openpi_merge_plugin.lora.spec import LoRASpec
from openpi_merge_plugin.lora.spec import ResolvedLoRA

# openpi 15a9616 `gemma.get_config` / `gemma_fast.get_config`: the LoRA variants it ships, with their widths.
SHIPPED_VARIANTS: dict[str, tuple[int, ExpertLoRA]] = {
    "gemma_2b_lora": (
        2048,
        ExpertLoRA("gemma_2b_lora", attn=LoRASpec(rank=16, alpha=16.0), ffn=LoRASpec(rank=16, alpha=16.0)),
    ),
    "gemma_300m_lora": (
        1024,
        ExpertLoRA("gemma_300m_lora", attn=LoRASpec(rank=32, alpha=32.0), ffn=LoRASpec(rank=32, alpha=32.0)),
    ),
}


def from_file(path: pathlib.Path | str) -> ResolvedLoRA:
    """Reads a LoRA config file: `{"experts": [{"variant", "attn": {...}, "ffn": {...}}, ...]}` (`config_schema`)."""
    path = pathlib.Path(path)
    experts, config_name = config_schema.read_file(path)
    return ResolvedLoRA(experts=experts, source=f"file {path}", config_name=config_name)


def uniform(tree: Mapping[str, _adapters.ShapeDtype], alpha: float, *, rslora: bool = False) -> ResolvedLoRA:
    """One alpha (and rsLoRA flag) for every adapter; ranks read from the checkpoint."""
    experts: dict[int, dict[str, LoRASpec]] = {}
    for (expert, kind), ranks in _adapters.adapter_ranks(tree).items():
        if len(ranks) != 1:
            raise ConfigError(
                f"expert {expert} has {kind} adapters of several ranks {sorted(ranks)}; pass a config file"
            )
        experts.setdefault(expert, {})[kind] = LoRASpec(rank=ranks.pop(), alpha=alpha, rslora=rslora)
    return ResolvedLoRA(
        experts={i: ExpertLoRA("custom", **kinds) for i, kinds in experts.items()},
        source=f"options (alpha={alpha}, rslora={rslora})",
    )


def infer_shipped(tree: Mapping[str, _adapters.ShapeDtype]) -> ResolvedLoRA:
    """Matches each expert's width and ranks to openpi's shipped LoRA variants; refuses to guess otherwise."""
    widths = _adapters.expert_widths(tree)
    ranks = _adapters.adapter_ranks(tree)
    experts = {}
    for expert in sorted({e for e, _ in ranks}):
        width = widths.get(expert)
        for variant_width, lora in SHIPPED_VARIANTS.values():
            if width == variant_width and all(
                (spec := lora.get(kind)) is not None and r == {spec.rank}
                for (e, kind), r in ranks.items()
                if e == expert
            ):
                experts[expert] = lora
                break
        else:
            found = {kind: sorted(r) for (e, kind), r in ranks.items() if e == expert}
            raise ConfigError(
                f"cannot tell the LoRA alpha of expert {expert} (width {width}, ranks {found}): it matches none of "
                f"openpi's shipped LoRA variants {sorted(SHIPPED_VARIANTS)}. Pass --config NAME (openpi installed), "
                "--lora-config FILE, or --alpha"
            )
    names = ", ".join(f"expert {i}: {e.variant}" for i, e in experts.items())
    return ResolvedLoRA(experts=experts, source=f"inferred from shapes ({names})")


@dataclasses.dataclass(frozen=True)
class LoRASource:
    """Where to take LoRA configs from (see `lora_configs`); at most one of the first three, or none: inferred."""

    # Registered openpi TrainConfig the checkpoint was trained with (needs openpi installed).
    config: str | None = None
    # JSON file with the LoRA config of each expert (see configs/), when openpi is not installed.
    lora_config: pathlib.Path | None = None
    # One LoRA alpha for every adapter (ranks are read from the checkpoint).
    alpha: float | None = None
    # With alpha: the adapters were trained with rsLoRA (scale alpha/sqrt(rank)).
    rslora: bool = False

    def __post_init__(self) -> None:
        options.validate(self, options.LORA_SOURCE_CHECKS)
        chosen = [
            f"--{n.replace('_', '-')}" for n in ("config", "lora_config", "alpha") if getattr(self, n) is not None
        ]
        if len(chosen) > 1:
            raise ConfigError(f"give only one of {', '.join(chosen)}")
        if self.rslora and self.alpha is None:
            raise options.OptionError("rslora", "needs --alpha (it says how that alpha scales)")

    @property
    def given(self) -> bool:
        """Whether any source is named (otherwise the configs are inferred from the shapes)."""
        return any(v is not None for v in (self.config, self.lora_config, self.alpha))


def resolve_lora(tree: Mapping[str, _adapters.ShapeDtype], how: LoRASource) -> ResolvedLoRA:
    """The LoRA config of each expert, from the first source `how` names (or inferred from the shapes)."""
    if how.config:
        return openpi_configs.lora_from_train_config(how.config)
    if how.lora_config:
        resolved = from_file(how.lora_config)
        config_schema.check_against(resolved.experts, tree, f"LoRA config file {how.lora_config}")
        return resolved
    if how.alpha is not None:
        return uniform(tree, how.alpha, rslora=how.rslora)
    return infer_shipped(tree)
