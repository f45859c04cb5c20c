"""The factored, masked action distribution of SPEC §9 and §14.

Eight categorical heads (``HEAD_NAMES``) live in one padded tensor ``[..., H, K]`` (H = 8,
K = the largest head) so that sampling, log-probs and entropies are a handful of whole-tensor
ops, never a loop over envs. Three rules make it the Esper distribution rather than a product
of independent categoricals:

- **Hierarchical slot mask.** The slot head is masked by ``slot_by_op[op]``, the row of the op
  that was drawn (sampling) or stored (evaluation). The mask is therefore a function of the
  action, and evaluating a stored action re-derives exactly the mask it was drawn under.
- **Causal relevance.** ``log_prob`` sums only the heads ``HEAD_RELEVANCE[op]`` marks as
  relevant; irrelevant heads contribute 0 to the log-prob and to the entropy, so the gradient
  never credits a head that did not influence the transition.
- **Normalised entropy.** Per head, ``H / log(n_valid)``: 1 for uniform logits over the valid
  entries, 0 where a single entry is valid (nothing to explore).

TorchRL's composite distributions resample conditioned heads independently at loss time, so
the op-conditioned slot mask would not be reproduced; this class is evaluated on the stored
action and the stored masks instead, giving the same log-prob at sampling and at loss time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from esper_soa.core.masks import gumbel_like, masked_draw, masks_given_op
from esper_soa.core.spec import HEAD_NAMES, HEAD_RELEVANCE, Op

MASK_FILL = -1e4  # masked logit (SPEC §14): exp(-1e4) underflows to exactly 0 in float32
N_HEADS = len(HEAD_NAMES)


@functools.cache
def _relevance_table(device: torch.device) -> torch.Tensor:
    """``HEAD_RELEVANCE`` as a ``[6, H]`` bool tensor, built once per device."""
    return torch.tensor(HEAD_RELEVANCE, dtype=torch.bool, device=device)


class FactoredMaskedCategorical:
    """Distribution over the 8-head Esper action (see the module docstring).

    Args:
        logits: ``[..., H, K]`` raw logits, heads in ``HEAD_NAMES`` order, padded on the right.
        head_masks: ``[..., H, K]`` bool validity per head, the env's ``masks["head"]`` as it
            comes (padding False); the slot row is replaced by ``slot_by_op[op]`` under an op.
        slot_by_op: ``[..., 6, S]`` bool, per-op slot validity.
    """

    def __init__(self, logits: torch.Tensor, head_masks: torch.Tensor, slot_by_op: torch.Tensor) -> None:
        if logits.shape != head_masks.shape or logits.shape[-2] != N_HEADS:
            raise ValueError(
                f"logits/head_masks: expected equal shapes [..., {N_HEADS}, K], got "
                f"{tuple(logits.shape)} and {tuple(head_masks.shape)}"
            )
        self.logits = logits
        self.head_masks = head_masks
        self.slot_by_op = slot_by_op
        self._relevance = _relevance_table(logits.device)

    @classmethod
    def from_heads(
        cls, logits: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> FactoredMaskedCategorical:
        """Build from per-head logits ``{head: [..., n_head]}`` (padded here to the masks' width)
        and the env's ``masks`` (``head``, ``slot_by_op``)."""
        width = masks["head"].shape[-1]
        padded = []
        for name in HEAD_NAMES:
            t = logits[name]
            padded.append(torch.cat([t, t.new_zeros(*t.shape[:-1], width - t.shape[-1])], dim=-1))
        return cls(torch.stack(padded, dim=-2), masks["head"], masks["slot_by_op"])

    # --- masks under a known op -------------------------------------------------------------
    def masks_given_op(self, op: torch.Tensor) -> torch.Tensor:
        """``[..., H, K]`` masks with the slot row taken from ``slot_by_op[op]``."""
        return masks_given_op(self.head_masks, self.slot_by_op, op)

    def _log_probs(self, op: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs, probs, masks), each ``[..., H, K]``, under the op-conditioned masks.

        A hand-written softmax sharing one ``exp``: ``torch.log_softmax`` over a last dim of 13
        is ~5x slower on CPU, and this is the hottest op of the PPO update. The max is detached
        (a constant shift), so gradients are exact. Masked entries get probability exactly 0
        (``exp(-inf)``: CPU ``exp`` takes a ~5x slower path on large finite negatives) and the
        finite log-prob ``MASK_FILL - logsumexp``."""
        masks = self.masks_given_op(op)
        x = self.logits.masked_fill(~masks, MASK_FILL)
        x = x - x.detach().amax(-1, keepdim=True)
        e = x.masked_fill(~masks, -float("inf")).exp()
        z = e.sum(-1, keepdim=True)
        return x - z.log(), e / z, masks

    def relevance(self, op: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` bool: the heads that causally matter for ``op`` (SPEC §9)."""
        return self._relevance[op.long()]

    # --- sampling ---------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """A hierarchical sample ``[..., H]``: op first, then every other head (the slot under
        ``slot_by_op[op]``), by Gumbel-max over the masked logits (exact, sync-free).
        ``uniform``: the ``[..., H, K]`` uniforms to use instead of ``torch.rand``
        (``agents.sampling``)."""
        return masked_draw(self.logits + gumbel_like(self.logits, generator, uniform), self.head_masks, self.slot_by_op)

    def mode(self) -> torch.Tensor:
        """Greedy action ``[..., H]``: the most likely op, then the most likely valid entry of
        every other head given that op."""
        return masked_draw(self.logits, self.head_masks, self.slot_by_op)

    # --- evaluation -------------------------------------------------------------------------
    def log_prob_and_entropy(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-head log-probs, per-head normalised entropies), both ``[..., H]`` and 0 on
        heads irrelevant to the action's op; one log-softmax for both."""
        op = action[..., 0]
        logp, probs, masks = self._log_probs(op)
        relevant = self.relevance(op)
        taken = logp.gather(-1, action.long().clamp(0, logp.shape[-1] - 1)[..., None]).squeeze(-1)
        head_lp = torch.where(relevant, taken, torch.zeros_like(taken))  # = head_log_prob(action)
        n_valid = masks.sum(-1)
        several = n_valid > 1
        norm = torch.where(several, n_valid.to(logp.dtype).clamp(min=2).log(), torch.ones_like(taken))
        ent = -(probs * logp).sum(-1) / norm  # masked entries: 0 * finite = 0
        return head_lp, torch.where(several & relevant, ent, torch.zeros_like(ent))

    def head_log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` per-head log-probs of ``action`` (``[..., H]``), 0 on irrelevant heads."""
        op = action[..., 0]
        logp = self._log_probs(op)[0]
        taken = logp.gather(-1, action.long().clamp(0, logp.shape[-1] - 1)[..., None]).squeeze(-1)
        return torch.where(self.relevance(op), taken, torch.zeros_like(taken))

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """``[...]`` log-prob of the action: the sum over causally relevant heads."""
        return self.head_log_prob(action).sum(-1)

    def entropy(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` per-head entropy normalised by ``log(n_valid)`` under the op of ``action``;
        0 where one entry is valid and on heads irrelevant to that op."""
        return self.log_prob_and_entropy(action)[1]

    def forced(self) -> torch.Tensor:
        """``[...]`` bool: only WAIT is valid (SPEC §14 "forced" steps)."""
        return ~self.head_masks[..., 0, int(Op.WAIT) + 1 : len(Op)].any(-1)
