"""The batched engine: compiles the core's step functions and drives them on ``cfg.device``.

``Engine.step(action)`` validates the action (optional, the only place that syncs with the
host), then runs ``core.step.step`` (before_host -> one host epoch -> after_host), compiled
with ``fullgraph=True`` when ``cfg.compile``. ``Engine.reset(rows)`` runs ``core.step.reset``
for the selected envs, so other rows stay bit-identical. The step logic itself lives in
``esper_soa/core/step.py``; this class owns the tensors, the compiled graphs and the backend.

Example::

    from esper_soa import Engine, EngineConfig
    from esper_soa.core.masks import sample_masked_action

    engine = Engine(EngineConfig(n_envs=1024, device="cpu"))
    out = engine.reset()                               # TensorDict [1024]
    out = engine.step(sample_masked_action(engine.masks))
    out["observation"], out["reward"], out["done"]
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_soa.core import step as core_step
from esper_soa.core.config import MAX_SEED, EngineConfig
from esper_soa.core.masks import as_bool, compute_masks
from esper_soa.core.rng import episode_seed
from esper_soa.core.spec import HEAD_NAMES, SpecTables
from esper_soa.core.state import State, as_dict, from_dict, make_state
from esper_soa.core.validation import expect_int, validate_action
from esper_soa.dynamics.base import DynamicsBackend


def make_dynamics(cfg: EngineConfig, tables: SpecTables) -> DynamicsBackend:
    """Build the backend named by ``cfg.dynamics`` with ``cfg.dynamics_config``."""
    if cfg.dynamics == "surrogate":
        from esper_soa.dynamics.surrogate import SurrogateDynamics

        return SurrogateDynamics(cfg, cfg.dynamics_config)
    if cfg.dynamics == "hosts":
        from esper_soa.dynamics.hosts import BatchedHostsDynamics

        return BatchedHostsDynamics(cfg, cfg.dynamics_config)
    raise ValueError(f"EngineConfig.dynamics: expected 'surrogate' or 'hosts', got {cfg.dynamics!r}")


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
        self.env_index = torch.arange(cfg.env_offset, cfg.env_offset + cfg.n_envs, device=self.device)
        self.episode = torch.zeros(cfg.n_envs, dtype=torch.int64, device=self.device)
        self._fresh = as_dict(make_state(cfg, self.device))
        # its own tensors, not ``_fresh``: a first reset whose state *is* ``_fresh`` would be traced
        # for that aliasing and the next reset compiled again (minutes of inductor time on a CPU)
        self._state: State = as_dict(make_state(cfg, self.device))
        self.aux = self.dynamics.init_aux(cfg.n_envs, cfg.seed)
        opts = cfg.compile_options
        self._step_fn, self._reset_fn = self._step, self._reset
        if not getattr(self.dynamics, "compilable", True):  # an eager host epoch (real hosts)
            self._reset_fn = self._reset_subset
            if cfg.compile:  # the lifecycle parts compiled around it
                self._before = torch.compile(core_step.before_host, fullgraph=True, options=opts)
                self._after = torch.compile(core_step.after_host, fullgraph=True, options=opts)
        elif cfg.compile:  # the whole step (and the whole reset) as one graph each
            self._step_fn = torch.compile(self._step, fullgraph=True, options=opts)
            self._reset_fn = torch.compile(self._reset, fullgraph=True, options=opts)
        self.masks = compute_masks(self._state, self.tables, cfg)
        self._started = False

    # --- public API ------------------------------------------------------------------------
    @property
    def state(self) -> TensorDict:
        """The lifecycle state as a TensorDict ``[E]`` with nested ``slots`` ``[E, S]`` (no copy)."""
        return from_dict(self._state, self.cfg.n_envs, self.cfg.n_slots, self.device)

    @property
    def lifecycle_state(self) -> State:
        """The state as the step functions hold it (nested dict, int32 flags, no copy): what
        controllers that read the lifecycle directly (the heuristic, scripted probes) take."""
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
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"Engine.load_state_dict: expected the keys of Engine.state_dict(), missing {sorted(missing)}")
        n = state["episode"].shape
        if n != self.episode.shape:
            raise ValueError(f"Engine.load_state_dict: expected state for {self.cfg.n_envs} envs, got {tuple(n)}")
        self._state, self.aux = state["state"], state["aux"]
        self.episode, self.masks = state["episode"], state["masks"]
        self.base_seed, self._started = state["base_seed"], state["started"]

    # --- driving: the core's step functions bound to this engine's backend, tables, config ---
    _before = staticmethod(core_step.before_host)
    _after = staticmethod(core_step.after_host)

    def _step(self, state: State, aux: dict, action: torch.Tensor) -> tuple[State, dict, dict]:
        heads = dict(zip(HEAD_NAMES, action.unbind(-1)))  # [E, 8] -> the heads, inside the graph
        return core_step.step(state, aux, heads, self.dynamics.advance, self.tables, self.cfg,
                              before=self._before, after=self._after)

    def _reset(self, state: State, aux: dict, rows: torch.Tensor, keys: torch.Tensor) -> tuple[State, dict, dict]:
        return core_step.reset(state, aux, rows, keys, self._fresh, self.dynamics.reset_aux, self.dynamics.advance,
                               self.tables, self.cfg)

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
        fresh = self._fresh
        if idx.numel() > 0:
            sub = {k: v.index_select(0, idx) for k, v in aux.items()}
            sub = self.dynamics.reset_aux(sub, torch.ones_like(idx, dtype=torch.bool), keys.index_select(0, idx))
            sub_fresh = _take_rows(fresh, idx)
            metrics, sub = self.dynamics.advance(sub_fresh, sub)
            fresh = _put_rows(fresh, idx, core_step.first_epoch(sub_fresh, metrics))
            aux = {k: v.index_copy(0, idx, sub[k]) for k, v in aux.items()}
        state, out = core_step.after_reset(state, fresh, rows, self.tables, self.cfg)
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

