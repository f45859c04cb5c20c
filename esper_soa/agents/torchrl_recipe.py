"""TorchRL's own PPO recipe for :class:`EsperEnv`: ``ProbabilisticActor`` + ``ClipPPOLoss`` + ``GAE``.

TorchRL's multi-head recipe puts one ``MaskedCategorical`` per head into a
``CompositeDistribution``. For the Esper action that is not enough: the slot a valid action may
use depends on the op (``masks["slot_by_op"]``), and a composite of independent heads samples
the slot from the union over ops, so it draws invalid (op, slot) pairs that the env refuses.
:class:`EsperActionDistribution` is that composite with one change: the slot component is
conditioned on the op, both when sampling (op first, then a slot ``slot_by_op[op]`` allows)
and when scoring a stored action (the mask is re-derived from the stored op and stored masks,
so the log-prob at loss time is the one at sampling time). Its entropy follows the chain rule,
``H(slot | op) = sum_op p(op) H(slot | op)``, so ``ClipPPOLoss``'s analytic entropy stays exact.

Everything else is stock TorchRL: per-head log-probs (``("action", "<head>_log_prob")``), the
summed ``action_log_prob``, per-head entropies, ``ClipPPOLoss`` with ``GAE``. Use it to plug the
env into TorchRL tooling (other losses, replay buffers, collectors). The project's
:class:`~esper_soa.agents.loss.FactoredPPOLoss` adds what this recipe leaves out (SPEC §14): log-probs
and entropies over the causally relevant heads only, entropies normalised by ``log(n_valid)``
with per-head multipliers, the forced-step value weight; it is what ``esper-soa train`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import CompositeDistribution, TensorDictModule
from tensordict.utils import NestedKey
from torch import distributions as D
from torch import nn
from torchrl.data import ReplayBuffer
from torchrl.modules import MaskedCategorical, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from esper_soa.core.masks import head_views, slot_mask_given_op
from esper_soa.core.spec import ACTION_KEYS, GAMMA, HEAD_NAMES, head_sizes
from esper_soa.env.esper_env import EsperEnv

_OP, _SLOT = ("action", "op"), ("action", "slot")


def _slot_mask(slot_by_op: torch.Tensor, op: torch.Tensor | None) -> torch.Tensor:
    """``slot_by_op[op]`` (``op`` None: every op, ``[..., 6, S]``); a row with no valid slot (WAIT)
    allows slot 0 only, which is what the env's own samplers draw there."""
    if op is not None:
        slot_by_op = slot_by_op.expand(*op.shape[: op.dim() - slot_by_op.dim() + 2], *slot_by_op.shape)
        slot_by_op = slot_mask_given_op(slot_by_op, op)
    first = torch.arange(slot_by_op.shape[-1], device=slot_by_op.device) == 0
    return slot_by_op | (~slot_by_op.any(-1, keepdim=True) & first)


class OpHead(MaskedCategorical):
    """The op component: a ``MaskedCategorical`` that remembers its last sample, because TorchRL's
    ``sample_and_log_prob`` draws a composite's components one by one, in order (op first)."""

    last_sample: torch.Tensor | None = None

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> torch.Tensor:
        self.last_sample = super().sample(sample_shape)
        return self.last_sample


class OpConditionedSlot(D.Distribution):
    """The slot component of :class:`EsperActionDistribution`: its mask is ``slot_by_op[op]``.

    Drawn on its own (TorchRL's component-by-component sampling), it uses the op its
    :class:`OpHead` just drew; scored by the composite, the stored op. ``entropy()`` is the
    conditional entropy ``sum_op p(op) H(slot | op)``.
    """

    arg_constraints: dict = {}

    def __init__(self, logits: torch.Tensor, slot_by_op: torch.Tensor, op_dist: OpHead) -> None:
        self.logits, self.slot_by_op, self.op_dist = logits, slot_by_op, op_dist
        super().__init__(batch_shape=logits.shape[:-1], validate_args=False)

    def given(self, op: torch.Tensor) -> MaskedCategorical:
        """The slot distribution under ``op`` (any leading sample dims)."""
        logits = self.logits.expand(*op.shape, self.logits.shape[-1])
        return MaskedCategorical(logits=logits, mask=_slot_mask(self.slot_by_op, op))

    def _sampled_op(self) -> torch.Tensor:
        if self.op_dist.last_sample is None:
            raise RuntimeError("OpConditionedSlot: expected the op to be drawn first, got no op sample")
        return self.op_dist.last_sample

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> torch.Tensor:
        return self.given(self._sampled_op()).sample()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.given(self._sampled_op()).log_prob(value)

    def entropy(self) -> torch.Tensor:
        per_op = MaskedCategorical(
            logits=self.logits.unsqueeze(-2).expand(*self.slot_by_op.shape), mask=_slot_mask(self.slot_by_op, None)
        ).entropy()
        return (self.op_dist.probs * per_op).sum(-1)


class EsperActionDistribution(CompositeDistribution):
    """A ``CompositeDistribution`` of one ``MaskedCategorical`` per action head, the slot head
    conditioned on the op (module docstring). Built by ``ProbabilisticActor`` from
    ``params`` (``{head: logits}``) and the env's ``masks`` entry."""

    def __init__(
        self,
        params: TensorDictBase,
        masks: TensorDictBase,
        *,
        log_prob_key: NestedKey | None = None,
        entropy_key: NestedKey | None = None,
    ) -> None:
        per_head = head_views(masks)  # zero-copy [..., n_head] views of masks["head"]
        dists: dict[NestedKey, D.Distribution] = {
            ("action", h): (OpHead if h == "op" else MaskedCategorical)(logits=params.get(h), mask=per_head[h])
            for h in HEAD_NAMES
            if h != "slot"
        }
        dists[_SLOT] = OpConditionedSlot(params.get("slot"), masks.get("slot_by_op"), dists[_OP])
        self._batch_shape = params.shape
        self.dists = {k: dists[k] for k in ACTION_KEYS}  # contract order
        self.log_prob_key = log_prob_key
        self.entropy_key = entropy_key
        self.aggregate_probabilities = None

    def _draw(self, shape: torch.Size | None) -> TensorDictBase:
        """Op first, then the slot under ``slot_by_op[op]``, then the other heads; ``shape``
        None: the modes."""

        def pick(dist: D.Distribution, extra: torch.Size) -> torch.Tensor:
            return dist.mode if shape is None else dist.sample(extra)

        op = pick(self.dists[_OP], shape)
        out = {_OP: op, _SLOT: pick(self.dists[_SLOT].given(op), torch.Size())}  # op carries the sample dims
        out.update({k: pick(d, shape) for k, d in self.dists.items() if k not in out})
        return TensorDict({k: out[k] for k in ACTION_KEYS}, op.shape)

    def sample(self, shape: Sequence[int] | None = None) -> TensorDictBase:
        return self._draw(torch.Size(shape or ()))

    def rsample(self, shape: Sequence[int] | None = None) -> TensorDictBase:
        raise NotImplementedError("EsperActionDistribution is discrete: no reparameterised samples")

    @property
    def mode(self) -> TensorDictBase:
        return self._draw(None)

    @property
    def deterministic_sample(self) -> TensorDictBase:
        return self.mode

    def _head_log_probs(self, sample: TensorDictBase) -> dict[NestedKey, torch.Tensor]:
        lp = {}
        for key, dist in self.dists.items():
            dist = dist.given(sample.get(_OP)) if key == _SLOT else dist
            lp[key] = dist.log_prob(sample.get(key))
        return lp

    def log_prob(self, sample: TensorDictBase) -> torch.Tensor | TensorDictBase:
        from tensordict.nn import composite_lp_aggregate

        if not composite_lp_aggregate():
            return self.log_prob_composite(sample)
        return sum(self._head_log_probs(sample).values())

    def log_prob_composite(self, sample: TensorDictBase, *, include_sum: bool | None = None) -> TensorDictBase:
        from tensordict.nn import composite_lp_aggregate

        include_sum = composite_lp_aggregate() if include_sum is None else include_sum
        lp = self._head_log_probs(sample)
        out = {(k[0], f"{k[1]}_log_prob"): v for k, v in lp.items()}
        if include_sum:
            out[self.log_prob_key] = sum(lp.values())
        return sample.empty(recurse=True).update(out).filter_empty_()


class _Heads(nn.Module):
    """Observation -> one logits tensor per head (an MLP trunk and one linear layer)."""

    def __init__(self, obs_dim: int, n_slots: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.sizes = head_sizes(n_slots)
        self.trunk = _mlp(obs_dim, hidden, depth)
        self.out = nn.Linear(hidden, sum(self.sizes.values()))

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.out(self.trunk(observation)).split(list(self.sizes.values()), dim=-1))


def _mlp(obs_dim: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.LayerNorm(obs_dim)]  # the raw features span several scales
    for i in range(depth):
        layers += [nn.Linear(obs_dim if i == 0 else hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers)


def make_actor_critic(env: EsperEnv, hidden: int = 64, depth: int = 2) -> tuple[ProbabilisticActor, ValueOperator]:
    """A ``ProbabilisticActor`` over :class:`EsperActionDistribution` (writes ``("action", head)``,
    per-head ``_log_prob`` entries and ``action_log_prob``) and a ``ValueOperator`` critic, both
    reading ``observation`` (and the actor ``masks``)."""
    obs_dim, n_slots = env.cfg.obs_dim, env.cfg.n_slots
    heads = TensorDictModule(
        _Heads(obs_dim, n_slots, hidden, depth), in_keys=["observation"], out_keys=[("params", h) for h in HEAD_NAMES]
    )
    actor = ProbabilisticActor(
        heads,
        in_keys={"params": "params", "masks": "masks"},
        out_keys=list(ACTION_KEYS),
        distribution_class=EsperActionDistribution,
        return_log_prob=True,
        spec=env.full_action_spec,
    )
    critic = ValueOperator(nn.Sequential(_mlp(obs_dim, hidden, depth), nn.Linear(hidden, 1)), in_keys=["observation"])
    return actor, critic


def make_ppo_loss(
    actor: ProbabilisticActor,
    critic: ValueOperator,
    *,
    clip_epsilon: float = 0.2,
    entropy_coeff: float = 0.01,
    critic_coeff: float = 0.5,
    gamma: float = GAMMA,
    lmbda: float = 0.95,
) -> ClipPPOLoss:
    """``ClipPPOLoss`` for the actor/critic of :func:`make_actor_critic`, with a ``GAE`` value
    estimator (``loss.value_estimator(batch)`` writes ``advantage`` and ``value_target``)."""
    loss = ClipPPOLoss(
        actor, critic, clip_epsilon=clip_epsilon, entropy_coeff=entropy_coeff, critic_coeff=critic_coeff
    )
    loss.make_value_estimator(GAE, gamma=gamma, lmbda=lmbda, value_network=critic)
    return loss




def ppo_update(
    loss: nn.Module, optim: torch.optim.Optimizer, buffer: ReplayBuffer, batch: TensorDictBase,
    params: Sequence[torch.Tensor], epochs: int, max_grad_norm: float = 5.0, kl_key: NestedKey | None = None,
    target_kl: float = math.inf,
) -> TensorDictBase:
    """One PPO update on a collected ``batch``: the loss's value estimator writes the advantages,
    ``buffer`` is refilled with the flattened batch, then ``epochs`` passes over its minibatches of
    the sum of ``loss_objective``, ``loss_critic`` and ``loss_entropy``, gradients of ``params``
    clipped to ``max_grad_norm``.

    With ``kl_key``, the update stops (before stepping) at the first minibatch whose
    ``out[kl_key]`` exceeds ``target_kl``. Returns the last loss output (for logging).
    """
    with torch.no_grad():
        loss.value_estimator(batch)
    buffer.empty()
    buffer.extend(batch.reshape(-1))
    out = None
    for _ in range(epochs):
        for minibatch in buffer:
            out = loss(minibatch)
            if kl_key is not None and out[kl_key].item() > target_kl:
                return out
            optim.zero_grad()
            (out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]).backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optim.step()
    if out is None:
        raise ValueError(f"ppo_update: expected epochs >= 1 and a non-empty buffer, got epochs={epochs}")
    return out
