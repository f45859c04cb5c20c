"""The one mask layout (``head`` [E, 8, K], ``slot_by_op`` [E, 6, S]) from the compiled step to
the loss: what the rows hold, the padding, the views every consumer reads, and that the policy's
draws and stored-action log-probs agree with it."""

from __future__ import annotations

import numpy as np
import torch

from esper_soa.agents.policy import ActorCritic
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import (
    compute_masks,
    head_views,
    mask_flags,
)
from esper_soa.core.spec import (
    HEAD_NAMES,
    HEAD_RELEVANCE,
    SpecTables,
    head_sizes,
    mask_width,
    stack_action,
)
from esper_soa.core.state import as_dict, make_state
from esper_soa.core.step import transition
from esper_soa.env.engine import Engine
from esper_soa.env.esper_env import EsperEnv
from tests.helpers import random_action, random_metrics


def _states(cfg: EngineConfig, steps: int):
    """States along a random, mostly valid trajectory (seeds in every stage)."""
    tables = SpecTables(cfg.topology, cfg.n_slots, enabled_slots=cfg.enabled_slots)
    rng = np.random.default_rng(0)
    state = as_dict(make_state(cfg))
    for _ in range(steps):
        yield state, tables
        action = random_action(rng, compute_masks(state, tables, cfg), cfg.n_slots, p_arbitrary=0.0)
        state, _ = transition(state, action, random_metrics(rng, cfg.n_envs, cfg.n_slots), tables, cfg)


def test_head_rows_are_the_per_head_validity_padded_false_slot_row_the_union() -> None:
    cfg = EngineConfig(n_envs=6, n_slots=3, max_seeds=2, enabled_slots=(True, False, True))
    sizes = head_sizes(cfg.n_slots)
    seen_ops = torch.zeros(6, dtype=torch.bool)
    for state, tables in _states(cfg, 30):
        masks = compute_masks(state, tables, cfg)
        head, by_op = masks["head"], masks["slot_by_op"]
        assert head.dtype == by_op.dtype == torch.bool
        assert head.shape == (cfg.n_envs, len(HEAD_NAMES), mask_width(cfg.n_slots)) == (6, 8, 13)
        for h, name in enumerate(HEAD_NAMES):
            assert not head[:, h, sizes[name]:].any(), f"padding of {name} must be False"
        assert torch.equal(head[:, 0, :6], by_op.any(-1))  # an op is valid where it has a valid slot
        assert torch.equal(head[:, 1, :3], by_op.any(1))  # the slot row: union over ops
        assert torch.equal(head[:, 2, :13], tables.blueprint_valid.expand(6, 13))
        seen_ops |= head[:, 0, :6].any(0)
        views = head_views(masks)
        for h, name in enumerate(HEAD_NAMES):  # zero-copy views of the one buffer
            assert views[name].shape == (6, sizes[name])
            assert views[name].data_ptr() == head[:, h].data_ptr()
    assert seen_ops.all(), "the trajectory should make every op valid somewhere"


def test_the_compiled_step_emits_the_layout_as_uint8_and_bool_views_outside() -> None:
    cfg = EngineConfig(n_envs=4, max_epochs=10)
    engine = Engine(cfg)
    out = engine.reset()
    flags = mask_flags(engine.lifecycle_state, engine.tables, cfg)
    assert flags["head"].dtype == flags["slot_by_op"].dtype == torch.uint8
    # built head-major so the writes run over envs: envs are the unit-stride dimension
    assert flags["head"].stride()[0] == 1 and flags["slot_by_op"].stride()[0] == 1
    for key in ("head", "slot_by_op"):
        assert torch.equal(out["masks", key], flags[key].bool())
        assert out["masks", key].dtype == torch.bool and engine.masks[key] is out.get(("masks", key))


def test_policy_samples_are_valid_and_stored_log_probs_equal_the_sampling_ones() -> None:
    env = EsperEnv(n_envs=16, max_epochs=12, seed=2, validate_actions=True)  # the engine refuses invalid
    model = ActorCritic(env.cfg.n_slots, hidden=32)
    td = env.reset()
    relevance = torch.tensor(HEAD_RELEVANCE)
    for _ in range(12):
        td = model.policy(td)
        action = stack_action(td["action"])
        masks = td["masks"]
        rows = torch.arange(16)
        op = action[:, 0]
        assert masks["head"][rows, 0, op].all()
        assert (masks["slot_by_op"][rows, op, action[:, 1]] | ~relevance[op, 1]).all()
        for i in range(2, 8):
            assert (masks["head"][rows, i, action[:, i]] | ~relevance[op, i]).all()
        dist, _ = model.evaluate(td)
        torch.testing.assert_close(dist.head_log_prob(action), td["head_log_prob"], rtol=0, atol=1e-6)
        assert td["action", "op"].data_ptr() == td["action", "slot"].data_ptr() - 8  # views of one [E, 8]
        td = env.step(td)["next"]
