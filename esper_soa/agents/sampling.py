"""Shard-invariant sampling noise: the policy's Gumbel noise drawn from one counter-based stream
per env (``core.rng``), keyed by (training seed, global env index, collection step).

``torch.rand`` over a batch of E envs gives env ``e`` a draw that depends on E and on everything
drawn before, so a data-parallel rank sampling its E/W envs could never reproduce what one process
sampling all E envs draws for them. With a per-env key the sample of env ``e`` at step ``t`` is a
pure function of (seed, e, t, logits, masks), whatever the batch, rank count or device.
"""

from __future__ import annotations

import torch

from esper_soa.core import rng

SAMPLE_KEY = "sample_key"  # optional [E] int64 policy input: sample with these keys, not torch.rand
_POLICY_DOMAIN = 0x706F6C69  # folded into every key: the policy's streams never equal an engine stream


def env_keys(seed: int, env_index: torch.Tensor) -> torch.Tensor:
    """``[E]`` int64: the root key of each env's sampling stream (``env_index`` is global)."""
    return rng.combine(rng.episode_seed(seed, env_index, 0), _POLICY_DOMAIN)


def step_keys(keys: torch.Tensor, step: int) -> torch.Tensor:
    """``[E]`` int64: the keys of collection step ``step`` (a policy's :data:`SAMPLE_KEY` input)."""
    return rng.combine(keys, step)


def keyed_uniforms(keys: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Float32 uniforms in (0, 1) of shape ``[*keys.shape, *shape]``, one stream per key."""
    return rng.uniform(keys, torch.zeros_like(keys), 0, tuple(shape))
