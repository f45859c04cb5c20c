"""Differential property test: the batched engine against the per-env reference oracle.

For random configs and 200+ random steps over several envs (valid, masked and out-of-range
actions, random metrics, diverging hosts, resets of done envs and random partial resets), every
state field, mask, observation element, reward, done flag and executed op must agree after every
step. The batched side runs the engine's own step functions (``core.step``), so the step order,
collapse, settlement, divergence penalty and done flags are all compared with the oracle.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import compute_masks, head_views
from esper_soa.core.spec import SpecTables
from esper_soa.core.state import ENV_FIELDS, SLOT_FIELDS, as_dict, make_state
from esper_soa.core.step import after_host, after_reset, before_host, first_epoch
from esper_soa.reference import ReferenceEngine
from tests.helpers import random_action, random_metrics, to_numpy

configs = st.builds(
    dict,
    n_slots=st.integers(1, 4),
    gate_mode=st.sampled_from(["permissive", "strict"]),
    topology=st.sampled_from(["cnn", "transformer"]),
    auto_forward_g1=st.booleans(),
    auto_forward_g2=st.booleans(),
    auto_forward_g3=st.booleans(),
    max_seeds=st.sampled_from([0, 0, 1, 2]),
    reward_mode=st.sampled_from(["committed", "committed", "shaped", "shaped", "sparse", "minimal", "simplified"]),
    max_epochs=st.sampled_from([30, 150]),
)


def assert_state_equal(state: dict, ref_state: dict, step: int) -> None:
    for name in ENV_FIELDS:
        _close(state[name], ref_state[name], f"env.{name} at step {step}")
    for name in SLOT_FIELDS:
        _close(state["slots"][name], ref_state["slots"][name], f"slots.{name} at step {step}")


def _close(a: torch.Tensor, b: np.ndarray, what: str) -> None:
    a = a.cpu().numpy()
    assert a.shape == np.shape(b), f"{what}: shape {a.shape} vs reference {np.shape(b)}"
    if a.dtype.kind == "f":
        np.testing.assert_allclose(a, np.asarray(b, dtype=np.float64), rtol=1e-4, atol=1e-4, err_msg=what)
    else:
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=what)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, seed=st.integers(0, 2**31 - 1), n_envs=st.integers(2, 5))
def test_engine_matches_reference(config: dict, seed: int, n_envs: int) -> None:
    cfg = EngineConfig(n_envs=n_envs, **config)
    tables = SpecTables(cfg.topology, cfg.n_slots)
    rng = np.random.default_rng(seed)
    fresh = as_dict(make_state(cfg))
    metrics = random_metrics(rng, n_envs, cfg.n_slots)
    state = first_epoch(fresh, metrics)
    ref = ReferenceEngine(cfg)
    ref.reset_envs([True] * n_envs, to_numpy(metrics))
    assert_state_equal(state, ref.export_state(), 0)

    def reset(rows: np.ndarray, step: int) -> dict:
        """Both sides start new episodes in ``rows`` (the engine's reset functions)."""
        metrics = random_metrics(rng, n_envs, cfg.n_slots, p_diverged=0.05)
        new, out = after_reset(state, first_epoch(fresh, metrics), torch.as_tensor(rows), tables, cfg)
        ref.reset_envs(list(rows), to_numpy(metrics))
        assert_state_equal(new, ref.export_state(), step)
        _close(out["observation"], ref.observation(), f"observation after reset at step {step}")
        return new

    for step in range(1, 221):
        masks = compute_masks(state, tables, cfg)
        ref_masks = ref.masks()
        views = {**head_views(masks), "slot_by_op": masks["slot_by_op"]}
        for name, ref_mask in ref_masks.items():
            _close(views[name], ref_mask, f"mask {name} at step {step}")
        _close(views["slot"], ref_masks["slot_by_op"].any(1), f"mask slot (union over ops) at step {step}")
        action = random_action(rng, masks, cfg.n_slots)
        np_action = to_numpy(action)
        new, op, success, reward = before_host(state, action, tables, cfg)
        _close(reward, ref.reward(np_action), f"pre-action reward at step {step}")
        metrics = random_metrics(rng, n_envs, cfg.n_slots, p_diverged=0.02)
        state, out = after_host(new, metrics, reward, tables, cfg)
        ref_out = ref.transition(np_action, to_numpy(metrics))
        _close(out["reward"][:, 0], ref_out["reward"], f"reward at step {step}")
        for flag in ("terminated", "truncated", "done"):
            _close(out[flag][:, 0], ref_out[flag], f"{flag} at step {step}")
        _close(op, ref_out["executed_op"], f"executed op at step {step}")
        _close(success, ref_out["success"], f"success at step {step}")
        assert_state_equal(state, ref.export_state(), step)
        _close(out["observation"], ref.observation(), f"observation at step {step}")
        _close(out["blueprint_index"], ref.blueprint_index(), f"blueprint index at step {step}")
        done = out["done"][:, 0].numpy()
        if step % 50 == 0:  # and a random subset, done or not
            done = done | (rng.random(n_envs) < 0.5)
        if done.any():
            state = reset(done, step)
