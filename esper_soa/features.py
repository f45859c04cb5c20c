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

    Features are stacked feature-major (``[F, E]`` / ``[F, E, S]``, each feature a contiguous
    vectorized write) and transposed once into the env-major observation: stacking on the last
    dim instead makes every feature a strided pass over the whole output.
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

    has_seed = (stage != int(Stage.DORMANT)) & (stage != int(Stage.UNKNOWN))
    holding = sl["alpha_mode"] == int(AlphaMode.HOLD)
    total = sl["alpha_steps_total"]
    velocity = (sl["alpha_target"] - sl["alpha_start"]) / total.clamp(min=1).to(f)
    freshness = torch.where(
        sl["contribution_measured"],
        CF_FRESHNESS_DECAY ** sl["epochs_since_measurement"].to(f),
        torch.full_like(sl["alpha"], -1.0),
    )
    per_slot = [
        has_seed.to(f)[None],
        _onehot(stage, tables.stage_codes).permute(2, 0, 1),
        torch.stack(
            [
                sl["alpha"],
                (sl["contribution"] / 10.0).clamp(-1.0, 1.0),
                (sl["contribution_velocity"] / 10.0).clamp(-1.0, 1.0),
                sl["tempo"].to(f) / 12.0,
                sl["alpha_target"],
                sl["alpha_mode"].to(f) / 2.0,
                _frac(total, horizon),
                _frac(sl["alpha_steps_done"], horizon),
                _frac(total - sl["alpha_steps_done"], horizon),
                torch.where(holding, torch.zeros_like(velocity), velocity.clamp(-1.0, 1.0)),
                (sl["algorithm"].to(f) - 1.0) / 2.0,
                (sl["interaction_sum"] / 10.0).clamp(-1.0, 1.0),
                symlog(sl["gradient_norm"]) / 7.0,
                torch.where(sl["gradient_measured"], sl["gradient_health"], torch.zeros_like(sl["alpha"])),
                sl["has_vanishing"].to(f),
                sl["has_exploding"].to(f),
                sl["previous_gradient_health"],
                _frac(sl["epochs_in_stage"], horizon),
                _frac(sl["seed_age"], horizon),
                freshness,
            ]
        ),
    ]
    slot_feats = torch.cat(per_slot) * has_seed.to(f)[None]  # [31, E, S]
    obs = torch.cat([base.T, slot_feats.permute(1, 2, 0).reshape(n_envs, -1)], dim=1)
    blueprint_index = torch.where(has_seed, sl["blueprint"], torch.zeros_like(sl["blueprint"]))
    return obs, blueprint_index
