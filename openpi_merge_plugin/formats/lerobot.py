"""LeRobot 0.6.1's policy directory: what `PI0Policy` / `PI05Policy` / `PI0FastPolicy` `.from_pretrained(DIR)` and
`make_pre_post_processors(config, pretrained_path=DIR)` load.

`model.safetensors` (`lerobot_layout`: the one layout table, LeRobot's names and dtypes), `config.json` and the
processor files (`lerobot_files`, as LeRobot's `save_pretrained` writes them, normalization stats from the model's
openpi norm stats). Needs no LeRobot, torch or openpi.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import base
from openpi_merge_plugin.formats import lerobot_files as files
from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as layout

LEROBOT_VERSION = "0.6.1"
# The one switch for pi0-FAST: None exports it; a reason (what LeRobot's PI0FastPolicy computes differently from
# openpi's Pi0FAST) refuses it with that reason, before any work.
PI0_FAST_REFUSED: str | None = (
    "LeRobot 0.6.1's PI0FastPolicy decodes differently from openpi's Pi0FAST: it appends a BOS token after the prompt "
    "and predicts the first action token from it, where openpi predicts it from the prompt's last token (and it does "
    "not lowercase the task). Its prompt logits match openpi's, but an openpi-trained pi0-FAST would decode other "
    "actions in LeRobot (see docs/lerobot.md)"
)


@dataclasses.dataclass(frozen=True)
class Plan:
    layout: lerobot_layout.LeRobotLayout
    spec: files.PolicySpec
    stats: dict[str, np.ndarray]


def plan(given: base.PlanInput) -> base.FormatPlan:
    """The file, config.json and the processors of `given.structure` (merged params); reads shapes and norm stats."""
    facts, options = given.facts, given.options
    lerobot = plan_lerobot(given.structure, facts, options, what=given.what)
    return base.FormatPlan(
        precision=lerobot.spec.dtype,
        tensors=lerobot.layout.tensors,
        files=files.all_files(lerobot.spec, lerobot.stats),
        manifest={
            "lerobot_version": LEROBOT_VERSION,
            "source": {"norm_stats": facts.norm_stats},
            "policy": {
                "type": lerobot.spec.kind,
                "action_horizon": facts.action_horizon,
                "max_token_len": lerobot.spec.tokenizer_max_length,
                "action_dim": lerobot.spec.max_dim,
                "n_action_steps": lerobot.spec.n_action_steps,
                "cameras": list(lerobot.spec.cameras),
                "config_name": facts.config_name,
            },
            "precision_rules": (
                "LeRobot's to_bfloat16_for_selected_params under config dtype "
                f"{lerobot.spec.dtype!r}: bfloat16 tensors are bf16(x), float32 ones exactly x"
            ),
            # Written with --allow-nonstandard-dims: loads only into a LeRobot patched to these dimensions.
            "nonstandard_dims": {
                k: {"model": m, "lerobot": t} for k, (m, t) in lerobot.layout.nonstandard_dims.items()
            },
            "verification": {
                "normalizer_stats": {
                    "reader": "safetensors.numpy.load of the bytes written (each file read back as those bytes)",
                    "files": 2,
                    "stats": len(lerobot.stats),
                    "bitwise": True,
                }
            },
        },
    )


def plan_lerobot(
    structure: Mapping[str, Any], facts: base.ModelFacts, options: base.ExportOptions, *, what: Any
) -> Plan:
    """The file layout, the policy spec and the normalizer stats; reads only shapes and the norm stats."""
    precision = options.precision_or()
    tree = base.merged_shape_table(structure, what)
    kind = lerobot_layout.detect_kind(tree)
    if kind == "pi0_fast" and PI0_FAST_REFUSED:
        raise ConfigError(f"pi0-FAST is not exported for LeRobot: {PI0_FAST_REFUSED}")
    params_action_dim = int(tree["action_in_proj/kernel"][0][0]) if kind != "pi0_fast" else None
    try:
        paligemma = layout.dims_from_params(structure, "")
        expert = layout.dims_from_params(structure, "_1") if kind != "pi0_fast" else None
        lay = lerobot_layout.build_lerobot_layout(
            tree,
            paligemma=paligemma,
            action_expert=expert,
            action_dim=params_action_dim,
            precision=precision,
            allow_nonstandard_dims=options.allow_nonstandard_dims,
        )
        cameras = files.camera_names(options.cameras())
        norm_path = facts.require_norm_stats()
        stats = files.normalizer_tensors(files.read_openpi_norm_stats(norm_path), kind)
    except layout.NonstandardDimsError as e:
        raise ConfigError(str(e)) from e
    except (layout.LayoutError, files.LeRobotFilesError) as e:
        raise ConfigError(f"{what}: {e}") from e
    state_dim, action_dim = files.stat_dim(stats, files.STATE), files.stat_dim(stats, files.ACTION)
    max_dim = params_action_dim or facts.action_dim or action_dim
    # pi0/pi0.5 pad state and actions to action_dim (state_proj, action_in_proj); pi0-FAST puts the state, unpadded,
    # into the prompt.
    for name, dim in (("state", state_dim), ("actions", action_dim)) if kind != "pi0_fast" else ():
        if dim > max_dim:
            raise ConfigError(f"{norm_path}: {name} has {dim} dims, more than the model's action_dim {max_dim}")
    if kind == "pi0_fast" and action_dim != max_dim:
        raise ConfigError(
            f"{norm_path}: actions have {action_dim} dims, pi0-FAST's action_dim is {max_dim}; LeRobot decodes the "
            "FAST tokens with the action feature's dim, so they must be equal"
        )
    n_steps = options.n_action_steps or facts.action_horizon
    if not 0 < n_steps <= facts.action_horizon:
        raise ConfigError(f"--n-action-steps {n_steps} must be 1..the action horizon {facts.action_horizon}")
    spec = files.PolicySpec(
        kind=kind,
        paligemma_variant=lay.paligemma_variant,
        action_expert_variant=lay.action_expert_variant,
        dtype=precision,
        chunk_size=facts.action_horizon,
        n_action_steps=n_steps,
        max_dim=max_dim,
        tokenizer_max_length=facts.max_token_len,
        cameras=cameras,
        state_dim=state_dim,
        action_dim=action_dim,
        device=options.device,
    )
    return Plan(lay, spec, stats)


def describe(manifest: Mapping[str, Any]) -> list[str]:
    lines = []
    if manifest["nonstandard_dims"]:
        lines.append(
            f"dimensions LeRobot does not build (--allow-nonstandard-dims): {', '.join(manifest['nonstandard_dims'])}"
        )
    return [*lines, f"load with LeRobot: --policy.path={manifest['output']}"]


FORMAT = base.Format(
    "lerobot",
    plan,
    options=frozenset({"max_token_len", "asset_id", "norm_stats", "camera", "n_action_steps", "device"}),
    describe=describe,
)
