"""Action validation (SPEC §4 step 1): clear errors instead of silently executed garbage.

Metadata checks (keys, shape, dtype, device) are free and always run. Value checks (range,
masks) read the tensors back to the host, so they run only when ``check_values`` is set
(``EngineConfig.validate_actions``); with it off, the compiled step executes any invalid or
out-of-range action as WAIT with ``last_action_success = 0``.
"""

from __future__ import annotations

import torch

from esper_soa.config import EngineConfig
from esper_soa.spec import HEAD_NAMES, HEAD_RELEVANCE, head_sizes


def validate_action(
    action: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    cfg: EngineConfig,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming the head, what was expected and what came."""
    device = cfg.torch_device
    sizes = head_sizes(cfg.n_slots)
    for name in HEAD_NAMES:
        if name not in action:
            raise ValueError(f"action: missing head {name!r}; expected heads {HEAD_NAMES}")
        a = action[name]
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"action[{name!r}]: expected a torch.Tensor, got {type(a).__name__}")
        if a.shape != (cfg.n_envs,):
            raise ValueError(f"action[{name!r}]: expected shape ({cfg.n_envs},), got {tuple(a.shape)}")
        if a.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"action[{name!r}]: expected an integer dtype, got {a.dtype}")
        if a.device != device:
            raise ValueError(f"action[{name!r}]: expected device {device}, got {a.device}")
    if not check_values:
        return
    for name in HEAD_NAMES:
        a = action[name]
        bad = (a < 0) | (a >= sizes[name])
        if bool(bad.any()):
            env = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"action[{name!r}]: expected indices in [0, {sizes[name]}), got {int(a[env])} at env {env}"
            )
    op = action["op"].long()
    rows = torch.arange(cfg.n_envs, device=op.device)
    relevance = torch.tensor(HEAD_RELEVANCE, dtype=torch.bool, device=op.device)[op]
    checks = [("op", masks["op"][rows, op])]
    for i, name in enumerate(HEAD_NAMES[1:], start=1):
        index = action[name].long()
        allowed = masks["slot_by_op"][rows, op, index] if name == "slot" else masks[name][rows, index]
        checks.append((name, allowed | ~relevance[:, i]))  # irrelevant heads are never checked
    for name, ok in checks:
        if not bool(ok.all()):
            env = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"action[{name!r}] = {int(action[name][env])} at env {env} is masked "
                f"(op = {int(op[env])}); expected an index where mask_{name if name != 'slot' else 'slot_by_op[op]'} "
                f"is True"
            )
