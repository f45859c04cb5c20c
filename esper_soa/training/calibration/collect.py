"""Runs to calibrate on: controllers (host-only, heuristic, random) driving an engine, and the
per-epoch :class:`Trajectories` the fits read.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from esper_soa.agents.adversaries import wait_action
from esper_soa.agents.heuristic import HeuristicController
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.env.engine import Engine

CONTROLLERS = ("host_only", "heuristic", "random")


class Controller(Protocol):
    """What :func:`collect_trajectories` drives: the HeuristicController's interface."""

    def act(self, state: Any, masks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]: ...

    def reset(self, rows: torch.Tensor | None = None) -> None: ...


class MaskController:
    """A stateless controller that acts on the masks alone: ``random`` (the shared
    :func:`~esper_soa.core.masks.sample_masked_action` on its own seeded generator) or ``host_only``
    (always WAIT: the host learns alone, the reference for the host curve and for seed gains)."""

    def __init__(self, policy: Callable[[dict[str, torch.Tensor]], torch.Tensor | dict[str, torch.Tensor]]) -> None:
        self.policy = policy

    def act(self, state: Any, masks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.policy(masks)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Stateless: nothing to forget."""


def make_controller(name: str, cfg: EngineConfig, seed: int = 0) -> Controller:
    """One of :data:`CONTROLLERS` for the engine config ``cfg`` (eager, no compile)."""
    if name == "heuristic":
        return HeuristicController(cfg, compile=False)
    if name == "random":
        generator = torch.Generator(device=cfg.device).manual_seed(seed)
        return MaskController(functools.partial(sample_masked_action, generator=generator))
    if name == "host_only":
        return MaskController(wait_action)
    raise ValueError(f"controller: expected one of {CONTROLLERS}, got {name!r}")


@dataclass
class Trajectories:
    """What the engine recorded, per env and epoch (index 0 = the observation after reset).

    Index ``t`` holds the state right after the host epoch run at ``epoch == t``, so ``stage`` and
    ``alpha`` are what that epoch's dynamics saw and ``contribution`` what it measured (NaN where
    the slot's contribution was not measured at that epoch). Arrays are numpy: ``[E, T+1]``
    per env, ``[E, T+1, S]`` per slot.
    """

    backend: str
    controller: str
    val_acc: np.ndarray
    acc_all_seeds_off: np.ndarray
    stage: np.ndarray
    alpha: np.ndarray
    blueprint: np.ndarray
    algorithm: np.ndarray
    germination_epoch: np.ndarray
    contribution: np.ndarray
    interaction_sum: np.ndarray
    terminated: np.ndarray  # [E] bool: the env diverged at some point (the engine does not auto-reset)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_envs(self) -> int:
        return self.val_acc.shape[0]

    @property
    def n_epochs(self) -> int:
        return self.val_acc.shape[1] - 1


def collect_trajectories(cfg: EngineConfig, controller: str, seed: int = 0) -> Trajectories:
    """Run one episode of every env of ``cfg`` (``cfg.max_epochs`` steps) under ``controller``.

    The engine seed ``cfg.seed`` fixes the env keys, so two calls that differ only in the controller
    see the same hosts (same initial weights and data order on the real backend, same latents and
    noise on the surrogate): the host-only run is each env's own counterfactual.
    """
    engine = Engine(cfg)
    ctl = make_controller(controller, cfg, seed)
    start = time.perf_counter()
    engine.reset()
    ctl.reset()
    rows: list[dict[str, np.ndarray]] = []
    terminated = np.zeros(cfg.n_envs, dtype=bool)

    def record() -> None:
        st = engine.state
        sl = st["slots"]
        measured = (sl["contribution_measured"] & (sl["epochs_since_measurement"] == 0)).numpy()
        rows.append({
            "val_acc": st["val_acc"].numpy().copy(),
            "acc_all_seeds_off": st["acc_all_seeds_off"].numpy().copy(),
            "stage": sl["stage"].numpy().astype(np.int64),
            "alpha": sl["alpha"].numpy().copy(),
            "blueprint": sl["blueprint"].numpy().astype(np.int64),
            "algorithm": sl["algorithm"].numpy().astype(np.int64),
            "germination_epoch": sl["germination_epoch"].numpy().astype(np.int64),
            "contribution": np.where(measured, sl["contribution"].numpy(), np.nan),
            "interaction_sum": sl["interaction_sum"].numpy().copy(),
        })

    record()  # no torch.no_grad(): the hosts backend trains with autograd inside advance
    for _ in range(cfg.max_epochs):
        out = engine.step(ctl.act(engine.state, engine.masks))
        terminated |= out["terminated"].numpy().reshape(-1)
        record()
    seconds = time.perf_counter() - start
    arrays = {k: np.stack([r[k] for r in rows], 1) for k in rows[0]}
    return Trajectories(
        backend=cfg.dynamics, controller=controller, terminated=terminated, seconds=seconds,
        meta={"n_envs": cfg.n_envs, "max_epochs": cfg.max_epochs, "n_slots": cfg.n_slots, "seed": cfg.seed},
        **arrays,
    )

