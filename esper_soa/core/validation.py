"""Input validation: clear errors ("<where>: expected X, got Y") instead of tracebacks or silently
accepted garbage.

Scalar checks (``expect_int``, ``expect_bool``, ``expect_float``, ``expect_choice``) serve the
config dataclasses and the engine's entry points: bools are not ints, floats must be finite, and
numpy scalars are accepted and converted to Python ones.

Action validation (SPEC §4 step 1): metadata checks (keys, shape, dtype, device) are free and
always run. Value checks (range, masks) read the tensors back to the host, so they run only when
``check_values`` is set (``EngineConfig.validate_actions``); with it off, the compiled step
executes any invalid or out-of-range action as WAIT with ``last_action_success = 0``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from esper_soa.core.spec import HEAD_NAMES, HEAD_RELEVANCE, head_sizes, stack_action

if TYPE_CHECKING:
    from esper_soa.core.config import EngineConfig

T = TypeVar("T")


def bad_value(where: str, expected: str, got: object) -> ValueError:
    """The one error format: ``<where>: expected <expected>, got <got!r>``."""
    return ValueError(f"{where}: expected {expected}, got {got!r}")


def _range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return f" <= {high}" if high is not None else ""


def expect_int(where: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]``; bools, floats and strings are refused."""
    expected = "an int" + _range(low, high)
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise bad_value(where, expected, value)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad_value(where, expected, value)
    return value


def expect_bool(where: str, value: object) -> bool:
    """``value`` as a Python bool; ints and strings such as ``'no'`` are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise bad_value(where, "a bool", value)
    return bool(value)


def expect_float(
    where: str, value: object, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a finite Python float in the range (``low_open``: ``low`` itself excluded)."""
    expected = "a finite number" + _range(low, high, low_open)
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise bad_value(where, expected, value)
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        raise bad_value(where, expected, value)
    return value


def expect_choice(where: str, value: object, choices: tuple) -> Any:
    """``value`` if it is one of ``choices`` (compared by type and value: ``True`` is not ``1``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise bad_value(where, f"one of {choices}", value)
    return value


def backend_config(where: str, given: object, cls: type[T]) -> T:
    """A backend's config from ``EngineConfig.dynamics_config``: ``None`` (defaults), an instance
    of ``cls``, or a dict of its fields (unknown fields named in the error)."""
    if given is None:
        return cls()
    if isinstance(given, cls):
        return given
    if isinstance(given, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in given if k not in names)
        if unknown:
            raise bad_value(where, f"fields of {cls.__name__} {sorted(names)}", f"unknown {unknown}")
        return cls(**given)
    raise bad_value(where, f"None, a {cls.__name__} or a dict of its fields", given)


def validate_action(
    action: torch.Tensor | Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    cfg: EngineConfig,
    check_values: bool = True,
) -> torch.Tensor:
    """The action as the compiled step takes it, ``[E, 8]`` int64 contiguous (heads in
    ``HEAD_NAMES`` order), from ``[E, 8]`` integers or one ``[E]`` tensor per head; raises
    ``ValueError`` naming the head, what was expected and what came."""
    device = cfg.torch_device
    sizes = head_sizes(cfg.n_slots)
    if isinstance(action, torch.Tensor):
        expected = (cfg.n_envs, len(HEAD_NAMES))
        if tuple(action.shape) != expected:
            raise ValueError(f"action: expected shape {expected} (one column per head {HEAD_NAMES}), got {tuple(action.shape)}")
        _check_meta("action", action, device)
        heads = dict(zip(HEAD_NAMES, action.unbind(-1)))
    else:
        if not isinstance(action, Mapping) and not hasattr(action, "keys"):
            raise bad_value(
                "action", f"an [E, 8] tensor, or a dict or TensorDict of the heads {HEAD_NAMES}", type(action).__name__
            )
        extra = sorted(str(k) for k in action.keys() if k not in HEAD_NAMES)
        if extra:
            raise ValueError(f"action: unknown heads {extra}; expected exactly the heads {HEAD_NAMES}")
        for name in HEAD_NAMES:
            if name not in action:
                raise ValueError(f"action: missing head {name!r}; expected heads {HEAD_NAMES}")
            a = action[name]
            if not isinstance(a, torch.Tensor):
                raise ValueError(
                    f"action[{name!r}]: expected a torch.Tensor, got {type(a).__name__} (convert with torch.as_tensor)"
                )
            if a.shape != (cfg.n_envs,):
                raise ValueError(f"action[{name!r}]: expected shape ({cfg.n_envs},), got {tuple(a.shape)}")
            _check_meta(f"action[{name!r}]", a, device)
        heads = {name: action[name] for name in HEAD_NAMES}
    if check_values:
        _check_values(heads, masks, sizes, cfg.n_envs)
    if isinstance(action, torch.Tensor):
        return action.to(torch.int64).contiguous()  # the compiled step guards on dtype and strides
    return stack_action(heads)


def _check_meta(where: str, a: torch.Tensor, device: torch.device) -> None:
    if a.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{where}: expected an integer dtype, got {a.dtype}")
    if a.device != device:
        raise ValueError(f"{where}: expected device {device}, got {a.device}")


def _check_values(
    heads: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], sizes: Mapping[str, int], n_envs: int
) -> None:
    """Ranges, then the masks (``head`` rows, the slot under ``slot_by_op[op]``); syncs."""
    for name in HEAD_NAMES:
        a = heads[name]
        bad = (a < 0) | (a >= sizes[name])
        if bool(bad.any()):
            env = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"action[{name!r}]: expected indices in [0, {sizes[name]}), got {int(a[env])} at env {env}"
            )
    op = heads["op"].long()
    rows = torch.arange(n_envs, device=op.device)
    relevance = torch.tensor(HEAD_RELEVANCE, dtype=torch.bool, device=op.device)[op]
    head = masks["head"]
    checks = [("op", head[rows, 0, op])]
    for i, name in enumerate(HEAD_NAMES[1:], start=1):
        index = heads[name].long()
        allowed = masks["slot_by_op"][rows, op, index] if name == "slot" else head[rows, i, index]
        checks.append((name, allowed | ~relevance[:, i]))  # irrelevant heads are never checked
    for name, ok in checks:
        if not bool(ok.all()):
            env = int((~ok).nonzero()[0, 0])
            where = f"masks['slot_by_op'][env, {int(op[env])}]" if name == "slot" else f"masks['head'][env, {HEAD_NAMES.index(name)}]"
            raise ValueError(
                f"action[{name!r}] = {int(heads[name][env])} at env {env} is masked "
                f"(op = {int(op[env])}); expected an index where {where} is True"
            )
