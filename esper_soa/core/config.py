"""Engine configuration: one validated dataclass, shared by the engine, the reference and the env."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from esper_soa.core.spec import OBS_BASE, OBS_SLOT, TOPOLOGY_BLUEPRINTS
from esper_soa.core.validation import bad_value, expect_bool, expect_choice, expect_int

GATE_MODES = ("permissive", "strict")
REWARD_MODES = ("committed", "shaped", "sparse", "minimal", "simplified")
MAX_SLOTS = 16
DYNAMICS = ("surrogate", "hosts")
MAX_SEED = 2**63 - 1  # seeds are folded into the RNG as int64
MAX_ENV_INDEX = 2**62  # env indices are folded into the RNG as int64 (arange must not overflow)


def _is_dataclass_instance(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one batched engine.

    ``enabled_slots`` (default: all) lets a config enable a subset of the S slot positions
    (SPEC §1): disabled slots stay DORMANT, are masked for every op, and count in S.
    ``max_seeds`` caps the number of slots holding a seed at once (0 = no cap).
    ``env_offset`` is the global index of env 0: every per-env random stream is keyed by
    ``env_offset + e``, so a data-parallel rank owning envs ``[k, k + n_envs)`` of a larger run
    (``env_offset=k``) draws exactly what a single process with all the envs draws for them.
    ``threads`` is the number of OpenMP threads inside the compiled CPU step (0 =
    ``torch.get_num_threads()`` when the engine is built). Inductor bakes it into the kernels at
    compile time; the default 1 has no parallel regions, so no barrier waits for a thread that
    a neighbouring process has descheduled (bench/RESULTS.md, "Threads under load").
    """

    n_envs: int = 8
    env_offset: int = 0
    n_slots: int = 3
    topology: str = "cnn"
    max_epochs: int = 150
    gate_mode: str = "permissive"
    auto_forward_g1: bool = False
    auto_forward_g2: bool = False
    auto_forward_g3: bool = False
    max_seeds: int = 0
    enabled_slots: tuple[bool, ...] | None = None
    reward_mode: str = "committed"
    seed: int = 0
    device: str | torch.device = "cpu"
    dynamics: str = "surrogate"
    dynamics_config: Any = None
    compile: bool = False
    threads: int = 1
    validate_actions: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str, got: object) -> ValueError:
            return bad_value(f"EngineConfig.{name}", expected, got)

        def setint(name: str, low: int, high: int | None = None) -> None:
            object.__setattr__(self, name, expect_int(f"EngineConfig.{name}", getattr(self, name), low, high))

        setint("n_envs", 1)
        setint("env_offset", 0, MAX_ENV_INDEX + 1 - self.n_envs)
        setint("n_slots", 1, MAX_SLOTS)
        expect_choice("EngineConfig.topology", self.topology, tuple(TOPOLOGY_BLUEPRINTS))
        setint("max_epochs", 1)
        expect_choice("EngineConfig.gate_mode", self.gate_mode, GATE_MODES)
        expect_choice("EngineConfig.reward_mode", self.reward_mode, REWARD_MODES)
        setint("max_seeds", 0)
        setint("seed", 0, MAX_SEED)
        for name in ("auto_forward_g1", "auto_forward_g2", "auto_forward_g3", "compile", "validate_actions"):
            object.__setattr__(self, name, expect_bool(f"EngineConfig.{name}", getattr(self, name)))
        setint("threads", 0)  # 0 = torch.get_num_threads()
        if self.enabled_slots is not None:
            slots = self.enabled_slots
            expected = f"None or {self.n_slots} bools with at least one True"
            if not isinstance(slots, (tuple, list)) or len(slots) != self.n_slots or not any(slots):
                raise bad("enabled_slots", expected, slots)
            if not all(isinstance(v, bool) for v in slots):
                raise bad("enabled_slots", expected, slots)
            object.__setattr__(self, "enabled_slots", tuple(slots))
        expect_choice("EngineConfig.dynamics", self.dynamics, DYNAMICS)
        given = self.dynamics_config
        if given is not None and not isinstance(given, Mapping) and not _is_dataclass_instance(given):
            raise bad("dynamics_config", "None, the backend's config dataclass or a dict of its fields", given)
        if not isinstance(self.device, (str, torch.device)):
            raise bad("device", "a torch device or its name ('cpu', 'cuda:0', ...)", self.device)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise bad("device", "a torch device", self.device) from exc
        try:
            self.torch_device  # noqa: B018 (builds a tensor there: fails now, not at the first step)
        except (RuntimeError, AssertionError) as exc:
            raise bad("device", f"a device this torch build can use ({exc})", self.device) from exc

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
