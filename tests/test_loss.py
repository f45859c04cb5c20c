"""FactoredPPOLoss against a hand-computed example, its forced-step and relevance rules, and the
TorchRL GAE plug-in."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import GAE

from esper_soa.agents.loss import FactoredPPOLoss
from esper_soa.agents.policy import ActorCritic
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import HEAD_NAMES, TOPOLOGY_BLUEPRINTS, Op, head_sizes
from esper_soa.env.esper_env import EsperEnv
from tests.helpers import pack_masks

S = 2
SIZES = head_sizes(S)
H = {h: i for i, h in enumerate(HEAD_NAMES)}


def flat_model(value: float) -> ActorCritic:
    """Uniform logits (all 0) and a constant value, whatever the observation."""
    ac = ActorCritic(S, hidden=8, depth=1)
    with torch.no_grad():
        ac.heads.logits.weight.zero_()
        ac.heads.logits.bias.zero_()
        ac.heads.value.weight.zero_()
        ac.heads.value.bias.fill_(value)
    return ac


def hand_batch() -> TensorDict:
    """Three steps: a GERMINATE decision, a WAIT decision, a forced WAIT (only WAIT valid)."""
    n = 3
    op = torch.zeros(n, len(Op), dtype=torch.bool)
    op[:, int(Op.WAIT)] = True
    op[0, int(Op.GERMINATE)] = True  # step 0: {WAIT, GERMINATE}
    op[1, int(Op.PRUNE)] = True  # step 1: {WAIT, PRUNE}
    slot_by_op = op[:, :, None].expand(n, len(Op), S).clone()  # every slot where the op is valid
    blueprint = torch.zeros(n, SIZES["blueprint"], dtype=torch.bool)
    blueprint[:, list(TOPOLOGY_BLUEPRINTS["cnn"])] = True  # 7 valid
    masks = {"op": op, "slot_by_op": slot_by_op, "blueprint": blueprint}
    for name in ("style", "tempo", "alpha_target", "alpha_speed", "alpha_curve"):
        masks[name] = torch.ones(n, SIZES[name], dtype=torch.bool)
    action = {h: torch.zeros(n, dtype=torch.int64) for h in HEAD_NAMES}
    action["op"] = torch.tensor([int(Op.GERMINATE), int(Op.WAIT), int(Op.WAIT)])
    action["slot"] = torch.tensor([1, 0, 0])
    action["blueprint"] = torch.tensor([1, 1, 1])
    # new (uniform) per-head log-probs; old ones chosen to give ratios op 1.5 / slot 0.7 (step 0)
    # and op 0.5 (step 1), every other ratio 1
    new = torch.zeros(n, len(HEAD_NAMES))
    new[0, H["op"]] = -math.log(2)
    new[0, H["slot"]] = -math.log(2)
    new[0, H["blueprint"]] = -math.log(7)
    new[0, H["style"]] = -math.log(4)
    new[0, H["tempo"]] = -math.log(3)
    new[0, H["alpha_target"]] = -math.log(3)
    new[1, H["op"]] = -math.log(2)
    old = new.clone()
    old[0, H["op"]] -= math.log(1.5)
    old[0, H["slot"]] -= math.log(0.7)
    old[1, H["op"]] -= math.log(0.5)
    return TensorDict(
        {
            "observation": torch.randn(n, 23 + 31 * S),
            "blueprint_index": torch.zeros(n, S, dtype=torch.int64),
            "masks": pack_masks(masks),
            "action": action,
            "head_log_prob": old,
            "advantage": torch.tensor([[2.0], [-1.0], [5.0]]),
            "value_target": torch.tensor([[3.0], [0.0], [2.0]]),
        },
        batch_size=[n],
    )


def test_loss_matches_the_hand_computed_example() -> None:
    loss = FactoredPPOLoss(flat_model(value=1.0))
    out = loss(hand_batch())
    # advantages normalised over the two decisions {2, -1}: mean .5, std 1.5 * sqrt(2)
    a = 1.5 / (1.5 * math.sqrt(2))  # = 0.7071
    # op head (steps 0, 1): min(1.5 a, 1.2 a) = 1.2 a and min(0.5 (-a), 0.8 (-a)) = -0.8 a
    op_obj = (1.2 * a - 0.8 * a) / 2
    slot_obj = 0.7 * a  # only step 0: min(0.7 a, 0.8 a)
    others = 4 * a  # blueprint, style, tempo, alpha_target: ratio 1 at step 0
    assert out["loss_objective"].item() == pytest.approx(-(op_obj + slot_obj + others), abs=1e-5)
    # uniform logits: normalised entropy 1 on every relevant head; none for alpha_speed/curve
    assert out["loss_entropy"].item() == pytest.approx(-0.05 * (1 + 1 + 1.3 + 1.2 + 1.3 + 1.2), abs=1e-6)
    torch.testing.assert_close(out["entropy"], torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0]))
    # value 1 vs targets (3, 0, 2), weights (1, 1, 0.2): 0.5 * (4 + 1 + 0.2) / 3
    assert out["loss_critic"].item() == pytest.approx(0.5 * 5.2 / 3, abs=1e-6)
    kl0 = 1.5 * 0.7 - 1 - math.log(1.5 * 0.7)
    kl1 = 0.5 - 1 - math.log(0.5)
    assert out["approx_kl"].item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(3 / 7)
    assert out["forced_fraction"].item() == pytest.approx(1 / 3)


def test_forced_steps_get_no_policy_gradient() -> None:
    loss = FactoredPPOLoss(flat_model(value=1.0))
    batch = hand_batch()
    base = loss(batch)
    batch["advantage"][2] = -100.0  # the forced step's advantage changes nothing but ...
    again = loss(batch)
    assert again["loss_objective"].item() == base["loss_objective"].item()
    assert again["loss_entropy"].item() == base["loss_entropy"].item()
    batch["value_target"][2] = 12.0  # ... its value error still counts, with weight 0.2
    moved = loss(batch)
    assert moved["loss_critic"].item() == pytest.approx(0.5 * (4 + 1 + 0.2 * 121) / 3, abs=1e-5)


def test_irrelevant_heads_get_no_gradient() -> None:
    model = flat_model(value=0.0)
    loss = FactoredPPOLoss(model, critic_coef=0.0)
    out = loss(hand_batch())
    (out["loss_objective"] + out["loss_entropy"]).backward()
    grad = model.heads.logits.bias.grad
    offsets = torch.tensor([0, *SIZES.values()]).cumsum(0)
    per_head = {h: grad[offsets[i] : offsets[i + 1]] for i, h in enumerate(HEAD_NAMES)}
    # alpha_speed / alpha_curve are relevant to no step of the batch (GERMINATE, WAIT, WAIT)
    assert torch.all(per_head["alpha_speed"] == 0) and torch.all(per_head["alpha_curve"] == 0)
    assert per_head["blueprint"].abs().sum() > 0 and per_head["slot"].abs().sum() > 0


def test_advantage_std_floor() -> None:
    batch = hand_batch()
    batch["advantage"] = torch.tensor([[0.02], [0.0], [0.0]])  # std 0.014 < floor 0.1
    batch["head_log_prob"] = FactoredPPOLoss(flat_model(0.0)).actor_critic.evaluate(batch)[0].head_log_prob(
        torch.stack([batch["action", h] for h in HEAD_NAMES], -1)
    ).detach()
    out = FactoredPPOLoss(flat_model(0.0))(batch)
    # ratios 1: objective = sum over heads of mean normalised advantage; with the floor the
    # normalised advantages are (+-0.01) / 0.1 = +-0.1: op head mean 0, step-0-only heads 0.1
    assert out["loss_objective"].item() == pytest.approx(-(0.0 + 5 * 0.1), abs=1e-5)


def test_is_a_torchrl_loss_with_a_gae_value_estimator() -> None:
    model = ActorCritic(3)
    loss = FactoredPPOLoss(model)
    assert isinstance(loss, LossModule)
    loss.make_value_estimator(ValueEstimators.GAE)
    gae = loss.value_estimator
    assert isinstance(gae, GAE) and gae.value_network is model.critic
    assert gae.gamma.item() == pytest.approx(0.995) and gae.lmbda.item() == pytest.approx(0.98)
    env = EsperEnv(EngineConfig(n_envs=4, max_epochs=3))
    with torch.no_grad():
        batch = env.rollout(5, model.policy, break_when_any_done=False)
        gae(batch)
    assert batch["advantage"].shape == (4, 5, 1) and batch["value_target"].shape == (4, 5, 1)
    out = loss(batch)
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the first evaluation of the stored batch: every ratio is 1 (up to float32 rounding: the
    # [E, T] batch sums log-probs in another order than the per-step [E] sampling; exact 0 held
    # for only some global RNG states, e.g. not after torch.manual_seed(3))
    assert abs(out["approx_kl"].item()) < 1e-6 and out["clip_fraction"].item() == 0.0
    with pytest.raises(NotImplementedError):
        loss.make_value_estimator(ValueEstimators.TD0)
