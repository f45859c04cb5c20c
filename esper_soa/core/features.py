"""Observation (SPEC §10): 23 base floats + 31 per slot, and the per-slot blueprint index.

Built with whole-tensor ops over ``[E]`` and ``[E, S]``; empty slots are zeroed by one multiply
instead of branching, so the graph is identical for every stage mix.
"""

from __future__ import annotations

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    CF_FRESHNESS_DECAY,
    EMPTY_BLUEPRINT_INDEX,
    FIXED_HEAD_SIZES,
    OBS_STAGE_COUNTS,
    AlphaMode,
    SpecTables,
    Stage,
    stage_in,
)
from esper_soa.core.state import State


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def _frac(x: torch.Tensor, max_epochs: int) -> torch.Tensor:
    """min(x, max_epochs) / max_epochs as float."""
    return x.clamp(max=max_epochs).to(torch.float32) / max_epochs


def observe(state: State, tables: SpecTables, cfg: EngineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (observation [E, 23 + 31 S] float32, blueprint index [E, S] int64, -1 where empty).

    The observation is stored *feature-major*: it is the ``[E, F]`` transposed view of an
    ``[F, E]`` buffer (strides ``(1, E)``), like the slot fields (see ``state.py``). Every feature
    is one ``[E]`` row computed straight into its slice of that buffer by one vectorized loop;
    an env-major buffer would make each feature a strided pass (or cost one more transposing
    copy of the whole observation per step). Consumers see an ordinary ``[E, F]`` tensor: a
    ``Linear`` reads the transposed layout at no cost, and collectors copy it into their
    rollout storage anyway. Use ``.reshape``/``.contiguous()``, not ``.view``, to re-shape it.
    """
    sl = state["slots"]
    stage = sl["stage"]
    n_envs, n_slots = stage.shape
    f = torch.float32
    horizon = cfg.max_epochs

    hist_len = state["loss_history"].shape[1]
    history = []
    for source, scale in ((symlog(state["loss_history"]), 7.0), (state["acc_history"], 100.0)):
        for i in range(hist_len):  # column i holds a value once history_len >= hist_len - i
            observed = state["history_len"] >= hist_len - i
            history.append(torch.where(observed, source[:, i] / scale, torch.full_like(source[:, i], -1.0)))
    base = [  # the 23 base features, each [E]
        # the host epoch just trained, 1-based as the original (which trains no epoch after its
        # last decision, so the terminal observation reads 1)
        (state["epoch"] + 1).clamp(max=horizon).to(f) / horizon,
        symlog(state["val_loss"]) / 7.0,
        state["val_acc"] / 100.0,
        *history,
        *(stage_in(stage, s).sum(1).to(f) / n_slots for s in OBS_STAGE_COUNTS),
        state["last_action_success"].to(f),
        *((state["last_op"] == code).to(f) for code in range(FIXED_HEAD_SIZES["op"])),
    ]

    # slot features as [S, E] tensors (the storage layout of the slot fields); row s of each is
    # that slot's feature over envs
    slt = {k: v.T for k, v in sl.items()}
    stage_t = slt["stage"]
    has_seed = (stage_t != int(Stage.DORMANT)) & (stage_t != int(Stage.UNKNOWN))
    holding = slt["alpha_mode"] == int(AlphaMode.HOLD)
    total = slt["alpha_steps_total"]
    velocity = (slt["alpha_target"] - slt["alpha_start"]) / total.clamp(min=1).to(f)
    freshness = torch.where(
        slt["contribution_measured"] != 0,
        CF_FRESHNESS_DECAY ** slt["epochs_since_measurement"].to(f),
        torch.full_like(slt["alpha"], -1.0),
    )
    seeded = has_seed.to(f)
    per_slot = [  # the 31 slot features, each [S, E]
        seeded,
        *((stage_t == int(code)).to(f) for code in Stage),  # one-hot in code order, 5 unused
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
        torch.where(slt["gradient_measured"] != 0, slt["gradient_health"], torch.zeros_like(slt["alpha"])),
        slt["has_vanishing"].to(f),
        slt["has_exploding"].to(f),
        slt["previous_gradient_health"],
        _frac(slt["epochs_in_stage"], horizon),
        freshness,  # before seed_age, the original's order
        _frac(slt["seed_age"], horizon),
    ]
    slot_rows = [feature[s] * seeded[s] for s in range(n_slots) for feature in per_slot]  # empty slots read 0
    obs = torch.stack([*base, *slot_rows]).T
    blueprint_index = torch.where(has_seed.T, sl["blueprint"], torch.full_like(sl["blueprint"], EMPTY_BLUEPRINT_INDEX))
    return obs, blueprint_index
