"""PPO loss for the factored Esper action (SPEC §14) as a TorchRL ``LossModule``.

What differs from TorchRL's ``ClipPPOLoss``, and why:

- **Per-head clipped ratios.** Each action head gets its own ratio ``exp(lp_h - lp_h_old)`` and
  its own clipped surrogate, averaged over the samples where that head is causally relevant
  (SPEC §9), and the heads' objectives are summed. A head that did not influence the transition
  (e.g. ``blueprint`` under PRUNE) gets no gradient and cannot eat the clip budget of the others.
- **Forced steps** (only WAIT valid) carry no decision: no policy gradient, no entropy, and their
  value error is weighted ``forced_value_weight`` (0.2) instead of 1.
- **Normalised per-head entropy** with per-head coefficients (base 0.05 x multipliers).
- **Advantage normalisation** over the non-forced samples of the batch, std floored at 0.1 so
  near-constant advantages are not blown up.

The distribution is re-evaluated on the stored action and the stored masks (never resampled),
so the new log-prob equals the rollout's before the first gradient step. ``GAE`` plugs in via
``make_value_estimator`` / ``value_estimator`` like any TorchRL loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import GAE

from esper_soa.agents.policy import ActorCritic, local_sum, stored_action
from esper_soa.core.spec import GAMMA, HEAD_NAMES

ENTROPY_MULTIPLIERS = {
    "op": 1.0,
    "slot": 1.0,
    "blueprint": 1.3,
    "style": 1.2,
    "tempo": 1.3,
    "alpha_target": 1.2,
    "alpha_speed": 1.2,
    "alpha_curve": 1.2,
}
GAE_LAMBDA = 0.98


ShardSum = Callable[[torch.Tensor], torch.Tensor]


def _masked_mean(x: torch.Tensor, weight: torch.Tensor, dim: int = 0, shards: ShardSum = local_sum) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``weight`` is set (0 when nothing is). With data-parallel
    ``shards`` the count is global, so each rank returns its share and the shares sum to the mean."""
    weight = weight.to(x.dtype)
    return (x * weight).sum(dim) / shards(weight.sum(dim)).clamp(min=1.0)


def _variance(x: torch.Tensor, shards: ShardSum) -> torch.Tensor:
    """Unbiased variance of all elements of ``x`` over every shard (two passes)."""
    n = shards(torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device))
    mean = shards(x.sum()) / n
    return shards((x - mean).square().sum()) / (n - 1).clamp(min=1.0)


class FactoredPPOLoss(LossModule):
    """Clipped PPO with per-head ratios for :class:`~esper_soa.agents.policy.ActorCritic`.

    Reads from the batch: the policy's in-keys (observation, blueprint index, masks, and the
    recurrent state for the LSTM), ``("action", head)``, ``head_log_prob`` ``[..., 8]`` from
    the rollout, ``advantage`` and ``value_target`` ``[..., 1]`` (written by GAE).

    Returns a TensorDict with ``loss_objective``, ``loss_critic``, ``loss_entropy`` (sum them to
    get the loss) and detached diagnostics: ``approx_kl`` (joint, non-forced samples),
    ``clip_fraction`` (over relevant head-samples), ``entropy`` ``[8]`` (normalised, per head),
    ``forced_fraction``, ``explained_variance``.

    Data-parallel training sets ``sum_over_shards`` (an all-reduce sum; identity in one process):
    advantage normalisation and every diagnostic then use the whole batch, all ranks' shards
    together, and each rank's three loss terms are its *share* of the global loss, so the sum
    of the ranks' gradients (DDP with a sum hook) is the gradient of the whole batch's loss.
    """

    @dataclass
    class _AcceptedKeys:
        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        sample_log_prob: NestedKey = "sample_log_prob"
        head_log_prob: NestedKey = "head_log_prob"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

    default_value_estimator = ValueEstimators.GAE

    def __init__(
        self,
        actor_critic: ActorCritic,
        *,
        clip_epsilon: float = 0.2,
        entropy_coef: float = 0.05,
        entropy_multipliers: Mapping[str, float] | None = None,
        critic_coef: float = 0.5,
        forced_value_weight: float = 0.2,
        normalize_advantage: bool = True,
        advantage_std_floor: float = 0.1,
        gamma: float = GAMMA,
        lmbda: float = GAE_LAMBDA,
    ) -> None:
        super().__init__()
        multipliers = dict(ENTROPY_MULTIPLIERS if entropy_multipliers is None else entropy_multipliers)
        if set(multipliers) != set(HEAD_NAMES):
            raise ValueError(
                f"entropy_multipliers: expected one entry per head {HEAD_NAMES}, got {sorted(multipliers)}"
            )
        self.actor_critic = actor_critic
        self.clip_epsilon = clip_epsilon
        self.critic_coef = critic_coef
        self.forced_value_weight = forced_value_weight
        self.normalize_advantage = normalize_advantage
        self.advantage_std_floor = advantage_std_floor
        self.gamma = gamma
        self.lmbda = lmbda
        self.sum_over_shards: ShardSum = local_sum
        coefs = torch.tensor([entropy_coef * multipliers[h] for h in HEAD_NAMES], dtype=torch.float32)
        self.register_buffer("entropy_coefs", coefs)

    # --- TorchRL plumbing -------------------------------------------------------------------
    @property
    def in_keys(self) -> list:
        keys = self.actor_critic.in_keys + [(self.tensor_keys.action, h) for h in HEAD_NAMES]
        return keys + [self.tensor_keys.head_log_prob, self.tensor_keys.advantage, self.tensor_keys.value_target]

    @property
    def out_keys(self) -> list:
        return ["loss_objective", "loss_critic", "loss_entropy"]

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams) -> FactoredPPOLoss:
        """GAE with SPEC §14 defaults (gamma .995, lambda .98) over the actor-critic's critic.

        Pass ``value_network=None`` to use values already stored in the batch
        (``state_value`` and ``("next", "state_value")``)."""
        value_type = self.default_value_estimator if value_type is None else value_type
        if value_type != ValueEstimators.GAE:
            raise NotImplementedError(f"FactoredPPOLoss supports ValueEstimators.GAE, got {value_type}")
        hyperparams.setdefault("gamma", self.gamma)
        hyperparams.setdefault("lmbda", self.lmbda)
        hyperparams.setdefault("value_network", self.actor_critic.critic)
        self.value_type = value_type
        self._value_estimator = GAE(**hyperparams)
        self._value_estimator.set_keys(
            advantage=self.tensor_keys.advantage,
            value_target=self.tensor_keys.value_target,
            value=self.tensor_keys.value,
            reward=self.tensor_keys.reward,
            done=self.tensor_keys.done,
            terminated=self.tensor_keys.terminated,
        )
        return self

    # --- the loss ---------------------------------------------------------------------------
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        keys = self.tensor_keys
        dist, value = self.actor_critic.evaluate(tensordict)
        action = stored_action(tensordict, keys.action)
        n_heads = action.shape[-1]
        # flatten every batch dim ([B] for the MLP, [B, T] for the LSTM): reductions are over samples
        new_lp, entropy = (x.reshape(-1, n_heads) for x in dist.log_prob_and_entropy(action))
        forced = dist.forced().reshape(-1)
        action = action.reshape(-1, n_heads)
        relevance = dist.relevance(action[:, 0]) & ~forced[:, None]
        old_lp = tensordict.get(keys.head_log_prob).reshape(action.shape)
        advantage = tensordict.get(keys.advantage).reshape(-1)
        target = tensordict.get(keys.value_target).reshape(-1)
        value = value.reshape(-1)
        shards = self.sum_over_shards

        decided = ~forced
        if self.normalize_advantage:
            n_decided = shards(decided.sum())
            mean = shards(_masked_mean(advantage, decided, shards=shards))
            var = shards(_masked_mean((advantage - mean).square(), decided, shards=shards)) * (
                n_decided.clamp(min=1) / (n_decided - 1).clamp(min=1)
            )
            advantage = (advantage - mean) / var.sqrt().clamp(min=self.advantage_std_floor)

        log_ratio = new_lp - old_lp  # [N, H], 0 on irrelevant heads
        ratio = log_ratio.exp()
        adv = advantage[:, None]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon) * adv)
        loss_objective = -_masked_mean(surrogate, relevance, shards=shards).sum()

        head_entropy = _masked_mean(entropy, relevance, shards=shards)  # [H]
        loss_entropy = -(self.entropy_coefs.to(entropy.dtype) * head_entropy).sum()

        weight = torch.where(forced, torch.full_like(value, self.forced_value_weight), torch.ones_like(value))
        error = value - target
        value_norm = self.actor_critic.value_norm
        if value_norm is not None:  # regress in normalised units
            error = error / value_norm.std.to(error.dtype)
        n_samples = shards(torch.tensor(float(value.numel()), dtype=value.dtype, device=value.device))
        loss_critic = self.critic_coef * (weight * error.square()).sum() / n_samples

        with torch.no_grad():
            joint = log_ratio.sum(-1)
            approx_kl = shards(_masked_mean(joint.exp() - 1 - joint, decided, shards=shards))
            clipped = ((ratio - 1).abs() > self.clip_epsilon) & relevance
            clip_fraction = shards(clipped.sum()) / shards(relevance.sum()).clamp(min=1)
            explained_variance = 1 - _variance(target - value, shards) / _variance(target, shards).clamp(min=1e-8)
        return TensorDict(
            {
                "loss_objective": loss_objective,
                "loss_critic": loss_critic,
                "loss_entropy": loss_entropy,
                "approx_kl": approx_kl,
                "clip_fraction": clip_fraction,
                "entropy": shards(head_entropy.detach()),
                "forced_fraction": shards(forced.float().sum()) / n_samples,
                "explained_variance": explained_variance,
            },
            batch_size=[],
        )

