"""The SPEC §4 step, top to bottom, as pure functions of the lifecycle state.

One step is ``before_host`` (reward of the pre-action state, op, tick, epoch count), one host
epoch from a dynamics backend (``advance``), then ``after_host`` (record the epoch, collapse on
divergence, done flags, settlement, divergence penalty, return, next observation and masks).
``step`` strings the three together; ``reset`` is its counterpart for starting episodes.

The engine compiles these functions (``torch.compile(fullgraph=True)``) and drives them; the
differential and fidelity tests call the same functions with the reference oracle beside them,
so every line of the step, collapse and done flags included, is compared with the oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.features import observe
from esper_soa.core.lifecycle import apply_op, collapse, record_epoch, tick
from esper_soa.core.masks import mask_flags
from esper_soa.core.reward import DIVERGENCE_PENALTY, committed_gain, compute_reward, settlement
from esper_soa.core.spec import SpecTables, Stage
from esper_soa.core.state import State, reset_rows, slot_major

Metrics = dict[str, torch.Tensor]
Aux = dict[str, torch.Tensor]
Advance = Callable[[State, Aux], tuple[Metrics, Aux]]


def before_host(
    state: State, action: dict[str, torch.Tensor], tables: SpecTables, cfg: EngineConfig
) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §4 steps 2-4: the reward of (pre-action state, action), then op, tick, epoch + 1.

    Returns ``(state, executed op, success, reward)``. First the values "as of this decision"
    are kept: alpha (for the shock term) and the measured gradient health, which the next
    observation shows as the previous health (the original stores it after each decision; a
    slot never measured keeps -1).
    """
    slots = dict(state["slots"])
    slots["previous_alpha"] = slots["alpha"]
    slots["previous_gradient_health"] = torch.where(
        slots["gradient_measured"] != 0, slots["gradient_health"], slots["previous_gradient_health"]
    )
    new = {**state, "slots": slots}
    new, op, success = apply_op(new, action, tables, cfg)
    new = tick(new, cfg)
    new["epoch"] = new["epoch"] + 1
    new["slots"] = slot_major(new["slots"])
    return new, op, success, compute_reward(state, action, op, cfg)


def after_host(
    state: State, metrics: Metrics, reward: torch.Tensor, tables: SpecTables, cfg: EngineConfig
) -> tuple[State, dict[str, torch.Tensor]]:
    """SPEC §4 steps 5-6 once the host epoch has run: record it; a diverged host collapses
    (SPEC §13) and ends the episode (terminated) with the divergence penalty; the last epoch
    truncates; COMMITTED settles on either; then the next observation and masks."""
    terminated = metrics["diverged"]
    state = collapse(record_epoch(state, metrics), terminated)
    truncated = state["epoch"] >= cfg.max_epochs
    reward = reward + settlement(state, terminated | truncated, cfg)
    reward = reward + DIVERGENCE_PENALTY * terminated.to(reward.dtype)
    state["episode_return"] = state["episode_return"] + reward
    out = emit(state, tables, cfg)
    out.update(
        reward=reward[:, None],
        terminated=terminated[:, None],
        truncated=truncated[:, None],
        done=(terminated | truncated)[:, None],
        episode_return=state["episode_return"],
    )
    return state, out


def step(
    state: State,
    aux: Aux,
    action: dict[str, torch.Tensor],
    advance: Advance,
    tables: SpecTables,
    cfg: EngineConfig,
    *,
    before: Callable[..., tuple] = before_host,
    after: Callable[..., tuple] = after_host,
) -> tuple[State, Aux, dict[str, torch.Tensor]]:
    """The whole step: ``before_host``, one host epoch (``advance(state, aux)`` -> metrics, aux),
    ``after_host``. ``before``/``after`` are these two functions, or compiled versions of them
    when ``advance`` itself cannot be compiled (real hosts)."""
    new, op, success, reward = before(state, action, tables, cfg)
    metrics, aux = advance(new, aux)
    aux = {k: v.contiguous() for k, v in aux.items()}  # one layout for step and reset graphs
    new, out = after(new, metrics, reward, tables, cfg)
    out.update(executed_op=op, success=success)
    return new, aux, out


def transition(
    state: State, action: dict[str, torch.Tensor], metrics: Metrics, tables: SpecTables, cfg: EngineConfig
) -> tuple[State, dict[str, torch.Tensor]]:
    """``step`` with the host epoch's metrics given by the caller (tests, benches, the oracle)."""
    new, _, out = step(state, {}, action, lambda s, a: (metrics, a), tables, cfg)
    return new, out


def first_epoch(fresh: State, metrics: Metrics) -> State:
    """A new episode's state after its first host epoch (recorded, collapsed if it diverged)."""
    return collapse(record_epoch(fresh, metrics), metrics["diverged"])


def after_reset(
    state: State, fresh: State, rows: torch.Tensor, tables: SpecTables, cfg: EngineConfig
) -> tuple[State, dict[str, torch.Tensor]]:
    """Take ``fresh`` for the envs in ``rows`` (others bit-identical) and observe every env,
    with reward 0 and done flags false."""
    state = reset_rows(state, fresh, rows)
    out = emit(state, tables, cfg)
    false = torch.zeros_like(rows)[:, None]
    out.update(
        reward=torch.zeros_like(state["val_acc"])[:, None],
        terminated=false,
        truncated=false,
        done=false,
        episode_return=state["episode_return"],
    )
    return state, out


def reset(
    state: State,
    aux: Aux,
    rows: torch.Tensor,
    keys: torch.Tensor,
    fresh: State,
    reset_aux: Callable[[Aux, torch.Tensor, torch.Tensor], Aux],
    advance: Advance,
    tables: SpecTables,
    cfg: EngineConfig,
) -> tuple[State, Aux, dict[str, torch.Tensor]]:
    """Start new episodes in ``rows`` over all E envs at once (``torch.where``, no gather): re-key
    the backend with ``keys``, run the first host epoch, then :func:`after_reset`."""
    fresh_aux = reset_aux(aux, rows, keys)
    metrics, fresh_aux = advance(fresh, fresh_aux)
    started = first_epoch(fresh, metrics)
    aux = {
        k: torch.where(rows.reshape((-1,) + (1,) * (v.dim() - 1)), fresh_aux[k], v).contiguous()
        for k, v in aux.items()
    }
    state, out = after_reset(state, started, rows, tables, cfg)
    return state, aux, out


def emit(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """Observation, blueprint indices and masks for the next decision; ``masks`` is
    ``{"head": [E, 8, K], "slot_by_op": [E, 6, S]}`` as uint8 0/1 flags (``masks.mask_flags``),
    which the engine turns into bool views after the graph. Also the outcome of the state
    reached, for evaluation and logging (policies do not read them): the real objective
    ``committed_gain`` (J in pp), ``acc_committed``, ``val_acc`` and ``fossils``."""
    obs, blueprint_index = observe(state, tables, cfg)
    return {
        "observation": obs,
        "blueprint_index": blueprint_index,
        "committed_gain": committed_gain(state),
        "acc_committed": state["acc_committed"],
        "val_acc": state["val_acc"],
        "fossils": (state["slots"]["stage"] == int(Stage.FOSSILIZED)).sum(-1).to(torch.float32),
        "masks": mask_flags(state, tables, cfg),
    }
