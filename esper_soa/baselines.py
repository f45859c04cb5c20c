"""Baseline controllers as TensorDict policies that TorchRL collectors can drive.

``RandomMaskedPolicy`` draws a uniformly random *valid* action (op first, then a slot the op
allows). ``HeuristicPolicy`` runs the tensorized SPEC §14a controller on the engine's state.
``WaitPolicy`` always WAITs: the host learns alone (the reference every seed is judged against).
All write ``("action", head)`` for every head and never sync with the host.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from esper_soa.env import MASK_KEYS, EsperEnv
from esper_soa.heuristic import HeuristicConfig, HeuristicController
from esper_soa.masks import sample_masked_action
from esper_soa.spec import HEAD_NAMES, Op

ACTION_KEYS = [("action", h) for h in HEAD_NAMES]


class RandomMaskedPolicy(TensorDictModuleBase):
    """Uniform over valid actions, seeded by its own generator (reproducible rollouts)."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_keys = [("masks", k) for k in MASK_KEYS]
        self.out_keys = list(ACTION_KEYS)
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        masks = {k: tensordict.get(("masks", k)) for k in MASK_KEYS}
        for name, value in sample_masked_action(masks, self.generator).items():
            tensordict.set(("action", name), value)
        return tensordict


def wait_action(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """WAIT for every env (on a slot WAIT allows), every other head at its first valid value."""
    action = {h: masks[h].to(torch.int64).argmax(-1) for h in HEAD_NAMES if h not in ("op", "slot")}
    action["op"] = torch.full_like(action[next(iter(action))], int(Op.WAIT))
    action["slot"] = masks["slot_by_op"][:, int(Op.WAIT)].to(torch.int64).argmax(-1)
    return {h: action[h] for h in HEAD_NAMES}


class WaitPolicy(TensorDictModuleBase):
    """Always WAIT (SPEC §9's always-valid op): the host-alone baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.in_keys = [("masks", k) for k in MASK_KEYS]
        self.out_keys = list(ACTION_KEYS)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        masks = {k: tensordict.get(("masks", k)) for k in MASK_KEYS}
        for name, value in wait_action(masks).items():
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
        state = self.engine.state
        self.controller.reset(state["epoch"] == 0)
        masks = {k: tensordict.get(("masks", k)) for k in MASK_KEYS}
        for name, value in self.controller.act(state, masks).items():
            tensordict.set(("action", name), value)
        return tensordict
