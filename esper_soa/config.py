"""Engine configuration: one validated dataclass, shared by the engine, the reference and the env."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from esper_soa.spec import OBS_BASE, OBS_SLOT, TOPOLOGY_BLUEPRINTS

GATE_MODES = ("permissive", "strict")
REWARD_MODES = ("shaped", "sparse", "minimal", "simplified")
MAX_SLOTS = 16


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one batched engine.

    ``enabled_slots`` (default: all) lets a config enable a subset of the S slot positions
    (SPEC §1): disabled slots stay DORMANT, are masked for every op, and count in S.
    ``max_seeds`` caps the number of slots holding a seed at once (0 = no cap).
    ``threads`` is the number of OpenMP threads inside the compiled CPU step (0 =
    ``torch.get_num_threads()`` when the engine is built). Inductor bakes it into the kernels at
    compile time; the default 1 has no parallel regions, so no barrier waits for a thread that
    a neighbouring process has descheduled (bench/RESULTS.md, "Threads under load").
    """

    n_envs: int = 8
    n_slots: int = 3
    topology: str = "cnn"
    max_epochs: int = 150
    gate_mode: str = "permissive"
    auto_forward_g1: bool = False
    auto_forward_g2: bool = False
    auto_forward_g3: bool = False
    max_seeds: int = 0
    enabled_slots: tuple[bool, ...] | None = None
    reward_mode: str = "shaped"
    seed: int = 0
    device: str | torch.device = "cpu"
    dynamics: str = "surrogate"
    dynamics_config: Any = None
    compile: bool = False
    threads: int = 1
    validate_actions: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str, got: object) -> ValueError:
            return ValueError(f"EngineConfig.{name}: expected {expected}, got {got!r}")

        if not isinstance(self.n_envs, int) or self.n_envs < 1:
            raise bad("n_envs", "an int >= 1", self.n_envs)
        if not isinstance(self.n_slots, int) or not 1 <= self.n_slots <= MAX_SLOTS:
            raise bad("n_slots", f"an int in 1..{MAX_SLOTS}", self.n_slots)
        if self.topology not in TOPOLOGY_BLUEPRINTS:
            raise bad("topology", f"one of {tuple(TOPOLOGY_BLUEPRINTS)}", self.topology)
        if not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise bad("max_epochs", "an int >= 1", self.max_epochs)
        if self.gate_mode not in GATE_MODES:
            raise bad("gate_mode", f"one of {GATE_MODES}", self.gate_mode)
        if self.reward_mode not in REWARD_MODES:
            raise bad("reward_mode", f"one of {REWARD_MODES}", self.reward_mode)
        if not isinstance(self.max_seeds, int) or self.max_seeds < 0:
            raise bad("max_seeds", "an int >= 0 (0 = no limit)", self.max_seeds)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise bad("threads", "an int >= 0 (0 = torch.get_num_threads())", self.threads)
        if self.enabled_slots is not None:
            if len(self.enabled_slots) != self.n_slots or not any(self.enabled_slots):
                raise bad(
                    "enabled_slots",
                    f"{self.n_slots} booleans with at least one True",
                    self.enabled_slots,
                )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise bad("device", "a torch device", self.device) from exc

    @functools.cached_property
    def torch_device(self) -> torch.device:
        """The device as tensors report it: ``"cuda"`` becomes ``cuda:<current index>``, so
        device checks compare like with like."""
        return torch.empty(0, device=self.device).device

    @property
    def compile_options(self) -> dict[str, int]:
        """Inductor options of the compiled step: its CPU kernels' thread count."""
        return {"cpp.threads": self.threads or torch.get_num_threads()}

    @property
    def slots_enabled(self) -> tuple[bool, ...]:
        return tuple(self.enabled_slots) if self.enabled_slots is not None else (True,) * self.n_slots

    @property
    def strict_gates(self) -> bool:
        return self.gate_mode == "strict"

    @property
    def all_auto_forward(self) -> bool:
        return self.auto_forward_g1 and self.auto_forward_g2 and self.auto_forward_g3

    @property
    def obs_dim(self) -> int:
        return OBS_BASE + OBS_SLOT * self.n_slots
