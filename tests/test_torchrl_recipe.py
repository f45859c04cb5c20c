"""TorchRL's own PPO recipe over EsperEnv (issue 18): ProbabilisticActor over the op-conditioned
composite distribution + ClipPPOLoss + GAE, with the default validate_actions=True."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.modules import MaskedCategorical

from esper_soa.agents.torchrl_recipe import (
    EsperActionDistribution,
    make_actor_critic,
    make_ppo_loss,
)
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import HEAD_NAMES, Op
from esper_soa.env.esper_env import EsperEnv
from tests.helpers import pack_masks

E = 8


def _env() -> EsperEnv:
    return EsperEnv(EngineConfig(n_envs=E, max_epochs=6, seed=4))  # validate_actions=True (default)


def _dist(op_logits: torch.Tensor, slot_logits: torch.Tensor, slot_by_op: torch.Tensor) -> EsperActionDistribution:
    n = op_logits.shape[0]
    sizes = {"op": 6, "slot": 3, "blueprint": 13, "style": 4, "tempo": 3, "alpha_target": 3, "alpha_speed": 4,
             "alpha_curve": 5}
    params = TensorDict({h: torch.zeros(n, k) for h, k in sizes.items()}, batch_size=[n])
    params["op"], params["slot"] = op_logits, slot_logits
    masks = TensorDict({h: torch.ones(n, k, dtype=torch.bool) for h, k in sizes.items() if h != "slot"}, batch_size=[n])
    masks["slot_by_op"] = slot_by_op
    return EsperActionDistribution(params, TensorDict(pack_masks(masks.to_dict()), batch_size=[n]))


def test_the_slot_is_drawn_and_scored_under_the_op() -> None:
    # op 1 allows slot 2 only, op 3 allows slots 0 and 1, other ops no slot (slot 0 then)
    slot_by_op = torch.zeros(1, 6, 3, dtype=torch.bool)
    slot_by_op[0, 1, 2] = True
    slot_by_op[0, 3, :2] = True
    dist = _dist(torch.randn(1, 6), torch.tensor([[5.0, 0.0, -5.0]]), slot_by_op)
    draws = dist.sample((2000,))
    op, slot = draws["action", "op"], draws["action", "slot"]
    assert bool((slot[op == 1] == 2).all()) and bool((slot[op == 3] < 2).all()) and bool((slot[op == 0] == 0).all())
    # log-prob of (op 1, slot 2): the slot is forced, so it adds exactly 0 despite its logit -5
    action = TensorDict({"action": {h: torch.zeros(1, dtype=torch.int64) for h in HEAD_NAMES}}, batch_size=[1])
    action["action", "op"], action["action", "slot"] = torch.tensor([1]), torch.tensor([2])
    lp = dist.log_prob_composite(action)
    assert lp["action", "slot_log_prob"].item() == pytest.approx(0.0, abs=1e-6)
    union = MaskedCategorical(logits=torch.tensor([[5.0, 0.0, -5.0]]), mask=slot_by_op.any(-2))
    assert union.log_prob(torch.tensor([2])).item() < -9  # what an unconditioned composite would score


def test_slot_entropy_is_the_chain_rule_conditional_entropy() -> None:
    slot_by_op = torch.rand(5, 6, 3) > 0.4
    op_logits, slot_logits = torch.randn(5, 6), torch.randn(5, 3)
    dist = _dist(op_logits, slot_logits, slot_by_op)
    expected = torch.zeros(5)
    p_op = op_logits.softmax(-1)
    for op in range(6):
        mask = slot_by_op[:, op].clone()
        mask[~mask.any(-1), 0] = True
        expected += p_op[:, op] * MaskedCategorical(logits=slot_logits, mask=mask).entropy()
    torch.testing.assert_close(dist.dists["action", "slot"].entropy(), expected)


def test_actor_samples_valid_actions_and_scores_them_as_sampled() -> None:
    env = _env()
    actor, critic = make_actor_critic(env, hidden=32)
    collector = Collector(env, actor, frames_per_batch=E * 12, total_frames=E * 12)
    batch = next(iter(collector))  # 12 steps, 2 episodes each: raises if any action were invalid
    collector.shutdown()
    assert batch["next", "done"].sum() == 2 * E
    ops = batch["action", "op"]
    assert (ops == int(Op.GERMINATE)).any() and (ops != int(Op.WAIT)).sum() > 0
    assert torch.equal(batch["next", "executed_op"], ops) and batch["next", "success"].dtype == torch.bool
    with torch.no_grad():
        scored = actor.get_dist(batch).log_prob_composite(batch.select("action"))
    for h in HEAD_NAMES:  # the stored per-head log-probs are re-derived exactly from the stored action
        key = ("action", f"{h}_log_prob")
        torch.testing.assert_close(scored[key], batch[key], msg=str(key))
    greedy = actor.get_dist(batch[:, :1]).mode  # the mode respects the op-conditioned mask too
    assert greedy["action", "op"].shape == (E, 1)


def test_recipe_trains_with_gae_and_a_replay_buffer() -> None:
    torch.manual_seed(0)
    env = _env()
    actor, critic = make_actor_critic(env, hidden=32)
    loss = make_ppo_loss(actor, critic)
    optim = torch.optim.Adam(loss.parameters(), lr=1e-3)
    buffer = ReplayBuffer(storage=LazyTensorStorage(E * 12), sampler=SamplerWithoutReplacement(), batch_size=32)
    collector = Collector(env, actor, frames_per_batch=E * 12, total_frames=E * 36)
    before = [p.detach().clone() for p in loss.parameters()]
    for i, batch in enumerate(collector):
        with torch.no_grad():
            loss.value_estimator(batch)
        buffer.extend(batch.reshape(-1))
        for j in range(3):
            out = loss(buffer.sample())
            if i == 0 and j == 0:  # first minibatch, parameters untouched: the ratio is exactly 1
                assert out["kl_approx"].abs().item() < 1e-6 and out["clip_fraction"].item() == 0
            total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
            assert math.isfinite(total.item())
            optim.zero_grad()
            total.backward()
            optim.step()
    collector.shutdown()
    assert any(not torch.equal(a, b) for a, b in zip(before, loss.parameters()))
