"""Host-dynamics backend contract (SPEC §11).

A backend advances every env one host epoch given the slot state and returns a flat dict of
tensors named by ``spec.METRIC_FIELDS``. ``record_epoch`` (lifecycle) is the only consumer, so any
backend that fills these fields plugs into the engine.
"""

from __future__ import annotations

from typing import Protocol

import torch

from esper_soa.core.state import State


class DynamicsBackend(Protocol):
    """What the engine needs from host dynamics. ``aux`` is backend-owned per-env state.

    ``compilable``: whether ``advance`` is a pure tensor function that
    ``torch.compile(fullgraph=True)`` accepts (the engine then compiles the whole step as one
    graph; otherwise it compiles the lifecycle parts around an eager ``advance``). A backend that is
    not compilable must accept any number of rows in ``reset_aux`` and ``advance`` (per-env state,
    nothing sized by ``cfg.n_envs``): the engine resets k envs by running them alone (O(k)).
    ``seed_params_table``: ``[S, 13]`` parameter count of each blueprint in each slot as the
    backend builds them, or ``None`` to use the spec's table (what the rent and shock terms price).
    """

    compilable: bool
    seed_params_table: torch.Tensor | None

    def init_aux(self, n_envs: int, seed: int) -> dict[str, torch.Tensor]:
        """Fresh backend state for ``n_envs`` envs (RNG streams, latent host/seed parameters)."""

    def reset_aux(self, aux: dict, rows: torch.Tensor, episode_seed: torch.Tensor) -> dict:
        """Re-draw backend state for the envs in ``rows`` only, others untouched."""

    def advance(self, state: State, aux: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """One host epoch for every env: returns (metrics, new aux)."""
