"""Data-parallel training over processes, GPUs and nodes: ``torch.distributed``, launched by
``torchrun`` (docs/DISTRIBUTED.md).

Each rank owns ``n_envs / world`` envs of the run (``EngineConfig.env_offset`` = its first global
env index, so its random streams are the ones a single process would draw for those envs), and a
replica of the policy wrapped in ``DistributedDataParallel``. What one process computes over the
whole batch is computed over all ranks' shards together: the gradient (DDP, summed, because each
rank's loss is its share of the global loss), advantage normalisation, the observation / value /
reward normalisers and every loss diagnostic (``sum_over_shards``), the rollout statistics, the
checkpoint (rank 0 writes every rank's shard) and the evaluation table.

:class:`Comm` is the one-process case (every collective is the identity); the trainer always
talks to one, so the single-process code path is the distributed one with ``world == 1``.
:class:`ProcessGroupComm` is the ``torch.distributed`` implementation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from esper_soa.agents.policy import RewardNormalizer
from esper_soa.core.config import EngineConfig

SHARD_KEYS = ("engine", "reward_norm", "rng", "carry")  # per-rank parts of a trainer checkpoint
EPISODE_MEANS = ("mean_return", "final_accuracy", "fossils_per_episode", "j_final")  # means over ended episodes
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Comm:
    """The collectives a trainer needs, for a run of one process (all identities)."""

    rank = 0
    world = 1
    local_rank = 0

    @property
    def main(self) -> bool:
        """Whether this process writes logs, checkpoints and tables (rank 0)."""
        return self.rank == 0

    def shard_engine(self, cfg: EngineConfig) -> EngineConfig:
        """This rank's envs of a run's engine config: ``n_envs / world`` envs from global index
        ``env_offset + rank * n_envs / world``, on this rank's device."""
        if cfg.n_envs % self.world:
            raise ValueError(f"n_envs: expected a multiple of the world size {self.world} (each rank owns "
                             f"n_envs / {self.world} envs), got {cfg.n_envs}")
        part = cfg.n_envs // self.world
        return replace(cfg, n_envs=part, env_offset=cfg.env_offset + self.rank * part, device=self.device(cfg.device))

    def device(self, device: str | torch.device) -> str | torch.device:
        """This rank's device for a run's ``device`` (one process: the device itself)."""
        return device

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over ranks (one process: ``x`` itself; ``x`` is never changed in place)."""
        return x

    def attach(self, loss: nn.Module, reward_norm: RewardNormalizer) -> Callable[..., Any]:
        """Route the loss's and the normalisers' batch statistics through :meth:`sum` and return
        the callable the PPO update calls for a minibatch's loss (DDP-wrapped when distributed)."""
        for module in (*loss.modules(), *reward_norm.modules()):
            if hasattr(module, "sum_over_shards"):  # the loss, the RunningMeanStd normalisers
                module.sum_over_shards = self.sum
        return loss

    def rollout_stats(self, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The statistics of the whole rollout from each rank's ``rollout_summary``: ``episodes``
        summed, :data:`EPISODE_MEANS` weighted by each rank's ended episodes, every other entry
        (per-frame fractions; ranks hold equal frames) averaged."""
        if self.world == 1:
            return dict(stats)
        names = list(stats)
        episodes = stats["episodes"].to(torch.float64)
        parts = []
        for k in names:
            v = stats[k].to(torch.float64)
            if k == "episodes":
                parts.append(v)
            elif k in EPISODE_MEANS:  # a rank without ended episodes has NaN means: weight 0
                parts.append(torch.where(episodes > 0, v * episodes, torch.zeros_like(v)))
            else:
                parts.append(v / self.world)
        total = self.sum(torch.stack(parts))
        n = total[names.index("episodes")]
        return {k: total[i] / n if k in EPISODE_MEANS else total[i] for i, k in enumerate(names)}

    def gather_checkpoint(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The run's checkpoint from every rank's ``Trainer.state_dict()`` (on rank 0; None elsewhere)."""
        return state

    def split_checkpoint(self, state: Any) -> Any:
        """This rank's ``Trainer.state_dict()`` from a run's checkpoint; a checkpoint written by
        another number of ranks is a ``ValueError`` (the envs' shards and streams are per rank)."""
        saved = state.get("world_size", 1) if isinstance(state, Mapping) else 1
        if saved != self.world:
            raise ValueError(
                f"resume: expected a checkpoint written by {self.world} process(es) (this world size), got "
                f"one written by {saved}; resume with the world size it was trained with "
                f"(torchrun --nnodes N --nproc_per_node P, N * P = {saved})"
            )
        if not isinstance(state, Mapping) or "shards" not in state:
            return state
        out = {k: v for k, v in state.items() if k not in ("shards", "world_size")}
        out.update(state["shards"][self.rank])
        return out

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere), e.g. evaluation results."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group (after the last collective)."""


class ProcessGroupComm(Comm):
    """:class:`Comm` over the default ``torch.distributed`` process group (``nccl`` on CUDA,
    ``gloo`` on CPU). Every method is a collective: all ranks call it, in the same order."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupComm: expected an initialised default process group "
                               "(torch.distributed.init_process_group, see init_from_env), got none")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def device(self, device: str | torch.device) -> str | torch.device:
        return f"cuda:{self.local_rank}" if torch.device(device).type == "cuda" else device

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        self.dist.all_reduce(out)
        return out

    def attach(self, loss: nn.Module, reward_norm: RewardNormalizer) -> Callable[..., Any]:
        super().attach(loss, reward_norm)
        from torch.nn.parallel import DistributedDataParallel

        device = next(loss.parameters()).device
        ddp = DistributedDataParallel(
            loss,
            device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # equal from the same seed and kept equal by the reduced updates
        )
        ddp.register_comm_hook(None, _sum_gradients)
        return ddp

    def gather_checkpoint(self, state: dict[str, Any]) -> dict[str, Any] | None:
        shard = _to_cpu({k: state[k] for k in SHARD_KEYS})
        shards: list[Any] | None = [None] * self.world if self.main else None
        self.dist.gather_object(shard, shards, dst=0)
        if not self.main:
            return None
        out = {k: v for k, v in state.items() if k not in SHARD_KEYS}
        out.update(world_size=self.world, shards=shards)
        return out

    def gather_objects(self, obj: Any) -> list[Any] | None:
        gathered: list[Any] | None = [None] * self.world if self.main else None
        self.dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _sum_gradients(process_group, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations by identity)
    """DDP comm hook: all-reduce a gradient bucket as a *sum* (the default hook averages). Each
    rank's loss is its share of the whole batch's loss, so the sum is the whole batch's gradient."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _to_cpu(obj: Any) -> Any:
    """Every tensor in a nest of dicts / lists on the CPU (so rank 0 can hold every rank's state)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` launch (its environment variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def init_from_env(device: str | torch.device) -> ProcessGroupComm:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    ``nccl`` with ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else ``gloo``."""
    import torch.distributed as dist

    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed training: expected the environment torchrun sets ({', '.join(TORCHRUN_ENV)}), "
                           f"missing {', '.join(missing)}; launch with torchrun --nproc_per_node N -m esper_soa.cli train ...")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return ProcessGroupComm()
