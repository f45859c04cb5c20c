"""The full batched engine: SPEC §4 step order around the lifecycle, dynamics and reward.

``Engine.step(action)`` validates the action (optional, the only place that syncs with the
host), then runs one pure step function, compiled with ``fullgraph=True`` when
``cfg.compile``: reward from the pre-action state, op, tick, one host epoch, record, divergence
handling, done flags, next observation and masks. ``Engine.reset(rows)`` re-draws only the
selected envs with ``torch.where`` so other rows stay bit-identical.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_soa.core.alpha import hold_at
from esper_soa.core.config import MAX_SEED, EngineConfig
from esper_soa.core.lifecycle import copy_state, move, record_epoch
from esper_soa.core.masks import as_bool, compute_masks
from esper_soa.core.reward import compute_reward, settlement
from esper_soa.core.rng import episode_seed
from esper_soa.core.spec import HEAD_NAMES, PRUNABLE_STAGES, SpecTables, Stage, stage_in
from esper_soa.core.state import (
    State,
    as_dict,
    from_dict,
    make_state,
    reset_rows,
    update,
)
from esper_soa.core.step import act, emit
from esper_soa.core.validation import expect_int, validate_action
from esper_soa.dynamics.base import DynamicsBackend

DIVERGENCE_PENALTY = -10.0


def make_dynamics(cfg: EngineConfig, tables: SpecTables) -> DynamicsBackend:
    """Build the backend named by ``cfg.dynamics`` with ``cfg.dynamics_config``."""
    if cfg.dynamics == "surrogate":
        from esper_soa.dynamics.surrogate import SurrogateDynamics

        return SurrogateDynamics(cfg, cfg.dynamics_config)
    if cfg.dynamics == "hosts":
        from esper_soa.dynamics.hosts import BatchedHostsDynamics

        return BatchedHostsDynamics(cfg, cfg.dynamics_config)
    raise ValueError(f"EngineConfig.dynamics: expected 'surrogate' or 'hosts', got {cfg.dynamics!r}")


def collapse(state: State, diverged: torch.Tensor) -> State:
    """Catastrophic divergence (SPEC §13): prune every non-fossilized seed of the diverged envs."""
    st, sl = copy_state(state)
    sel = diverged[:, None] & stage_in(sl["stage"], PRUNABLE_STAGES)
    move(sl, sel, Stage.PRUNED, st["val_acc"])
    hold_at(sl, sel, 0.0)
    update(sl, sel, pending_prune=False)
    return st


class Engine:
    """Batched Esper environment engine on ``cfg.device`` (no TorchRL dependency).

    The lifecycle state is a nested dict of tensors (``state`` exposes it as a TensorDict);
    backend state lives in ``aux``. Both are replaced, never mutated in place, on each call.
    """

    def __init__(self, cfg: EngineConfig, dynamics: DynamicsBackend | None = None) -> None:
        self.cfg = cfg
        self.device = cfg.torch_device
        self.tables = SpecTables(cfg.topology, cfg.n_slots, self.device, cfg.enabled_slots)
        self.dynamics = dynamics if dynamics is not None else make_dynamics(cfg, self.tables)
        if getattr(self.dynamics, "seed_params_table", None) is not None:
            self.tables.blueprint_params = self.dynamics.seed_params_table.to(self.device, torch.float32)
        self.base_seed = cfg.seed
        self.env_index = torch.arange(cfg.n_envs, device=self.device)
        self.episode = torch.zeros(cfg.n_envs, dtype=torch.int64, device=self.device)
        self._fresh = as_dict(make_state(cfg, self.device))
        self._state: State = self._fresh
        self.aux = self.dynamics.init_aux(cfg.n_envs, cfg.seed)
        self._step_fn = self._step_impl
        self._reset_fn = self._reset_impl
        self._act_fn, self._finish_fn = self._act_and_reward, self._finish
        opts = cfg.compile_options
        if cfg.compile and getattr(self.dynamics, "compilable", True):
            self._step_fn = torch.compile(self._step_impl, fullgraph=True, options=opts)
            self._reset_fn = torch.compile(self._reset_impl, fullgraph=True, options=opts)
        elif cfg.compile:  # eager host epoch between two compiled lifecycle graphs
            self._act_fn = torch.compile(self._act_and_reward, fullgraph=True, options=opts)
            self._finish_fn = torch.compile(self._finish, fullgraph=True, options=opts)
        if not getattr(self.dynamics, "compilable", True):
            self._reset_fn = self._reset_subset  # an eager host epoch: run it for the reset rows only
        self.masks = compute_masks(self._state, self.tables, cfg)
        self._started = False

    # --- public API ------------------------------------------------------------------------
    @property
    def state(self) -> TensorDict:
        """The lifecycle state as a TensorDict ``[E]`` with nested ``slots`` ``[E, S]`` (no copy)."""
        return from_dict(self._state, self.cfg.n_envs, self.cfg.n_slots, self.device)

    @property
    def lifecycle_state(self) -> State:
        """The lifecycle state as the compiled step holds it (nested dict, int32 flags; no copy,
        no conversion): what tensor controllers such as the heuristic read every step."""
        return self._state

    def set_seed(self, seed: int) -> None:
        """Restart every env's random streams from ``seed`` (takes effect at the next reset)."""
        self.base_seed = expect_int("Engine.set_seed(seed)", seed, 0, MAX_SEED)
        self.episode = torch.zeros_like(self.episode)

    def reset(self, rows: torch.Tensor | None = None) -> TensorDict:
        """Start new episodes for the envs in ``rows`` ([E] bool; default all) and observe all."""
        if rows is None:
            rows = torch.ones(self.cfg.n_envs, dtype=torch.bool, device=self.device)
        ok = isinstance(rows, torch.Tensor)
        if not ok or rows.shape != (self.cfg.n_envs,) or rows.dtype != torch.bool or rows.device != self.device:
            got = f"{rows.dtype} {tuple(rows.shape)} on {rows.device}" if ok else type(rows).__name__
            raise ValueError(
                f"reset rows: expected a bool tensor of shape ({self.cfg.n_envs},) on {self.device}, got {got}"
            )
        keys = episode_seed(self.base_seed, self.env_index, self.episode)
        self._state, self.aux, out = _bool_masks(self._reset_fn(self._state, self.aux, rows, keys))
        self.episode = self.episode + rows.to(torch.int64)
        self.masks = out["masks"]
        self._started = True
        return TensorDict(out, batch_size=[self.cfg.n_envs], device=self.device)

    def step(self, action: torch.Tensor | dict[str, torch.Tensor] | TensorDict) -> TensorDict:
        """One decision + one host epoch for every env (SPEC §4). Does not auto-reset.

        ``action``: ``[E, 8]`` integers (heads in ``HEAD_NAMES`` order, what the policy samples) or
        one ``[E]`` tensor per head; the compiled step takes the ``[E, 8]`` int64 form."""
        if not self._started:
            raise RuntimeError("Engine.step called before Engine.reset()")
        action = validate_action(action, self.masks, self.cfg, check_values=self.cfg.validate_actions)
        self._state, self.aux, out = _bool_masks(self._step_fn(self._state, self.aux, action))
        self.masks = out["masks"]
        return TensorDict(out, batch_size=[self.cfg.n_envs], device=self.device)

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to continue this engine bit-exactly: the lifecycle state,
        the backend state (RNG counters, host parameters), episode counters, current masks."""
        return {
            "state": self._state,
            "aux": self.aux,
            "episode": self.episode,
            "masks": self.masks,
            "base_seed": self.base_seed,
            "started": self._started,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (tensors are taken as they are, on this engine's device)."""
        missing = {"state", "aux", "episode", "masks", "base_seed", "started"} - set(state)
        if missing:
            raise ValueError(f"Engine.load_state_dict: expected the keys of Engine.state_dict(), missing {sorted(missing)}")
        n = state["episode"].shape
        if n != self.episode.shape:
            raise ValueError(f"Engine.load_state_dict: expected state for {self.cfg.n_envs} envs, got {tuple(n)}")
        self._state, self.aux = state["state"], state["aux"]
        self.episode, self.masks = state["episode"], state["masks"]
        self.base_seed, self._started = state["base_seed"], state["started"]

    # --- pure step functions (compiled when cfg.compile) -----------------------------------
    def _host_epoch(self, state: State, aux: dict) -> tuple[State, dict, torch.Tensor]:
        """SPEC §4 step 5: one host epoch, recorded; returns the divergence flags too."""
        metrics, aux = self.dynamics.advance(state, aux)
        diverged = metrics["diverged"]
        return collapse(record_epoch(state, metrics), diverged), aux, diverged

    def _act_and_reward(
        self, state: State, action: torch.Tensor
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """SPEC §4 steps 2-4: reward from the pre-action state, op, tick (``action`` ``[E, 8]``)."""
        action = dict(zip(HEAD_NAMES, action.unbind(-1)))
        new, op, success = act(state, action, self.tables, self.cfg)
        return new, op, success, compute_reward(state, action, op, self.cfg)

    def _finish(
        self, state: State, metrics: dict[str, torch.Tensor], reward: torch.Tensor
    ) -> tuple[State, dict[str, torch.Tensor], torch.Tensor]:
        """SPEC §4 steps 5-6 after the host epoch: record, divergence, done flags, emit."""
        cfg = self.cfg
        terminated = metrics["diverged"]
        state = collapse(record_epoch(state, metrics), terminated)
        truncated = state["epoch"] >= cfg.max_epochs
        reward = reward + settlement(state, terminated | truncated, cfg)
        reward = reward + DIVERGENCE_PENALTY * terminated.to(reward.dtype)
        state["episode_return"] = state["episode_return"] + reward
        out = emit(state, self.tables, cfg)
        out.update(
            reward=reward[:, None],
            terminated=terminated[:, None],
            truncated=truncated[:, None],
            done=(terminated | truncated)[:, None],
            episode_return=state["episode_return"],
        )
        return state, out, terminated

    def _step_impl(
        self, state: State, aux: dict, action: torch.Tensor
    ) -> tuple[State, dict, dict[str, torch.Tensor]]:
        """The whole step as one function (compiled as one graph for compilable backends)."""
        new, op, success, reward = self._act_fn(state, action)
        metrics, aux = self.dynamics.advance(new, aux)
        aux = {k: v.contiguous() for k, v in aux.items()}  # one layout for step and reset graphs
        new, out, _ = self._finish_fn(new, metrics, reward)
        out.update(executed_op=op, success=success)
        return new, aux, out

    def _reset_impl(
        self, state: State, aux: dict, rows: torch.Tensor, keys: torch.Tensor
    ) -> tuple[State, dict, dict[str, torch.Tensor]]:
        """Reset as one pure function over all E rows (compilable backends: a host epoch is cheap)."""
        fresh_aux = self.dynamics.reset_aux(aux, rows, keys)
        fresh, fresh_aux, _ = self._host_epoch(self._fresh, fresh_aux)
        aux = {
            k: torch.where(rows.reshape((-1,) + (1,) * (v.dim() - 1)), fresh_aux[k], v).contiguous()
            for k, v in aux.items()
        }
        return self._reset_emit(state, fresh, aux, rows)

    def _reset_subset(
        self, state: State, aux: dict, rows: torch.Tensor, keys: torch.Tensor
    ) -> tuple[State, dict, dict[str, torch.Tensor]]:
        """Reset for eager backends (real hosts): only the k reset rows are gathered, re-drawn and
        run through their first host epoch, then scattered back, so a reset costs O(k) host work and
        every other row's backend state (parameters, optimiser buffers, RNG) is left untouched.

        Reads ``rows`` on the host (one sync; such a backend's ``advance`` syncs anyway) and needs
        ``advance``/``reset_aux`` to accept any number of rows (see ``DynamicsBackend``).
        """
        idx = rows.nonzero().squeeze(1)
        if idx.numel() == 0:
            return self._reset_emit(state, self._fresh, aux, rows)
        sub = {k: v.index_select(0, idx) for k, v in aux.items()}
        sub = self.dynamics.reset_aux(sub, torch.ones_like(idx, dtype=torch.bool), keys.index_select(0, idx))
        fresh_sub, sub, _ = self._host_epoch(_take_rows(self._fresh, idx), sub)
        aux = {k: v.index_copy(0, idx, sub[k]) for k, v in aux.items()}
        return self._reset_emit(state, _put_rows(self._fresh, idx, fresh_sub), aux, rows)

    def _reset_emit(
        self, state: State, fresh: State, aux: dict, rows: torch.Tensor
    ) -> tuple[State, dict, dict[str, torch.Tensor]]:
        """Take ``fresh`` for the reset rows and observe every env (done flags false, reward 0)."""
        state = reset_rows(state, fresh, rows)
        out = emit(state, self.tables, self.cfg)
        false = torch.zeros_like(rows)[:, None]
        out.update(
            reward=torch.zeros_like(state["val_acc"])[:, None],
            terminated=false,
            truncated=false,
            done=false,
            episode_return=state["episode_return"],
        )
        return state, aux, out


def _take_rows(state: State, idx: torch.Tensor) -> State:
    """The envs ``idx`` of a nested state (a k-env state)."""
    return {k: _take_rows(v, idx) if k == "slots" else v.index_select(0, idx) for k, v in state.items()}


def _put_rows(state: State, idx: torch.Tensor, rows: State) -> State:
    """``state`` with the envs ``idx`` replaced by the k-env state ``rows`` (out of place; ``clone``
    keeps each field's layout, e.g. the slot-major slot fields, which ``index_copy`` would not)."""
    return {k: _put_rows(v, idx, rows[k]) if k == "slots" else v.clone().index_copy_(0, idx, rows[k])
            for k, v in state.items()}


def _bool_masks(result: tuple[State, dict, dict[str, torch.Tensor]]) -> tuple[State, dict, dict[str, torch.Tensor]]:
    """The step/reset outputs with the uint8 mask flags as bool views (outside the graph: free)."""
    state, aux, out = result
    return state, aux, {**out, "masks": as_bool(out["masks"])}

