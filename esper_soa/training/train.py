"""PPO trainer for the factored Esper policy: batched collection, GAE, minibatch PPO epochs,
metrics through TorchRL's loggers (CSV, TensorBoard when installed), exact checkpoint/resume, and held-out evaluation against the baselines.

Collection drives the engine directly by default: every step is one batched policy call and
one ``Engine.step`` over all E envs, done rows are reset together (``Engine.reset(rows)``), and
the rollout comes out as the same ``[E, T]`` TensorDict layout a TorchRL ``Collector`` returns
(``collector="torchrl"`` uses one instead). Nothing loops over envs; the loops are over time
steps, PPO epochs and minibatches.

Episodes have a fixed, observed horizon (``epoch / max_epochs`` is in the observation), so the
time limit is part of the MDP: GAE treats ``truncated`` as terminal instead of bootstrapping
from a value the critic never learns (the post-horizon state is never a decision state).

Exact resume: a checkpoint holds the model (normalisers included), the optimiser, the reward
normaliser's per-env running returns, every torch RNG state, the engine (``Engine.state_dict``:
lifecycle state, backend state, episode counters, masks) and the carried observation / recurrent state, so the
update after a resume is bit-identical to the uninterrupted run's (engine collector; a TorchRL
``Collector`` resets its env when it is built, so that path restores everything but the
in-flight episodes).

Data-parallel runs (``torchrun``): a ``Comm`` from ``training.distributed`` gives the trainer its
shard of the envs and the collectives; see docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs import Compose, RewardSum, TransformedEnv
from tqdm.auto import tqdm

from esper_soa.agents.loss import ENTROPY_MULTIPLIERS, GAE_LAMBDA, FactoredPPOLoss
from esper_soa.agents.policy import RECURRENT_KEYS, ActorCritic, RewardNormalizer
from esper_soa.agents.sampling import SAMPLE_KEY, env_keys, step_keys
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import DONE_KEYS, GAMMA, HEAD_NAMES, OUTCOME_KEYS, Op
from esper_soa.core.validation import (
    expect_bool,
    expect_choice,
    expect_float,
    expect_int,
)
from esper_soa.dynamics.base import DynamicsBackend
from esper_soa.env.engine import Engine
from esper_soa.env.esper_env import EsperEnv, torchrl_output
from esper_soa.training.distributed import Comm
from esper_soa.training.run_files import METRICS_DIR, atomic_save, log_row, run_loggers, trim_scalars

COLLECTORS = ("engine", "torchrl")
POLICY_INPUTS = ("observation", "blueprint_index", "masks")  # what the policy reads of an env output
TIMING_KEYS = ("sps", "collect_s", "update_s", "time_s")  # wall-clock metrics (not reproducible)
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything one PPO run depends on (defaults: SPEC §14, sized for a CPU).

    ``rollout_len`` defaults to ``engine.max_epochs``: every update then sees whole episodes.
    ``minibatches`` splits a rollout of ``E * T`` frames (the LSTM splits the E env rows, so
    each minibatch keeps whole sequences). ``checkpoint_every`` (updates, 0 = only at the end)
    needs ``log_dir``.
    """

    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(n_envs=256, max_epochs=30, validate_actions=False)
    )
    updates: int = 60
    rollout_len: int | None = None
    collector: str = "engine"
    seed: int = 0
    # model
    hidden: int = 128
    depth: int = 2
    recurrent: str | None = None
    lstm_hidden: int = 128
    # PPO
    gamma: float = GAMMA
    lmbda: float = GAE_LAMBDA
    clip_epsilon: float = 0.2
    lr: float = 3e-4
    adam_eps: float = 1e-5
    max_grad_norm: float = 5.0
    target_kl: float | None = 0.015
    ppo_epochs: int = 4
    minibatches: int = 4
    entropy_coef: float = 0.05
    entropy_multipliers: tuple[tuple[str, float], ...] = tuple(ENTROPY_MULTIPLIERS.items())
    critic_coef: float = 0.5
    forced_value_weight: float = 0.2
    normalize_advantage: bool = True
    advantage_std_floor: float = 0.1
    normalize_obs: bool = True
    normalize_reward: bool = True
    normalize_value: bool = False
    obs_clip: float = 10.0
    reward_clip: float = 10.0
    # io
    log_dir: str | None = None
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.engine, EngineConfig):
            raise bad("engine", "an EngineConfig")

        def check(name: str, expect: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            object.__setattr__(self, name, expect(f"TrainConfig.{name}", getattr(self, name), *args, **kwargs))

        for name in ("updates", "ppo_epochs", "minibatches", "hidden", "depth", "lstm_hidden"):
            check(name, expect_int, 1)
        check("seed", expect_int, 0)
        check("checkpoint_every", expect_int, 0)
        if self.rollout_len is not None:
            check("rollout_len", expect_int, 1)
        for name in ("normalize_advantage", "normalize_obs", "normalize_reward", "normalize_value", "progress"):
            check(name, expect_bool)
        expect_choice("TrainConfig.collector", self.collector, COLLECTORS)
        expect_choice("TrainConfig.recurrent", self.recurrent, (None, "lstm"))
        units = self.engine.n_envs if self.recurrent else self.engine.n_envs * self.steps_per_update
        if self.minibatches > units:
            raise bad("minibatches", f"at most {units} (the {'env rows' if self.recurrent else 'frames'} of a rollout)")
        check("gamma", expect_float, 0.0, 1.0, low_open=True)
        check("lmbda", expect_float, 0.0, 1.0)
        positive = ("clip_epsilon", "lr", "adam_eps", "max_grad_norm", "obs_clip", "reward_clip", "advantage_std_floor")
        for name in positive:
            check(name, expect_float, 0.0, low_open=True)
        for name in ("entropy_coef", "critic_coef", "forced_value_weight"):
            check(name, expect_float, 0.0)
        if self.target_kl is not None:
            check("target_kl", expect_float, 0.0, low_open=True)
        pairs = self.entropy_multipliers
        if not isinstance(pairs, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise bad("entropy_multipliers", f"(head, multiplier) pairs, one per head {HEAD_NAMES}")
        if sorted(h for h, _ in pairs) != sorted(HEAD_NAMES):
            raise bad("entropy_multipliers", f"one (head, multiplier) pair per head {HEAD_NAMES}")
        multipliers = tuple((h, expect_float(f"TrainConfig.entropy_multipliers[{h!r}]", m, 0.0)) for h, m in pairs)
        object.__setattr__(self, "entropy_multipliers", multipliers)
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise bad("log_dir", "None or a path (str or os.PathLike)")
        if self.checkpoint_every and self.log_dir is None:
            raise bad("checkpoint_every", "0, or an int >= 1 together with log_dir")

    @property
    def steps_per_update(self) -> int:
        return self.rollout_len if self.rollout_len is not None else self.engine.max_epochs

    @property
    def frames_per_update(self) -> int:
        return self.engine.n_envs * self.steps_per_update


@dataclass
class TrainResult:
    model: ActorCritic
    history: list[dict[str, Any]]
    checkpoint: Path | None
    log_dir: Path | None


# --- helpers --------------------------------------------------------------------------------
def make_model(cfg: TrainConfig) -> ActorCritic:
    return ActorCritic(
        cfg.engine.n_slots,
        hidden=cfg.hidden,
        depth=cfg.depth,
        recurrent=cfg.recurrent,
        lstm_hidden=cfg.lstm_hidden,
        normalize_obs=cfg.normalize_obs,
        obs_clip=cfg.obs_clip,
        normalize_value=cfg.normalize_value,
    )


def make_loss(cfg: TrainConfig, model: ActorCritic) -> FactoredPPOLoss:
    return FactoredPPOLoss(
        model,
        clip_epsilon=cfg.clip_epsilon,
        entropy_coef=cfg.entropy_coef,
        entropy_multipliers=dict(cfg.entropy_multipliers),
        critic_coef=cfg.critic_coef,
        forced_value_weight=cfg.forced_value_weight,
        normalize_advantage=cfg.normalize_advantage,
        advantage_std_floor=cfg.advantage_std_floor,
        gamma=cfg.gamma,
        lmbda=cfg.lmbda,
    )


def rollout_summary(batch: TensorDictBase, max_epochs: int) -> dict[str, torch.Tensor]:
    """Episode and op statistics of an ``[E, T]`` rollout, as tensors (one host sync later).

    Returns and final states are those of the episodes that ended inside the rollout; op
    fractions are over all its frames; prunes are per ``max_epochs`` frames (one episode)."""
    done = batch.get(("next", "done")).squeeze(-1)
    nxt = batch.get("next")
    ops = torch.bincount(batch.get(("action", "op")).flatten(), minlength=len(Op)).to(torch.float32)
    frames = float(done.numel())
    stats = {
        "episodes": done.sum(),
        "mean_return": batch.get(("next", "episode_reward")).squeeze(-1)[done].mean(),  # NaN if none ended
        "final_accuracy": nxt.get("val_acc")[done].mean(),
        "fossils_per_episode": nxt.get("fossils")[done].mean(),
        "j_final": nxt.get("committed_gain")[done].mean(),
        "prunes_per_episode": ops[int(Op.PRUNE)] * max_epochs / frames,
    }
    stats.update({f"op_frac_{op.name}": ops[int(op)] / frames for op in Op})
    return stats


def _scalar(x: torch.Tensor | float | int | bool) -> float | int | bool | None:
    """A JSON-friendly Python scalar (NaN -> None)."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --- the trainer ----------------------------------------------------------------------------
class Trainer:
    """One PPO run: owns the engine (or TorchRL env + Collector), the model, the loss, the
    optimiser and the reward normaliser. ``run`` performs updates until ``cfg.updates``.
    ``dynamics`` overrides the backend ``cfg.engine`` names (e.g. a fault-injecting wrapper).
    ``comm``: this process's part of a data-parallel run (``training.distributed``; default: the
    whole run in this process); the trainer then owns ``cfg.engine.n_envs / world`` of the envs.

    Example::

        from esper_soa import EngineConfig
        from esper_soa.training.train import TrainConfig, Trainer

        trainer = Trainer(TrainConfig(engine=EngineConfig(n_envs=128, max_epochs=150), updates=30))
        row = trainer.step()          # one update: collect [128, T], GAE, PPO; metrics incl. j_final
        trainer.save("run/checkpoint.pt"); result = trainer.run()
    """

    def __init__(self, cfg: TrainConfig, dynamics: DynamicsBackend | None = None, comm: Comm | None = None) -> None:
        self.cfg = cfg
        self.comm = comm if comm is not None else Comm()
        if self.comm.world > 1 and cfg.collector != "engine":
            raise ValueError(f"TrainConfig.collector: expected 'engine' for data-parallel training (world size "
                             f"{self.comm.world}), got {cfg.collector!r}")
        engine_cfg = self.comm.shard_engine(cfg.engine)  # this process's envs
        self.device = engine_cfg.torch_device
        torch.manual_seed(cfg.seed)
        self.model = make_model(cfg).to(self.device)
        self.loss = make_loss(cfg, self.model).to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.reward_norm = RewardNormalizer(engine_cfg.n_envs, cfg.gamma, cfg.reward_clip, cfg.normalize_reward)
        self.reward_norm.to(self.device)
        self.loss_fn = self.comm.attach(self.loss, self.reward_norm)  # what a minibatch's loss calls
        self.batch_size = torch.Size([engine_cfg.n_envs])
        self.update_index = 0
        self.frames = 0
        self._carry: TensorDict | None = None  # policy inputs of the next step (engine path)
        self._collector = None
        if cfg.collector == "engine":
            self.engine = Engine(engine_cfg, dynamics)
            self.loss.make_value_estimator(value_network=None)  # values come with the rollout
        else:
            env = EsperEnv(engine_cfg, dynamics)
            self.engine = env.engine
            self.env = TransformedEnv(env, Compose(RewardSum(), *self.model.env_transforms()))
            self.loss.make_value_estimator()
        self._sample_keys = env_keys(cfg.seed, self.engine.env_index)  # shard-invariant sampling noise

    # --- collection -------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> TensorDict:
        """One ``[E, T]`` rollout with ``("next", ...)`` entries, like a TorchRL Collector's."""
        if self.cfg.collector == "torchrl":
            return self._collect_torchrl()
        engine = self.engine
        if self._carry is None:
            self._carry = self._fresh_carry(torchrl_output(engine.reset()))
        steps = []
        for t in range(self.cfg.steps_per_update):
            self._carry.set(SAMPLE_KEY, step_keys(self._sample_keys, self.update_index * self.cfg.steps_per_update + t))
            td = self.model.act(self._carry)
            out = engine.step(td.get("action"))
            nxt = torchrl_output(out)
            for key in ("observation", "reward", *DONE_KEYS, *OUTCOME_KEYS):
                td.set(("next", key), nxt.get(key))  # beside the LSTM's ("next", state) entries
            td.set(("next", "episode_reward"), out.get("episode_return")[:, None])  # RewardSum's key
            steps.append(td)
            rows = nxt.get("done").squeeze(-1)
            self._carry = self._next_carry(td, self._reset_done(rows, nxt), rows)
        batch = torch.stack(steps, dim=1)
        # bootstrap value of the state after the rollout (ignored where the last step was done)
        last_value = self.model.critic(self._carry.clone()).get("state_value")
        value = batch.get("state_value")
        batch.set(("next", "state_value"), torch.cat([value[:, 1:], last_value[:, None]], dim=1))
        return batch

    def _reset_done(self, rows: torch.Tensor, nxt: TensorDict) -> TensorDict:
        """The env outputs the next decision sees: ``nxt``, with the ``rows`` that just ended reset.

        Asks the device whether any row ended (one host read per step): episodes run in lock-step,
        so a reset is needed on few steps only, while ``Engine.reset`` is one fixed-shape graph that
        runs a host epoch for every env. Resetting every step instead (sync-free) is not measured
        yet (bench/RESULTS.md, "One mask and action layout")."""
        if bool(rows.any()):
            return torchrl_output(self.engine.reset(rows))
        return nxt

    def _fresh_carry(self, out: TensorDictBase) -> TensorDict:
        carry = out.select(*POLICY_INPUTS)
        if self.model.lstm is not None:
            carry.update(self.model.initial_state(self.batch_size[0], self.device))
            carry.set("is_init", torch.ones(*self.batch_size, 1, dtype=torch.bool, device=self.device))
        return carry

    def _next_carry(self, td: TensorDict, out: TensorDictBase, rows: torch.Tensor) -> TensorDict:
        carry = out.select(*POLICY_INPUTS)
        if self.model.lstm is not None:
            keep = ~rows[:, None, None]
            for k in RECURRENT_KEYS:
                carry.set(k, td.get(("next", k)) * keep)
            carry.set("is_init", rows[:, None].clone())
        return carry

    def _collect_torchrl(self) -> TensorDict:
        if self._collector is None:
            self._collector = iter(
                Collector(
                    self.env,
                    self.model.policy,
                    frames_per_batch=self.cfg.frames_per_update,
                    total_frames=-1,
                    auto_register_policy_transforms=False,
                )
            )
        return next(self._collector)

    # --- one update -------------------------------------------------------------------------
    def advantages(self, batch: TensorDict) -> TensorDict:
        """Scale rewards, treat the observed time limit as terminal, run GAE (in place)."""
        done = batch.get(("next", "done"))
        reward = batch.get(("next", "reward"))
        batch.set(("next", "reward"), self.reward_norm(reward.squeeze(-1), done.squeeze(-1)).unsqueeze(-1))
        batch.set(("next", "terminated"), done.clone())
        return self.loss.value_estimator(batch)

    def update(self, batch: TensorDict) -> dict[str, torch.Tensor]:
        """PPO epochs over shuffled minibatches with the target-KL early stop."""
        cfg = self.cfg
        data = batch.select(*self.loss.in_keys)
        if self.model.lstm is None:
            data = data.reshape(-1)  # frames are independent for the MLP
        n = data.shape[0]
        size = math.ceil(n / cfg.minibatches)
        sums: dict[str, torch.Tensor] = {}
        done_minibatches, early_stop = 0, False
        params = list(self.model.parameters())
        for _ in range(cfg.ppo_epochs):
            shuffled = data[torch.randperm(n, device=self.device)]  # one gather per epoch; minibatches are views
            for start in range(0, n, size):
                out = self.loss_fn(shuffled[start : start + size])
                if cfg.target_kl is not None and float(out["approx_kl"]) > cfg.target_kl:
                    early_stop = True
                    if not sums:  # nothing applied: report the minibatch that stopped it
                        sums = {k: v.detach() for k, v in out.items()}
                        sums["grad_norm"] = torch.zeros((), device=self.device)
                    break
                total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                self.optim.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optim.step()
                out.set("grad_norm", grad_norm)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                done_minibatches += 1
            if early_stop:
                break
        metrics = {k: v / max(done_minibatches, 1) for k, v in sums.items()}
        shares = self.comm.sum(torch.stack([metrics[k] for k in self.loss.out_keys]))  # ranks' loss shares
        metrics.update({k: shares[i] for i, k in enumerate(self.loss.out_keys)})
        entropy = metrics.pop("entropy")
        metrics.update({f"entropy_{h}": entropy[i] for i, h in enumerate(HEAD_NAMES)})
        metrics["minibatches"] = torch.tensor(done_minibatches)
        metrics["early_stop"] = torch.tensor(early_stop)
        # normaliser statistics move only now, so sampling and loss saw the same ones
        self.model.obs_norm.update(batch.get("observation"))
        if self.model.value_norm is not None:
            self.model.value_norm.update(batch.get("value_target"))
        return metrics

    def step(self) -> dict[str, Any]:
        """Collect, GAE, PPO update; returns this update's metrics as Python scalars."""
        t0 = time.perf_counter()
        batch = self.collect()
        t1 = time.perf_counter()
        stats = self.comm.rollout_stats(rollout_summary(batch, self.cfg.engine.max_epochs))
        self.advantages(batch)
        metrics = self.update(batch)
        t2 = time.perf_counter()
        self.update_index += 1
        frames = batch.numel() * self.comm.world  # the run's frames (equal shards)
        self.frames += frames
        row: dict[str, Any] = {"update": self.update_index, "frames": self.frames}
        row.update({k: _scalar(v) for k, v in stats.items()})
        row.update({k: _scalar(v) for k, v in metrics.items()})
        row["reward_scale"] = _scalar(self.reward_norm.returns.std.float())
        row.update(sps=frames / (t2 - t0), collect_s=t1 - t0, update_s=t2 - t1, time_s=t2 - t0)
        return row

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION,
            "config": _config_dict(self.cfg),
            "update": self.update_index,
            "frames": self.frames,
            "model": self.model.state_dict(),
            "optim": self.optim.state_dict(),
            "reward_norm": self.reward_norm.state_dict(),
            "rng": rng,
            "engine": self.engine.state_dict(),
            "carry": None if self._carry is None else self._carry.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != CHECKPOINT_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"checkpoint version: expected {CHECKPOINT_VERSION}, got {got!r}")
        diff = _config_diff(state["config"], _config_dict(self.cfg))
        if diff:
            raise ValueError(
                "resume: the checkpoint was trained with a different config ("
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
                + ")"
            )
        self.update_index, self.frames = state["update"], state["frames"]
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.reward_norm.load_state_dict(state["reward_norm"])
        self.engine.load_state_dict(state["engine"])
        carry = state["carry"]
        self._carry = None if carry is None else TensorDict(carry, batch_size=self.batch_size)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, path: str | Path) -> Path:
        """Write atomically (``run_files.atomic_save``: a crash leaves the old checkpoint or the new
        one, never a torn one). Data-parallel: a collective; rank 0 writes every rank's shard
        (``Comm.gather_checkpoint``), the others wait until the file is in place."""
        path = Path(path)
        state = self.comm.gather_checkpoint(self.state_dict())
        if state is not None:
            atomic_save(state, path)
        self.comm.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save`; a file that is not one is a ``ValueError``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"resume: expected a checkpoint file, got {str(path)!r} (no such file)")
        if path.stat().st_size == 0:
            raise ValueError(f"resume: expected a checkpoint written by Trainer.save, got an empty file {str(path)!r}")
        try:
            state = torch.load(path, map_location=self.engine.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 (unpickling arbitrary bytes can raise almost anything)
            raise ValueError(
                f"resume: expected a checkpoint written by Trainer.save, got an unreadable file {str(path)!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self.load_state_dict(self.comm.split_checkpoint(state))

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        log_dir = Path(cfg.log_dir) if cfg.log_dir is not None else None
        main = self.comm.main  # the one process that writes into log_dir
        if log_dir is not None and main:  # a crash mid-save leaves a temp file; a resume, logged steps past its checkpoint
            (log_dir / "checkpoint.tmp").unlink(missing_ok=True)
            trim_scalars(log_dir / METRICS_DIR / "scalars", self.frames)
        loggers = run_loggers(log_dir) if log_dir is not None and main else []
        checkpoint = None
        history = []
        bar = tqdm(total=cfg.updates, initial=self.update_index, disable=not (cfg.progress and main), desc="PPO",
                   unit="upd")
        try:
            while self.update_index < cfg.updates:
                row = self.step()
                history.append(row)
                log_row(loggers, row)
                ret = row["mean_return"]
                ret = "-" if ret is None else f"{ret:.2f}"
                bar.set_postfix(ret=ret, kl=f"{row['approx_kl']:.4f}", sps=f"{row['sps']:,.0f}")
                bar.update(1)
                last = self.update_index == cfg.updates
                every = cfg.checkpoint_every and self.update_index % cfg.checkpoint_every == 0
                if log_dir is not None and (last or every):
                    checkpoint = self.save(log_dir / "checkpoint.pt")
        finally:
            bar.close()
        return TrainResult(self.model, history, checkpoint, log_dir)


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (device as a string) for checkpoints and comparisons."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    engine = asdict(cfg.engine)
    engine["device"] = str(engine["device"])
    out["engine"] = engine
    return out


def _config_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved, now)`` for every field that differs (engine fields as ``engine.<name>``),
    ignoring the ones a resume may change (``updates``, ``log_dir``, ``checkpoint_every``, ``progress``,
    ``engine.threads``)."""
    ignore = {"updates", "log_dir", "checkpoint_every", "progress"}
    diff = []
    for key in sorted(set(saved) | set(now)):
        if key in ignore:
            continue
        a, b = saved.get(key), now.get(key)
        if key == "engine" and isinstance(a, Mapping) and isinstance(b, Mapping):
            diff += [(f"engine.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k) and k != "threads"]  # a machine's knob, not the run's
        elif a != b:
            diff.append((key, a, b))
    return diff


def train(
    cfg: TrainConfig, resume: str | Path | None = None, dynamics: DynamicsBackend | None = None,
    comm: Comm | None = None,
) -> TrainResult:
    """Train (or resume from a checkpoint) until ``cfg.updates`` updates are done (``comm``: as
    one rank of a data-parallel run, see ``training.distributed``)."""
    trainer = Trainer(cfg, dynamics, comm)
    if resume is not None:
        trainer.load(resume)
    return trainer.run()
