"""Data-parallel training (docs/DISTRIBUTED.md): env sharding by ``EngineConfig.env_offset``,
shard-invariant action sampling, and 2-process ``gloo`` runs against one process with all envs."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from esper_soa.core.config import EngineConfig
from esper_soa.env.engine import Engine
from esper_soa.training.distributed import Comm, ProcessGroupComm
from esper_soa.training.train import TIMING_KEYS, TrainConfig, Trainer, train
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


class _Shard(Comm):
    """Rank ``rank`` of ``world`` without a process group: enough for collection (no collectives)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world


def test_trainer_rollouts_of_shards_are_the_whole_rollout() -> None:
    """Per-env keyed sampling noise: each shard's trainer (other torch RNG draws in between)
    collects exactly the actions and observations one trainer with all envs collects for them."""
    cfg = _cfg(rollout_len=8)  # crosses an episode end (6 epochs)
    whole = Trainer(cfg).collect()
    parts = []
    for rank in range(WORLD):
        trainer = Trainer(cfg, comm=_Shard(rank, WORLD))
        torch.rand(100 + rank)  # the global generator is not what sampling uses
        parts.append(trainer.collect())
    assert whole["next", "done"].any()
    for key in [("action", "op"), ("action", "slot"), ("action", "blueprint"), "observation", ("next", "reward")]:
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key


@pytest.mark.slow
def test_trainer_collects_on_the_real_hosts_by_shard() -> None:
    """The trainer's rollout (under no_grad) drives the real hosts, which train with autograd; a
    shard's rollout equals the whole one's rows (actions exactly, floats to rounding)."""
    from esper_soa.dynamics.hosts import HostsConfig

    hcfg = HostsConfig(minibatch_size=16, minibatches_per_epoch=2, val_size=64, val_chunk=200, grad_stride=2)
    engine = EngineConfig(n_envs=4, max_epochs=3, seed=5, dynamics="hosts", dynamics_config=hcfg,
                          validate_actions=False)
    cfg = _cfg(engine=engine, rollout_len=4)
    whole = Trainer(cfg).collect()
    part = Trainer(cfg, comm=_Shard(1, WORLD)).collect()
    assert torch.equal(part["action", "op"], whole["action", "op"][2:])
    torch.testing.assert_close(part["next", "observation"], whole["next", "observation"][2:])


# --- 2-process gloo runs against one process with all envs ----------------------------------
WORLD = 2
UPDATES = 3


def _cfg(**overrides) -> TrainConfig:
    """Tiny run whose update is shard-equivalent: one minibatch per epoch, so the sum of the
    ranks' gradients is the whole batch's gradient (more minibatches: docs/DISTRIBUTED.md)."""
    base = dict(
        engine=EngineConfig(n_envs=8, max_epochs=6, seed=3, validate_actions=False),
        updates=UPDATES, rollout_len=4, ppo_epochs=2, minibatches=1, hidden=32, progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_state(trainer_or_model) -> dict[str, torch.Tensor]:
    model = getattr(trainer_or_model, "model", trainer_or_model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, mode: str, cfg: TrainConfig, out: str) -> None:
    """One rank: ``train`` = UPDATES updates, recording the model after each and checkpointing
    after UPDATES - 1; ``resume`` = a fresh process group resuming that checkpoint through ``train``."""
    torch.set_num_threads(1)
    # a bounded collective timeout: a rank that stops calling collectives fails the test, not hangs CI
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=240))
    try:
        comm = ProcessGroupComm()
        if mode == "train":
            trainer = Trainer(cfg, comm=comm)
            record: dict = {"models": [], "rows": []}
            for update in range(1, UPDATES + 1):
                record["rows"].append(trainer.step())
                record["models"].append(_model_state(trainer))
                if update == UPDATES - 1:
                    trainer.save(Path(out) / "checkpoint.pt")
            early = Trainer(replace(cfg, target_kl=1e-4, ppo_epochs=50, lr=3e-3), comm=comm)
            record["early_stop"] = (early.step(), _model_state(early))
        else:
            result = train(replace(cfg, log_dir=str(Path(out) / "resumed")), resume=Path(out) / "checkpoint.pt",
                           comm=comm)
            record = {"models": [_model_state(result.model)], "rows": result.history}
        tmp = Path(out) / f"{mode}{rank}.tmp"
        torch.save(record, tmp)
        tmp.replace(Path(out) / f"{mode}{rank}.pt")  # complete when it appears (see _spawn)
    finally:
        dist.destroy_process_group()


def _spawn(mode: str, cfg: TrainConfig, out: Path, timeout_s: float = 600.0, teardown_s: float = 30.0) -> list[dict]:
    """Run WORLD ranks; their results once every rank has written its file. A rank that wrote its
    result but has not exited ``teardown_s`` later is stopped (twice on the loaded 2-core VM one
    rank never exited after the run, cause not found); no result within ``timeout_s`` fails."""
    files = [out / f"{mode}{r}.pt" for r in range(WORLD)]
    ctx = mp.start_processes(_worker, args=(_free_port(), mode, cfg, str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    start, written = time.monotonic(), None
    while not ctx.join(timeout=1):  # raises if a rank fails
        if written is None and all(f.exists() for f in files):
            written = time.monotonic()
        if written is not None and time.monotonic() - written > teardown_s:
            for process in ctx.processes:
                process.terminate()
            break
        if written is None and time.monotonic() - start > timeout_s:
            for process in ctx.processes:
                process.terminate()
            pytest.fail(f"{mode}: expected every rank's result within {timeout_s:.0f} s, got {[f.name for f in files if f.exists()]}")
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ddp")
    return _spawn("train", _cfg(), out), out


def test_ranks_hold_identical_parameters_after_every_update(two_ranks) -> None:
    (r0, r1), _ = two_ranks
    assert len(r0["models"]) == UPDATES
    for a, b in zip(r0["models"], r1["models"]):
        for key in a:  # parameters and normaliser buffers
            assert torch.equal(a[key], b[key]), key
    assert r0["rows"][-1]["update"] == UPDATES
    assert not torch.equal(r0["models"][0]["heads.logits.weight"], r0["models"][-1]["heads.logits.weight"])


def test_ranks_stop_the_epochs_early_together(two_ranks) -> None:
    """The approx-KL of the early stop is global: every rank stops at the same minibatch (a rank
    stopping alone would leave the other waiting in DDP's all-reduce)."""
    (r0, r1), _ = two_ranks
    (row0, model0), (row1, model1) = r0["early_stop"], r1["early_stop"]
    assert row0["early_stop"] and row0["minibatches"] < 50
    assert row0["minibatches"] == row1["minibatches"] and row0["approx_kl"] == row1["approx_kl"]
    for key in model0:
        assert torch.equal(model0[key], model1[key]), key


def test_two_ranks_match_one_process_with_all_envs(two_ranks) -> None:
    (r0, _), _ = two_ranks
    single = Trainer(_cfg())
    for update in range(UPDATES):
        row = single.step()
        theirs = r0["rows"][update]
        for key, value in row.items():
            if key in TIMING_KEYS or value is None:
                assert key in TIMING_KEYS or theirs[key] is None, key
                continue
            assert theirs[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        for key, value in _model_state(single).items():
            torch.testing.assert_close(r0["models"][update][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resume_of_two_ranks_is_exact(two_ranks) -> None:
    (r0, _), out = two_ranks
    resumed = _spawn("resume", _cfg(), out)
    assert [row["update"] for row in resumed[0]["rows"]] == [UPDATES]
    for record in resumed:
        for key, value in r0["models"][-1].items():
            assert torch.equal(record["models"][0][key], value), key
    straight = {k: v for k, v in r0["rows"][-1].items() if k not in TIMING_KEYS}
    assert {k: v for k, v in resumed[0]["rows"][0].items() if k not in TIMING_KEYS} == straight
    assert (out / "resumed" / "checkpoint.pt").is_file()


def test_resume_refuses_another_world_size(two_ranks) -> None:
    _, out = two_ranks
    with pytest.raises(ValueError, match=r"expected a checkpoint written by 1 process\(es\).*written by 2"):
        Trainer(_cfg()).load(out / "checkpoint.pt")
