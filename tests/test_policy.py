"""Factored masked distribution and actor-critic (SPEC §9, §14): log-probs over causally relevant
heads, masks, hierarchical sampling, normalised entropy, and sampling-time == loss-time log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical

from esper_soa.agents.distribution import MASK_FILL, FactoredMaskedCategorical
from esper_soa.agents.policy import (
    ActorCritic,
    ObservationNormalizer,
    RewardNormalizer,
    RunningMeanStd,
    stored_action,
)
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.core.spec import HEAD_NAMES, HEAD_RELEVANCE, Op, head_sizes
from esper_soa.env.esper_env import EsperEnv
from tests.helpers import pack_masks

S = 3
SIZES = head_sizes(S)


def random_masks(gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """Consistent random masks: WAIT always valid (all slots), an op is valid iff its slot row
    has a valid slot, every other head has at least one valid entry."""
    slot_by_op = torch.rand(n, len(Op), S, generator=gen) < 0.5
    op_on = torch.rand(n, len(Op), generator=gen) < 0.6
    slot_by_op &= op_on[:, :, None]
    slot_by_op[:, int(Op.WAIT)] = True
    masks = {"op": slot_by_op.any(-1), "slot_by_op": slot_by_op}
    for name in HEAD_NAMES[2:]:
        m = torch.rand(n, SIZES[name], generator=gen) < 0.5
        m[torch.arange(n), torch.randint(SIZES[name], (n,), generator=gen)] = True
        masks[name] = m
    return masks


def random_logits(gen: torch.Generator, n: int, scale: float = 2.0) -> dict[str, torch.Tensor]:
    return {h: scale * torch.randn(n, SIZES[h], generator=gen) for h in HEAD_NAMES}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_log_prob_is_sum_over_relevant_heads(gen: torch.Generator) -> None:
    n = 512
    masks, logits = random_masks(gen, n), random_logits(gen, n)
    dist = FactoredMaskedCategorical.from_heads(logits, pack_masks(masks))
    action = sample_masked_action(pack_masks(masks), gen)
    expected = torch.zeros(n)
    for i, name in enumerate(HEAD_NAMES):
        if name == "slot":
            mask = masks["slot_by_op"][torch.arange(n), action[:, 0]]
        elif name == "op":
            mask = masks["op"]
        else:
            mask = masks[name]
        lp = Categorical(logits=logits[name].masked_fill(~mask, -float("inf"))).log_prob(action[:, i])
        relevant = torch.tensor(HEAD_RELEVANCE)[action[:, 0], i]
        expected += torch.where(relevant, lp, torch.zeros_like(lp))
    assert set(action[:, 0].tolist()) == set(range(len(Op)))  # every op is exercised
    torch.testing.assert_close(dist.log_prob(action), expected, atol=1e-5, rtol=1e-5)
    per_head = dist.head_log_prob(action)
    irrelevant = ~torch.tensor(HEAD_RELEVANCE)[action[:, 0]]
    assert torch.all(per_head[irrelevant] == 0)


def test_masked_actions_have_probability_zero(gen: torch.Generator) -> None:
    n = 256
    masks, logits = random_masks(gen, n), random_logits(gen, n)
    dist = FactoredMaskedCategorical.from_heads(logits, pack_masks(masks))
    op = sample_masked_action(pack_masks(masks), gen)[:, 0]  # a valid op: its slot row has a valid slot
    _, probs, head_masks = dist._log_probs(op)
    assert torch.all(probs[~head_masks] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(n, len(HEAD_NAMES)))
    # an action whose (relevant) slot is masked under its op: probability exactly 0
    germ = masks["slot_by_op"][:, int(Op.GERMINATE)]
    rows = (~germ).any(-1) & masks["op"][:, int(Op.GERMINATE)]
    assert rows.any()
    action = sample_masked_action(pack_masks(masks), gen)[rows]
    action[:, 0] = int(Op.GERMINATE)
    action[:, 1] = (~germ[rows]).float().argmax(-1)
    sub = FactoredMaskedCategorical.from_heads(
        {k: v[rows] for k, v in logits.items()}, pack_masks({k: v[rows] for k, v in masks.items()})
    )
    assert torch.all(sub.log_prob(action).exp() == 0)
    assert torch.all(sub.log_prob(action) < MASK_FILL / 2)


def test_sampling_never_returns_a_masked_action(gen: torch.Generator) -> None:
    n = 4096
    masks = random_masks(gen, n)
    # adversarial logits: masked entries are by far the most attractive
    logits = {}
    for name in HEAD_NAMES:
        m = masks["slot_by_op"].any(1) if name == "slot" else masks[name]
        logits[name] = torch.where(m, torch.zeros(m.shape), torch.full(m.shape, 50.0))
    # and the slot the op allows is the least attractive among the union of slots
    logits["slot"] = torch.where(masks["slot_by_op"][:, int(Op.WAIT)], 50.0, 0.0)
    dist = FactoredMaskedCategorical.from_heads(logits, pack_masks(masks))
    for action in (dist.sample(gen), dist.mode()):
        rows = torch.arange(n)
        assert torch.all(masks["op"][rows, action[:, 0]])
        assert torch.all(masks["slot_by_op"][rows, action[:, 0], action[:, 1]])
        for i, name in enumerate(HEAD_NAMES[2:], start=2):
            assert torch.all(masks[name][rows, action[:, i]])


def test_sampling_frequencies_follow_the_hierarchical_distribution(gen: torch.Generator) -> None:
    """Gumbel-max draws op ~ softmax(op logits | op mask), then slot ~ softmax(slot | slot_by_op[op])."""
    n = 40000
    masks = random_masks(gen, 1)
    masks["op"][:] = True
    masks["slot_by_op"][:] = True
    masks["slot_by_op"][0, int(Op.PRUNE)] = torch.tensor([False, True, True])
    logits = random_logits(gen, 1, scale=1.0)
    dist = FactoredMaskedCategorical.from_heads(
        {k: v.expand(n, -1) for k, v in logits.items()}, pack_masks({k: v.expand(n, *v.shape[1:]) for k, v in masks.items()})
    )
    action = dist.sample(gen)
    freq_op = torch.bincount(action[:, 0], minlength=len(Op)).float() / n
    torch.testing.assert_close(freq_op, torch.softmax(logits["op"][0], -1), atol=0.01, rtol=0)
    prune = action[:, 0] == int(Op.PRUNE)
    freq_slot = torch.bincount(action[prune, 1], minlength=S).float() / prune.sum()
    expected = torch.softmax(logits["slot"][0].masked_fill(torch.tensor([True, False, False]), -float("inf")), -1)
    torch.testing.assert_close(freq_slot, expected, atol=0.02, rtol=0)


def test_mode_is_the_hierarchical_argmax() -> None:
    masks = {k: v for k, v in random_masks(torch.Generator().manual_seed(3), 1).items()}
    masks["op"][:] = True
    masks["slot_by_op"][:] = True
    masks["slot_by_op"][0, int(Op.FOSSILIZE)] = torch.tensor([True, False, False])
    logits = {h: torch.zeros(1, n) for h, n in SIZES.items()}
    logits["op"][0, int(Op.FOSSILIZE)] = 3.0
    logits["slot"][0] = torch.tensor([0.0, 2.0, 1.0])  # slot 1 is best overall but masked for FOSSILIZE
    action = FactoredMaskedCategorical.from_heads(logits, pack_masks(masks)).mode()
    assert action[0, 0] == int(Op.FOSSILIZE) and action[0, 1] == 0


def test_entropy_is_normalised_per_head(gen: torch.Generator) -> None:
    n = 64
    masks = random_masks(gen, n)
    uniform = {h: torch.zeros(n, SIZES[h]) for h in HEAD_NAMES}
    action = sample_masked_action(pack_masks(masks), gen)
    dist = FactoredMaskedCategorical.from_heads(uniform, pack_masks(masks))
    ent = dist.entropy(action)
    rows = torch.arange(n)
    head_masks = dist.masks_given_op(action[:, 0])
    n_valid = head_masks.sum(-1)
    relevant = torch.tensor(HEAD_RELEVANCE)[action[:, 0]]
    expected = ((n_valid > 1) & relevant).float()  # uniform over >1 valid -> 1, else 0
    torch.testing.assert_close(ent, expected)
    assert torch.all(head_masks[rows, 1, : S] == masks["slot_by_op"][rows, action[:, 0]])
    # one valid entry -> 0 whatever the logits; skewed logits -> strictly between 0 and 1
    skewed = FactoredMaskedCategorical.from_heads(random_logits(gen, n), pack_masks(masks)).entropy(action)
    assert torch.all(skewed[n_valid == 1] == 0)
    several = (n_valid > 1) & relevant
    assert torch.all((skewed[several] > 0) & (skewed[several] < 1))


def test_entropy_of_a_single_valid_action_and_of_irrelevant_heads_is_zero() -> None:
    masks = random_masks(torch.Generator().manual_seed(5), 4)
    masks["op"][:] = False
    masks["op"][:, int(Op.WAIT)] = True  # forced: only WAIT
    dist = FactoredMaskedCategorical.from_heads(random_logits(torch.Generator().manual_seed(6), 4), pack_masks(masks))
    action = dist.sample()
    assert torch.all(action[:, 0] == int(Op.WAIT))
    assert torch.all(dist.entropy(action) == 0)
    assert torch.all(dist.log_prob(action) == 0)
    assert torch.all(dist.forced())


def _rollout(ac: ActorCritic, n_envs: int = 32, steps: int = 12) -> torch.Tensor:
    env = EsperEnv(EngineConfig(n_envs=n_envs, max_epochs=8, seed=7))
    with torch.no_grad():
        return env.rollout(steps, ac.policy, break_when_any_done=False)


def test_same_log_prob_at_sampling_and_loss_time() -> None:
    torch.manual_seed(0)
    ac = ActorCritic(S)
    ac.obs_norm.update(torch.randn(100, ac.obs_norm.mean.shape[0]))  # non-trivial normaliser
    batch = _rollout(ac)
    dist, _ = ac.evaluate(batch)
    action = stored_action(batch)
    assert torch.equal(dist.head_log_prob(action), batch["head_log_prob"])
    assert torch.equal(dist.log_prob(action), batch["sample_log_prob"])
    # a shuffled minibatch of the flattened rollout gives the same numbers
    flat = batch.reshape(-1)
    index = torch.randperm(flat.shape[0])[:100]
    sub_dist, _ = ac.evaluate(flat[index])
    sub_lp = sub_dist.head_log_prob(stored_action(flat[index]))
    torch.testing.assert_close(sub_lp, flat[index]["head_log_prob"], atol=1e-5, rtol=0)
    # every sampled action was valid: the env validates actions (validate_actions=True)


def test_actor_is_greedy_under_deterministic_exploration() -> None:
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    torch.manual_seed(0)
    ac = ActorCritic(S)
    env = EsperEnv(EngineConfig(n_envs=16, seed=3))
    td = env.reset()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        a = stored_action(ac.policy(td.clone()))
        b = stored_action(ac.policy(td.clone()))
        dist, _ = ac.evaluate(ac.policy(td.clone()))
    assert torch.equal(a, b) and torch.equal(a, dist.mode())
    ac.actor.deterministic = False  # forcing sampling overrides the exploration type
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        draws = torch.stack([stored_action(ac.policy(td.clone())) for _ in range(20)])
    assert not torch.all(draws == draws[0])


def test_blueprint_embedding_feeds_the_trunk() -> None:
    torch.manual_seed(0)
    ac = ActorCritic(S)
    bp = torch.tensor([[0, 0, 0], [7, 0, 0], [-1, 0, 0]])
    features = ac.trunk(torch.zeros(3, 23 + 31 * S), bp)
    assert not torch.allclose(features[0], features[1])
    assert not torch.allclose(features[0], features[2])  # empty (-1) is its own learned null row
    assert ac.trunk.embed.table.weight.shape == (14, 4)
    emb = ac.trunk.embed(torch.tensor([-1, 12]))
    assert torch.equal(emb[0], ac.trunk.embed.table.weight[13]) and torch.equal(emb[1], ac.trunk.embed.table.weight[12])


def test_lstm_state_is_carried_and_reset_on_is_init() -> None:
    from torchrl.envs import TransformedEnv

    torch.manual_seed(0)
    ac = ActorCritic(S, hidden=32, recurrent="lstm", lstm_hidden=16)
    env = TransformedEnv(EsperEnv(EngineConfig(n_envs=8, max_epochs=5, seed=1)))
    for t in ac.env_transforms():
        env.append_transform(t)
    with torch.no_grad():
        batch = env.rollout(12, ac.policy, break_when_any_done=False)
    h = batch["recurrent_state_h"]
    is_init = batch["is_init"].squeeze(-1)
    assert is_init[:, 0].all() and is_init[:, 5].all() and not is_init[:, 1:5].any()
    assert torch.all(h[:, 0] == 0) and torch.all(h[:, 5] == 0)  # zero state at episode starts
    assert h[:, 1:5].abs().sum() > 0  # carried inside an episode
    # recurrent re-evaluation of whole sequences reproduces the sampling-time log-probs
    dist, _ = ac.evaluate(batch)
    torch.testing.assert_close(dist.head_log_prob(stored_action(batch)), batch["head_log_prob"], atol=1e-5, rtol=0)


# --- normalisers -------------------------------------------------------------------------------
def test_running_mean_std_matches_the_pooled_moments() -> None:
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 5, generator=gen) * 3 + 2 for n in (7, 100, 1)]
    rms = RunningMeanStd((5,))
    for c in chunks:
        rms.update(c)
    pooled = torch.cat(chunks).double()
    torch.testing.assert_close(rms.mean, pooled.mean(0))
    torch.testing.assert_close(rms.var, pooled.var(0, unbiased=False))
    assert rms.count.item() == 108


def test_observation_normaliser_clips_and_round_trips_through_state_dict() -> None:
    norm = ObservationNormalizer(3, clip=10.0)
    norm.update(torch.tensor([[0.0, 1.0, 5.0], [0.0, 3.0, 5.0]]))
    out = norm(torch.tensor([[1.0, 2.0, 5.0]]))
    assert out[0, 0] == 10.0  # zero-variance feature: clipped, not inf
    assert abs(out[0, 1].item()) < 1e-6
    other = ObservationNormalizer(3)
    other.load_state_dict(norm.state_dict())
    assert torch.equal(other(torch.ones(1, 3)), norm(torch.ones(1, 3)))


def test_reward_normaliser_scales_by_return_std_without_centering() -> None:
    gamma = 0.9
    norm = RewardNormalizer(n_envs=2, gamma=gamma, clip=10.0)
    reward = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    done = torch.tensor([[False, True, False, False], [False, False, False, False]])
    scaled = norm(reward, done)
    returns = torch.tensor([[1.0, 1.9, 1.0, 1.9], [2.0, 1.8, 1.62, 1.458]], dtype=torch.float64)
    std = math.sqrt(returns.var(unbiased=False).item() + 1e-8)
    torch.testing.assert_close(scaled, reward / std)
    assert torch.all(scaled >= 0)  # no mean subtraction: signs are kept
    # running returns persist across rollouts (env 0 was reset after step 2, env 1 was not)
    torch.testing.assert_close(norm.running_return, torch.tensor([1.9, 1.458], dtype=torch.float64))
    torch.testing.assert_close(norm.scale(torch.tensor([1e6, -1e6, 1.0])), torch.tensor([10.0, -10.0, 1.0 / std]))
    off = RewardNormalizer(n_envs=2, gamma=gamma, enabled=False)
    assert torch.equal(off(reward, done), reward)
