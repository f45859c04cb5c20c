"""Observation (SPEC §10): 23 base floats + 31 per slot, and the per-slot blueprint index.

Built with whole-tensor ops over ``[E]`` and ``[E, S]``; empty slots are zeroed by one multiply
instead of branching, so the graph is identical for every stage mix.
"""

from __future__ import annotations

import torch

from esper_soa.config import EngineConfig
from esper_soa.spec import (
    CF_FRESHNESS_DECAY,
    FIXED_HEAD_SIZES,
    AlphaMode,
    SpecTables,
    Stage,
)
from esper_soa.state import State


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def _onehot(index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """One-hot by comparison with the code list (no gather, no bounds assert: vectorizes)."""
    return (index[..., None] == codes).to(torch.float32)


def _frac(x: torch.Tensor, max_epochs: int) -> torch.Tensor:
    """min(x, max_epochs) / max_epochs as float."""
    return x.clamp(max=max_epochs).to(torch.float32) / max_epochs


def observe(state: State, tables: SpecTables, cfg: EngineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (observation [E, 23 + 31 S] float32, blueprint index [E, S] int64).

    Features are stacked feature-major (``[F, E]`` and, for the slots, ``[S, 31, E]``: each
    feature a contiguous vectorized write) and the ``[23 + 31 S, E]`` result is transposed once
    into the env-major observation (a tiled 2-D transpose). Stacking on the last dim instead makes
    every feature a strided pass over the whole output, and an ``[31, E, S]`` block needs a
    div/mod per element to reach the ``(slot, feature)`` column.
    """
    sl = state["slots"]
    stage = sl["stage"]
    n_envs, n_slots = stage.shape
    f = torch.float32
    horizon = cfg.max_epochs

    hist_len = state["loss_history"].shape[1]
    observed = torch.arange(hist_len, device=stage.device)[None, :] >= (hist_len - state["history_len"])[:, None]
    sentinel = torch.full_like(state["loss_history"], -1.0)
    counts = torch.stack([(stage == int(s)).sum(1) for s in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)])
    base = torch.cat(
        [
            torch.stack(
                [
                    state["epoch"].to(f) / horizon,
                    symlog(state["val_loss"]) / 7.0,
                    state["val_acc"] / 100.0,
                ]
            ),
            torch.where(observed, symlog(state["loss_history"]) / 7.0, sentinel).T,
            torch.where(observed, state["acc_history"] / 100.0, sentinel).T,
            counts.to(f) / n_slots,
            state["last_action_success"].to(f)[None],
            _onehot(state["last_op"], torch.arange(FIXED_HEAD_SIZES["op"], device=stage.device)).T,
        ]
    )

    # slot part, built slot-major: each feature is a [S, E] tensor (the storage layout of the slot
    # fields), stacked to [S, 31, E] = [S * 31, E]; that is already the feature-major block of the
    # observation, so the whole observation is one plain 2-D transpose of [23 + 31 S, E]
    slt = {k: v.T for k, v in sl.items()}
    stage_t = slt["stage"]
    has_seed = (stage_t != int(Stage.DORMANT)) & (stage_t != int(Stage.UNKNOWN))
    holding = slt["alpha_mode"] == int(AlphaMode.HOLD)
    total = slt["alpha_steps_total"]
    velocity = (slt["alpha_target"] - slt["alpha_start"]) / total.clamp(min=1).to(f)
    freshness = torch.where(
        slt["contribution_measured"],
        CF_FRESHNESS_DECAY ** slt["epochs_since_measurement"].to(f),
        torch.full_like(slt["alpha"], -1.0),
    )
    per_slot = [
        has_seed.to(f)[:, None],
        _onehot(stage_t, tables.stage_codes).transpose(1, 2),
        torch.stack(
            [
                slt["alpha"],
                (slt["contribution"] / 10.0).clamp(-1.0, 1.0),
                (slt["contribution_velocity"] / 10.0).clamp(-1.0, 1.0),
                slt["tempo"].to(f) / 12.0,
                slt["alpha_target"],
                slt["alpha_mode"].to(f) / 2.0,
                _frac(total, horizon),
                _frac(slt["alpha_steps_done"], horizon),
                _frac(total - slt["alpha_steps_done"], horizon),
                torch.where(holding, torch.zeros_like(velocity), velocity.clamp(-1.0, 1.0)),
                (slt["algorithm"].to(f) - 1.0) / 2.0,
                (slt["interaction_sum"] / 10.0).clamp(-1.0, 1.0),
                symlog(slt["gradient_norm"]) / 7.0,
                torch.where(slt["gradient_measured"], slt["gradient_health"], torch.zeros_like(slt["alpha"])),
                slt["has_vanishing"].to(f),
                slt["has_exploding"].to(f),
                slt["previous_gradient_health"],
                _frac(slt["epochs_in_stage"], horizon),
                _frac(slt["seed_age"], horizon),
                freshness,
            ],
            dim=1,
        ),
    ]
    slot_feats = torch.cat(per_slot, dim=1) * has_seed.to(f)[:, None]  # [S, 31, E]
    obs = torch.cat([base, slot_feats.reshape(-1, n_envs)]).T.contiguous()
    blueprint_index = torch.where(has_seed.T, sl["blueprint"], torch.zeros_like(sl["blueprint"]))
    return obs, blueprint_index
