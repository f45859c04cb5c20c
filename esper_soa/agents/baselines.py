"""Baseline controllers as TensorDict policies that TorchRL collectors can drive.

``RandomMaskedPolicy`` draws a uniformly random *valid* action (op first, then a slot the op
allows); it is also the random controller of the engine-direct tools (``act``/``reset``, the
:class:`~esper_soa.agents.heuristic.HeuristicController` interface). ``HeuristicPolicy`` runs the tensorized SPEC §14a controller on the engine's state;
``ScriptedPolicy`` runs ``wait`` or one of the reward-probing controllers of
:mod:`esper_soa.agents.adversaries`. All write ``("action", head)`` for every head and never sync with
the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from esper_soa.agents.adversaries import (
    ADVERSARIES,
    adversary_config,
    adversary_step,
    wait_action,
)
from esper_soa.agents.heuristic import HeuristicConfig, HeuristicController
from esper_soa.core.masks import sample_masked_action
from esper_soa.core.spec import ACTION_KEYS, MASK_KEYS, unstack_action
from esper_soa.env.esper_env import EsperEnv

CONTROLLERS = ("random", "heuristic", "wait") + ADVERSARIES


class RandomMaskedPolicy(TensorDictModuleBase):
    """Uniform over valid actions, seeded by its own generator (reproducible rollouts)."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_keys = [("masks", k) for k in MASK_KEYS]
        self.out_keys = list(ACTION_KEYS)
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)

    def act(self, state: object, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[E, 8]`` random valid actions for ``masks`` (``state`` is not read)."""
        return sample_masked_action(masks, self.generator)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Stateless: nothing to forget."""

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = self.act(None, {k: tensordict.get(("masks", k)) for k in MASK_KEYS})
        for name, value in unstack_action(action).items():
            tensordict.set(("action", name), value)
        return tensordict


class HeuristicPolicy(TensorDictModuleBase):
    """The SPEC §14a controller as a collector policy.

    Like the original's rule-based Tamiyo it reads the host's lifecycle state directly (the
    engine's state, which is the state the incoming observation was made from), not just the
    observation. Its memory is forgotten for envs whose episode just started (epoch 0), so
    collectors' automatic resets need no extra hook.
    """

    def __init__(self, env: EsperEnv, hcfg: HeuristicConfig | None = None) -> None:
        super().__init__()
        self.in_keys = [("masks", k) for k in MASK_KEYS]
        self.out_keys = list(ACTION_KEYS)
        self.engine = env.engine
        self.controller = HeuristicController(env.cfg, hcfg)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        state = self.engine.lifecycle_state
        self.controller.reset(state["epoch"] == 0)
        masks = {k: tensordict.get(("masks", k)) for k in MASK_KEYS}
        for name, value in self.controller.act(state, masks).items():
            tensordict.set(("action", name), value)
        return tensordict


class ScriptedPolicy(TensorDictModuleBase):
    """``wait`` (WAIT on the first slot WAIT allows, every step) or one of
    :data:`esper_soa.agents.adversaries.ADVERSARIES`, as a collector policy reading the engine's state."""

    def __init__(self, env: EsperEnv, name: str) -> None:
        super().__init__()
        self.in_keys = [("masks", k) for k in MASK_KEYS]
        self.out_keys = list(ACTION_KEYS)
        self.engine = env.engine
        self.cfg = env.cfg
        self.acfg = None if name == "wait" else adversary_config(name)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        masks = {k: tensordict.get(("masks", k)) for k in MASK_KEYS}
        if self.acfg is None:
            action = wait_action(masks)
        else:
            action = adversary_step(self.engine.lifecycle_state, masks, self.acfg, self.cfg)
        for name, value in action.items():
            tensordict.set(("action", name), value)
        return tensordict
