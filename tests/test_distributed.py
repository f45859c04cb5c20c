"""Data-parallel training (docs/DISTRIBUTED.md): env sharding by ``EngineConfig.env_offset``,
shard-invariant action sampling, and 2-process ``gloo`` runs against one process with all envs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.env.engine import Engine
from tests.helpers import random_action


def _shards_match_the_whole(cfg: EngineConfig, world: int, steps: int, exact: bool = True) -> None:
    """Envs ``[k, k + E/W)`` of one engine and an ``env_offset=k`` engine of ``E/W`` envs give the
    same outputs under the same actions, through episode ends and resets (bit-identical when
    ``exact``; else to float32 rounding: the real hosts' batched kernels round differently at
    another batch width)."""
    part = cfg.n_envs // world
    rows = [slice(r * part, (r + 1) * part) for r in range(world)]
    whole = Engine(cfg)
    shards = [Engine(replace(cfg, n_envs=part, env_offset=r * part)) for r in range(world)]
    tol = dict(rtol=0, atol=0) if exact else {}

    def check(out, shard_outs) -> None:
        for sl, shard_out in zip(rows, shard_outs):
            for key, value in shard_out.items():
                torch.testing.assert_close(value, out[key][sl], **tol, msg=key)

    out, shard_outs = whole.reset(), [s.reset() for s in shards]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        check(out, shard_outs)
        action = random_action(rng, whole.masks, cfg.n_slots, p_arbitrary=0.0)
        out = whole.step(action)
        shard_outs = [s.step({k: v[sl] for k, v in action.items()}) for sl, s in zip(rows, shards)]
        check(out, shard_outs)
        done = out["done"].squeeze(-1)
        if bool(done.any()):
            out = whole.reset(done)
            shard_outs = [s.reset(done[sl]) for sl, s in zip(rows, shards)]
    assert whole.episode.sum() > cfg.n_envs  # the steps crossed episode ends


def test_env_offset_shards_the_surrogate_envs_exactly() -> None:
    _shards_match_the_whole(EngineConfig(n_envs=8, max_epochs=5, seed=11), world=2, steps=12)


@pytest.mark.slow
def test_env_offset_shards_the_real_hosts() -> None:
    from esper_soa.dynamics.hosts import HostsConfig

    hcfg = HostsConfig(minibatch_size=16, minibatches_per_epoch=2, val_size=64, val_chunk=200, grad_stride=2)
    cfg = EngineConfig(n_envs=4, max_epochs=2, seed=5, dynamics="hosts", dynamics_config=hcfg)
    _shards_match_the_whole(cfg, world=2, steps=3, exact=False)


def test_env_offset_is_validated() -> None:
    with pytest.raises(ValueError, match=r"EngineConfig.env_offset: expected an int in \[0, "):
        EngineConfig(env_offset=-1)
