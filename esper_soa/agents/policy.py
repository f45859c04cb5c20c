"""Factored masked actor-critic (SPEC §14) as TensorDict modules, and the running normalisers.

Layout (all batched, no per-env code):

    observation --ObservationNormalizer--+
    blueprint_index --Embedding(13+1, 4)-+--> MLP trunk --[LSTM]--> features
    features --Linear--> padded logits [..., 8, K]      (one masked head per action head)
    features --Linear--> state_value [..., 1]           (de-normalised when value norm is on)
    logits + masks --FactoredActor--> ("action", head) x 8, sample_log_prob, head_log_prob

``ActorCritic.policy`` is what a TorchRL ``Collector`` drives, ``ActorCritic.critic`` is the
value network TorchRL's ``GAE`` calls, and ``ActorCritic.evaluate`` re-runs the same graph on
a stored batch for the loss. The normalisers are modules with tensor buffers only, so they are
saved with ``state_dict`` and never mutate inside ``forward``: the trainer updates them after
each PPO update, so the log-prob of a stored action is the same at sampling and at loss time.

The running mean/variance is a few lines of Chan's parallel merge; TorchRL's ``VecNorm``
transform would put the statistics in the env (shared memory, locks) rather than in the policy
checkpoint and would not cover the engine-direct collection path, hence these small modules.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.envs import InitTracker
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules import LSTMModule, set_recurrent_mode

from esper_soa.agents.distribution import N_HEADS, FactoredMaskedCategorical
from esper_soa.agents.sampling import SAMPLE_KEY, keyed_uniforms
from esper_soa.core.spec import (
    ACTION_KEYS,
    EMPTY_BLUEPRINT_INDEX,
    HEAD_NAMES,
    MASK_KEYS,
    OBS_BASE,
    OBS_SLOT,
    Blueprint,
    head_sizes,
    mask_width,
    stack_action,
    unstack_action,
)

RECURRENT_KEYS = ("recurrent_state_h", "recurrent_state_c")


# --- normalisers ----------------------------------------------------------------------------
def local_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a statistic over the data-parallel shards of a one-process run: ``x`` itself
    (``training.distributed`` swaps in an all-reduce; see ``sum_over_shards``)."""
    return x


class RunningMeanStd(nn.Module):
    """Running mean / variance over the leading dims (float64 accumulators, Chan's merge).

    ``sum_over_shards`` sums a tensor over data-parallel ranks (identity in one process), so every
    rank folds in the moments of the whole batch, all ranks' shards together."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-8) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.sum_over_shards = local_sum
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch ``[..., *shape]`` (this rank's shard of it) into the statistics."""
        shards = self.sum_over_shards
        x = x.detach().to(torch.float64).reshape(-1, *self.mean.shape)
        n = shards(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        if not bool(n > 0):
            return
        b_mean = shards(x.sum(0)) / n
        b_var = shards((x - b_mean).square().sum(0)) / n
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta.square() * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.var + self.epsilon)


class ObservationNormalizer(RunningMeanStd):
    """``clip((x - mean) / std, -clip, clip)`` per feature (SPEC §14: running mean/var, clip 10)."""

    def __init__(self, dim: int, clip: float = 10.0, enabled: bool = True) -> None:
        super().__init__((dim,))
        self.clip = clip
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return ((x - mean) / std).clamp(-self.clip, self.clip)


class ValueNormalizer(RunningMeanStd):
    """Running mean/std of value targets: the value head regresses normalised targets."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


class RewardNormalizer(nn.Module):
    """Scale rewards by the running std of the discounted return (SPEC §14: no mean
    subtraction, clip 10). Keeps each env's running return as a buffer, so a checkpoint
    resumes the scaling exactly."""

    def __init__(self, n_envs: int, gamma: float, clip: float = 10.0, enabled: bool = True) -> None:
        super().__init__()
        self.gamma = gamma
        self.clip = clip
        self.enabled = enabled
        self.returns = RunningMeanStd(())
        self.register_buffer("running_return", torch.zeros(n_envs, dtype=torch.float64))

    @torch.no_grad()
    def update(self, reward: torch.Tensor, done: torch.Tensor) -> None:
        """Fold a rollout's discounted returns into the statistics.

        ``reward`` and ``done`` are ``[E, T]`` (time last, as TorchRL collects); the loop runs
        over time only."""
        ret = self.running_return
        seen = []
        for t in range(reward.shape[1]):
            ret = ret * self.gamma + reward[:, t].to(torch.float64)
            seen.append(ret)
            ret = torch.where(done[:, t], torch.zeros_like(ret), ret)
        self.running_return.copy_(ret)
        self.returns.update(torch.stack(seen, 1))

    def scale(self, reward: torch.Tensor) -> torch.Tensor:
        """``clip(reward / std(return), -clip, clip)`` with the current statistics."""
        return (reward / self.returns.std.to(reward.dtype)).clamp(-self.clip, self.clip)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Update with a rollout, then return its scaled rewards (unchanged when disabled)."""
        if not self.enabled:
            return reward
        self.update(reward, done)
        return self.scale(reward)


# --- networks -------------------------------------------------------------------------------
def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class BlueprintEmbedding(nn.Module):
    """Learned vector per blueprint, plus a learned null row (the last) for empty slots, whose
    index is ``EMPTY_BLUEPRINT_INDEX`` (-1), as in the original's ``BlueprintEmbedding``."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.null_row = len(Blueprint)
        self.table = nn.Embedding(len(Blueprint) + 1, embed_dim)

    def forward(self, blueprint_index: torch.Tensor) -> torch.Tensor:
        idx = torch.where(blueprint_index == EMPTY_BLUEPRINT_INDEX, self.null_row, blueprint_index)
        return self.table(idx)


class Trunk(nn.Module):
    """Normalised observation + a learned 4-dim blueprint embedding per slot -> MLP features.

    The first layer is ``W [obs; emb] + b`` written as two Linears (``obs_in`` and
    ``embed_in``), the same function; it spares the backward pass the gradient w.r.t. the
    observation, which the concatenation would compute only to discard (~1/6 of the update's
    matmul work). ReLU rather than Tanh: on CPU ``tanh`` over the trunk costs ~25x a ReLU and
    was the largest elementwise op of the PPO update."""

    def __init__(
        self, n_slots: int, hidden: int, depth: int, embed_dim: int, obs_clip: float, normalize_obs: bool
    ) -> None:
        super().__init__()
        obs_dim = OBS_BASE + OBS_SLOT * n_slots
        self.obs_norm = ObservationNormalizer(obs_dim, obs_clip, normalize_obs)
        self.embed = BlueprintEmbedding(embed_dim)
        first = _init(nn.Linear(obs_dim + n_slots * embed_dim, hidden), math.sqrt(2.0))
        self.obs_in = nn.Linear(obs_dim, hidden)
        self.embed_in = nn.Linear(n_slots * embed_dim, hidden, bias=False)
        with torch.no_grad():  # the orthogonal init of the joint layer, split in two
            self.obs_in.weight.copy_(first.weight[:, :obs_dim])
            self.obs_in.bias.copy_(first.bias)
            self.embed_in.weight.copy_(first.weight[:, obs_dim:])
        layers: list[nn.Module] = [nn.ReLU()]
        for _ in range(depth - 1):
            layers += [_init(nn.Linear(hidden, hidden), math.sqrt(2.0)), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, observation: torch.Tensor, blueprint_index: torch.Tensor) -> torch.Tensor:
        emb = self.embed(blueprint_index).flatten(-2)
        return self.mlp(self.obs_in(self.obs_norm(observation)) + self.embed_in(emb))


class Heads(nn.Module):
    """All action heads as one Linear, scattered into the padded ``[..., 8, K]`` layout, plus
    the state-value head."""

    def __init__(self, features: int, n_slots: int, value_norm: ValueNormalizer | None) -> None:
        super().__init__()
        sizes = list(head_sizes(n_slots).values())
        self.width = mask_width(n_slots)
        self.logits = _init(nn.Linear(features, sum(sizes)), 0.01)
        self.value = _init(nn.Linear(features, 1), 1.0)
        self.value_norm = value_norm
        index = torch.zeros(N_HEADS, self.width, dtype=torch.int64)
        offset = 0
        for h, n in enumerate(sizes):
            index[h, :n] = torch.arange(offset, offset + n)
            offset += n
        self.register_buffer("index", index, persistent=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.logits(features)
        # index_select is ~4x faster than advanced indexing here (fwd and bwd)
        logits = flat.index_select(-1, self.index.flatten()).unflatten(-1, self.index.shape)
        value = self.value(features)
        if self.value_norm is not None:
            value = self.value_norm.denormalize(value)
        return logits, value


class FactoredActor(TensorDictModuleBase):
    """Reads padded logits and the env's masks, writes a hierarchical action sample.

    Samples unless the exploration type is DETERMINISTIC/MODE (or ``deterministic`` is forced),
    in which case it takes the greedy hierarchical action. A ``sample_key`` input (``[E]`` int64,
    ``agents.sampling``) makes the sample a function of each env's key instead of ``torch.rand``.
    Writes the joint log-prob and the per-head log-probs: the per-head clipped PPO ratios need the
    latter. The action is drawn as one ``[..., 8]`` tensor; its ``("action", head)`` entries
    (EsperEnv's action keys) are column views of it, not copies.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_keys = ["logits", *[("masks", k) for k in MASK_KEYS]]
        self.out_keys = [*ACTION_KEYS, "sample_log_prob", "head_log_prob"]
        self.deterministic: bool | None = None

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.write(tensordict, distribution_from(tensordict))

    def write(self, tensordict: TensorDictBase, dist: FactoredMaskedCategorical) -> TensorDictBase:
        """Draw from ``dist`` and write the action and its log-probs into ``tensordict``."""
        greedy = self.deterministic
        if greedy is None:
            greedy = exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE)
        keys = tensordict.get(SAMPLE_KEY, None)  # per-env sampling streams (agents.sampling)
        uniform = None if keys is None or greedy else keyed_uniforms(keys, dist.logits.shape[-2:])
        action = dist.mode() if greedy else dist.sample(uniform=uniform)
        head_lp = dist.head_log_prob(action)
        for name, value in unstack_action(action).items():
            tensordict.set(("action", name), value)
        tensordict.set("head_log_prob", head_lp)
        tensordict.set("sample_log_prob", head_lp.sum(-1))
        return tensordict


def distribution_from(tensordict: TensorDictBase, logits: torch.Tensor | None = None) -> FactoredMaskedCategorical:
    """The action distribution for the ``masks`` of a tensordict and its ``logits`` (or the
    ``logits`` given)."""
    logits = tensordict.get("logits") if logits is None else logits
    return FactoredMaskedCategorical(logits, tensordict.get(("masks", "head")), tensordict.get(("masks", "slot_by_op")))


def stored_action(tensordict: TensorDictBase, key: str | tuple = "action") -> torch.Tensor:
    """The ``(key, head)`` entries of a tensordict as one ``[..., 8]`` int64 tensor."""
    sub = tensordict.get(key)
    return stack_action({h: sub.get(h) for h in HEAD_NAMES})


class ActorCritic(nn.Module):
    """Shared-trunk factored actor-critic for ``EsperEnv`` (SPEC §14).

    Args:
        n_slots: S of the env.
        hidden: trunk width; ``depth`` Linear+ReLU layers.
        embed_dim: blueprint embedding size per slot (SPEC: 4).
        recurrent: ``None`` (MLP) or ``"lstm"`` (TorchRL ``LSTMModule`` after the trunk; the
            recurrent state travels in the tensordict and is reset on ``is_init``).
        lstm_hidden: LSTM state size.
        normalize_obs / obs_clip: observation normaliser (running mean/var, clip).
        normalize_value: value head predicts normalised returns (de-normalised on output).
    """

    def __init__(
        self,
        n_slots: int,
        *,
        hidden: int = 128,
        depth: int = 2,
        embed_dim: int = 4,
        recurrent: str | None = None,
        lstm_hidden: int = 128,
        normalize_obs: bool = True,
        obs_clip: float = 10.0,
        normalize_value: bool = False,
    ) -> None:
        super().__init__()
        if recurrent not in (None, "lstm"):
            raise ValueError(f"ActorCritic.recurrent: expected None or 'lstm', got {recurrent!r}")
        self.n_slots = n_slots
        self.recurrent = recurrent
        self.trunk = Trunk(n_slots, hidden, depth, embed_dim, obs_clip, normalize_obs)
        value_norm = ValueNormalizer(()) if normalize_value else None
        features = hidden
        modules: list[TensorDictModuleBase] = [
            TensorDictModule(self.trunk, in_keys=["observation", "blueprint_index"], out_keys=["features"])
        ]
        self.lstm = None
        if recurrent == "lstm":
            self.lstm = LSTMModule(input_size=hidden, hidden_size=lstm_hidden, in_key="features", out_key="features")
            modules.append(self.lstm)
            features = lstm_hidden
        self.heads = Heads(features, n_slots, value_norm)
        modules.append(TensorDictModule(self.heads, in_keys=["features"], out_keys=["logits", "state_value"]))
        self.actor = FactoredActor()
        recurrent_out = [("next", k) for k in RECURRENT_KEYS] if self.lstm is not None else []
        # Views of the same modules, kept out of the module tree (a plain dict) so the
        # state_dict lists every parameter once: evaluator = logits + value of stored steps,
        # policy = sampling (no value: TorchRL's GAE computes it on root and "next" alike),
        # act = sampling + value (the trainer's own collection), critic = value only.
        self._views = {
            "evaluator": TensorDictSequential(*modules, selected_out_keys=["logits", "state_value", *recurrent_out]),
            "policy": TensorDictSequential(
                *modules,
                self.actor,
                selected_out_keys=[*ACTION_KEYS, "sample_log_prob", "head_log_prob", *recurrent_out],
            ),
            "act": TensorDictSequential(
                *modules,
                self.actor,
                selected_out_keys=[*ACTION_KEYS, "sample_log_prob", "head_log_prob", "state_value", *recurrent_out],
            ),
            "critic": TensorDictSequential(*modules, selected_out_keys=["state_value"]),
        }

    @property
    def policy(self) -> TensorDictSequential:
        """The collector policy: writes the action heads and their log-probs."""
        return self._views["policy"]

    @property
    def critic(self) -> TensorDictSequential:
        """The value network (``observation`` ... -> ``state_value``) for TorchRL's GAE."""
        return self._views["critic"]

    @property
    def obs_norm(self) -> ObservationNormalizer:
        return self.trunk.obs_norm

    @property
    def value_norm(self) -> ValueNormalizer | None:
        return self.heads.value_norm

    @property
    def in_keys(self) -> list:
        """Keys the loss must keep in a batch to re-evaluate it."""
        keys = ["observation", "blueprint_index", *[("masks", k) for k in MASK_KEYS]]
        if self.lstm is not None:
            keys += [*RECURRENT_KEYS, "is_init"]
        return keys

    def evaluate(self, tensordict: TensorDictBase) -> tuple[FactoredMaskedCategorical, torch.Tensor]:
        """(distribution, state value ``[..., 1]``) for a stored batch, without touching it.

        A recurrent policy needs ``[B, T]`` batches (time last); they run in recurrent mode from
        the stored state at each row's first step, split at ``is_init``."""
        td = tensordict.select(*self.in_keys)
        if self.lstm is not None:
            with set_recurrent_mode(True):
                td = self._views["evaluator"](td)
        else:
            td = self._views["evaluator"](td)
        return distribution_from(td), td.get("state_value")

    def act(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``policy(tensordict)`` plus ``state_value``, in place; the MLP's tensors are called
        directly (same numbers, without the TensorDict module plumbing) in the per-step loop."""
        if self.lstm is not None:
            return self._views["act"](tensordict)
        features = self.trunk(tensordict.get("observation"), tensordict.get("blueprint_index"))
        logits, value = self.heads(features)
        tensordict.set("state_value", value)
        return self.actor.write(tensordict, distribution_from(tensordict, logits))

    def initial_state(self, n_envs: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Zero recurrent state for ``n_envs`` envs (empty for the MLP)."""
        if self.lstm is None:
            return {}
        shape = (n_envs, self.lstm.lstm.num_layers, self.lstm.lstm.hidden_size)
        return {k: torch.zeros(shape, device=device) for k in RECURRENT_KEYS}

    def env_transforms(self) -> list:
        """Transforms a TorchRL env needs to drive this policy (``is_init`` and the recurrent
        state primer for the LSTM; none for the MLP)."""
        if self.lstm is None:
            return []
        return [InitTracker(), self.lstm.make_tensordict_primer()]
