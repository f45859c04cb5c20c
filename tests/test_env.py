"""EsperEnv: TorchRL spec checks, collector rollouts, partial resets, bad input, transforms."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs import (
    ObservationNorm,
    RewardSum,
    StepCounter,
    TransformedEnv,
    VecNormV2,
)
from torchrl.envs.utils import check_env_specs

from esper_soa.agents.baselines import RandomMaskedPolicy
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.core.spec import HEAD_NAMES, HEAD_RELEVANCE, Op
from esper_soa.core.validation import validate_action
from esper_soa.env.esper_env import EsperEnv


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_slots": 1, "topology": "transformer", "gate_mode": "strict"},
        {"n_slots": 4, "enabled_slots": (True, False, True, True), "reward_mode": "sparse"},
        {"auto_forward_g1": True, "auto_forward_g2": True, "auto_forward_g3": True, "max_seeds": 1},
    ],
)
def test_check_env_specs(overrides: dict) -> None:
    env = EsperEnv(n_envs=3, max_epochs=4, **overrides)
    check_env_specs(env, seed=1)
    check_env_specs(env, break_when_any_done="both")


def _collect(env: EsperEnv, frames: int, seed: int) -> TensorDict:
    env.set_seed(seed)
    policy = RandomMaskedPolicy(seed=seed)
    collector = Collector(
        env, policy, frames_per_batch=frames, total_frames=frames, auto_register_policy_transforms=False
    )
    policy.generator.manual_seed(seed)  # the collector probes the policy once while building
    batch = next(iter(collector))
    collector.shutdown()
    return batch


def test_collector_random_policy_respects_masks_and_matches_engine() -> None:
    cfg = EngineConfig(n_envs=4, n_slots=3, max_epochs=6, seed=3)
    env = EsperEnv(cfg)
    batch = _collect(env, frames=4 * 15, seed=7)  # [E, T] with two resets inside
    assert batch.shape == (4, 15)
    for t in range(batch.shape[1]):
        step = batch[:, t]
        action = {h: step["action", h] for h in HEAD_NAMES}
        masks = {k: v for k, v in step["masks"].items()}
        validate_action(action, masks, cfg)  # raises if any head is masked

    # the same trajectory by hand: engine + the same sampler and seed
    env2 = EsperEnv(cfg)
    env2.set_seed(7)
    generator = torch.Generator().manual_seed(7)
    out = env2.engine.reset()
    for t in range(batch.shape[1]):
        torch.testing.assert_close(out["observation"], batch[:, t]["observation"])
        action = sample_masked_action(env2.engine.masks, generator)  # [E, 8]
        for i, h in enumerate(HEAD_NAMES):
            assert torch.equal(action[:, i], batch[:, t]["action", h])
        out = env2.engine.step(action)
        torch.testing.assert_close(out["reward"], batch[:, t]["next", "reward"])
        torch.testing.assert_close(out["observation"], batch[:, t]["next", "observation"])
        if bool(out["done"].any()):
            out = env2.engine.reset(out["done"].squeeze(-1))
    assert bool(batch["next", "done"].any()), "the rollout should cross an episode boundary"


def test_partial_reset_touches_only_selected_rows() -> None:
    env = EsperEnv(n_envs=5, max_epochs=50, seed=2)
    td = env.reset()
    for _ in range(8):
        td = env.rand_step(td)
        td = td["next"]
    before = env.engine.state.clone()
    aux_before = {k: v.clone() for k, v in env.engine.aux.items()}
    rows = torch.tensor([False, True, False, False, True])
    env.reset(TensorDict({"_reset": rows[:, None]}, batch_size=[5]))
    after = env.engine.state
    for key, value in after.items(include_nested=True, leaves_only=True):
        assert torch.equal(value[~rows], before[key][~rows]), key
    for k, v in env.engine.aux.items():
        assert torch.equal(v[~rows], aux_before[k][~rows]), k
    assert bool((after["epoch"][rows] == 0).all()) and bool((before["epoch"][rows] == 8).all())


def _action(env: EsperEnv, **heads: list[int]) -> TensorDict:
    e = env.cfg.n_envs
    action = {h: torch.tensor(heads.get(h, [0] * e)) for h in HEAD_NAMES}
    return TensorDict({"action": action}, batch_size=[e])


def test_masked_action_raises_with_validation_and_waits_without() -> None:
    env = EsperEnv(n_envs=2, max_epochs=10)
    env.reset()
    prune_now = _action(env, op=[int(Op.PRUNE), 0])  # no seed anywhere: PRUNE is masked
    with pytest.raises(ValueError, match=r"action\['op'\] = 3 at env 0 is masked"):
        env.step(prune_now)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\), got 7"):
        env.step(_action(env, slot=[7, 0]))
    lenient = EsperEnv(n_envs=2, max_epochs=10, validate_actions=False)
    lenient.reset()
    lenient.step(prune_now)
    state = lenient.engine.state
    assert state["last_op"].tolist() == [int(Op.WAIT), int(Op.WAIT)]
    assert state["last_action_success"].tolist() == [0.0, 1.0]
    lenient.step(_action(lenient, op=[9, 0], slot=[-1, 0]))  # out of range: also WAIT
    assert lenient.engine.state["last_action_success"].tolist() == [0.0, 1.0]


def test_action_specs_track_masks() -> None:
    env = EsperEnv(n_envs=3, max_epochs=10)
    td = env.reset()
    heads = env.full_action_spec["action"]
    assert torch.equal(heads["op"].mask, td["masks", "head"][:, 0, : len(Op)])
    td = env.rand_step(td)
    assert torch.equal(heads["op"].mask, td["next", "masks", "head"][:, 0, : len(Op)])
    slot = HEAD_NAMES.index("slot")  # the slot leaf: the union over ops, a view of the head mask
    assert torch.equal(heads["slot"].mask, td["next", "masks", "slot_by_op"].any(1))
    assert heads["slot"].mask.data_ptr() == env.engine.masks["head"][:, slot].data_ptr()
    # rand_action samples the slot conditioned on the op (SPEC §9)
    for _ in range(10):
        a = env.rand_action(td["next"].clone())
        relevant = torch.tensor(HEAD_RELEVANCE)[a["action", "op"]]
        ok = td["next", "masks", "slot_by_op"][torch.arange(3), a["action", "op"], a["action", "slot"]]
        assert bool((ok | ~relevant[:, 1]).all())


def test_transforms_step_counter_reward_sum_and_normalisers() -> None:
    base = EsperEnv(n_envs=3, max_epochs=5)
    env = TransformedEnv(base, StepCounter())
    env.append_transform(RewardSum())
    env.append_transform(ObservationNorm(in_keys=["observation"], standard_normal=True))
    env.transform[-1].init_stats(num_iter=6, reduce_dim=(0, 1), cat_dim=1)
    env.append_transform(VecNormV2(in_keys=["observation"], decay=0.99))
    check_env_specs(env)
    rollout = env.rollout(12, break_when_any_done=False)
    steps = rollout["next", "step_count"].squeeze(-1)
    assert steps[0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
    rewards = rollout["next", "reward"].squeeze(-1)
    episode_reward = rollout["next", "episode_reward"].squeeze(-1)
    torch.testing.assert_close(episode_reward[:, 4], rewards[:, :5].sum(1))
    assert torch.isfinite(rollout["next", "observation"]).all()
