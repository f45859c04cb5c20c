"""Struct-of-arrays lifecycle state (SPEC §3).

The state is a TensorDict with batch dims ``[E]`` holding the per-env fields and a nested
``"slots"`` TensorDict with batch dims ``[E, S]``. Field tables below are the single list of
fields with their dtype and *neutral* value (what an empty slot or a fresh env holds); the
reference oracle exports the same names so differential tests compare field by field.

Inside compiled transitions the state travels as a plain nested ``dict`` of tensors
(:func:`as_dict`), which dynamo traces without TensorDict overhead, with the bool flags as
int32 0/1 (``FLAG``); :func:`from_dict` gives the bool TensorDict back.

Slot fields are stored *slot-major*: each ``[E, S]`` tensor is the transposed view of an
``[S, E]`` buffer. With S = 3, an env-major layout leaves the compiler a 3-wide innermost loop
(masked 16-lane vectors on CPU); slot-major gives it full-width vector loops over envs. The
logical shape, indexing and TensorDict batch dims stay ``[E, S]``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import HISTORY_LEN, AlphaMode, Stage

State = dict  # nested {"field": Tensor[E,...], "slots": {"field": Tensor[E,S]}}

F, I, B = torch.float32, torch.int64, torch.bool
I32 = torch.int32  # small per-slot counters and codes: half the memory traffic of int64

# name -> (dtype, neutral value)
SLOT_FIELDS: dict[str, tuple[torch.dtype, float]] = {
    "stage": (I32, int(Stage.DORMANT)),
    "previous_stage": (I32, int(Stage.UNKNOWN)),
    "epochs_in_stage": (I32, 0),
    "previous_epochs_in_stage": (I32, 0),
    "seed_age": (I32, 0),
    "germination_epoch": (I32, 0),
    "blueprint": (I, 0),  # int64: it indexes blueprint tables (gather)
    "algorithm": (I32, 0),
    "tempo": (I32, 0),  # first-ramp length in epochs (3/5/8), 0 when empty
    "germination_alpha_target": (F, 0.0),
    "alpha": (F, 0.0),
    "alpha_start": (F, 0.0),
    "alpha_target": (F, 0.0),
    "alpha_mode": (I32, int(AlphaMode.HOLD)),
    "alpha_curve": (I32, 0),
    "alpha_steepness": (F, 0.0),
    "alpha_steps_total": (I32, 0),
    "alpha_steps_done": (I32, 0),
    "pending_prune": (B, False),
    "accuracy_at_germination": (F, 0.0),  # val_acc of the seed's first recorded epoch
    "germination_val_acc": (F, 0.0),  # val_acc when GERMINATE ran (the reward's p)
    "accuracy_at_stage_start": (F, 0.0),
    "contribution": (F, 0.0),
    "contribution_measured": (B, False),
    "epochs_since_measurement": (I32, 0),
    "previous_contribution": (F, 0.0),
    "contribution_velocity": (F, 0.0),
    "interaction_sum": (F, 0.0),
    "gradient_norm": (F, 0.0),
    "gradient_health": (F, 0.0),
    "previous_gradient_health": (F, -1.0),  # health as of the last decision; -1 = not measured then
    "gradient_measured": (B, False),
    "gradient_ratio": (F, 0.0),
    "has_vanishing": (B, False),
    "has_exploding": (B, False),
    "seed_params": (F, 0.0),
    "previous_alpha": (F, 0.0),
}

# The bool slot fields travel through the transitions as int32 0/1 (``as_dict``; ``from_dict``
# turns them back): inductor's CPU code stores a bool buffer through a generic element-by-element
# helper, about 10x slower than an int32 store, and the transitions rewrite these flags every
# step. The batched code therefore reads a flag as ``flag != 0``, which holds for either dtype.
FLAG = I32
FLAG_FIELDS = frozenset(k for k, (dtype, _) in SLOT_FIELDS.items() if dtype == B)

# name -> (dtype, neutral value, trailing shape)
ENV_FIELDS: dict[str, tuple[torch.dtype, float, tuple[int, ...]]] = {
    "epoch": (I, 0, ()),
    "val_loss": (F, 0.0, ()),
    "val_acc": (F, 0.0, ()),
    "acc_all_seeds_off": (F, 0.0, ()),
    "acc_committed": (F, 0.0, ()),  # val_acc with every non-FOSSILIZED seed off (what is committed)
    "loss_history": (F, 0.0, (HISTORY_LEN,)),
    "acc_history": (F, 0.0, (HISTORY_LEN,)),
    "history_len": (I, 0, ()),
    "host_params": (F, 0.0, ()),
    "n_fossilized": (I, 0, ()),
    "last_op": (I, 0, ()),
    "last_action_success": (F, 1.0, ()),
    "episode_return": (F, 0.0, ()),
}


def _fill(shape: tuple[int, ...], dtype: torch.dtype, value: float, device: torch.device) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype, device=device)


def make_state(cfg: EngineConfig, device: torch.device | str | None = None) -> TensorDict:
    """Allocate a neutral state ``[E]`` (+ ``[E, S]`` slots) on ``device`` (default: cfg.device)."""
    dev = cfg.torch_device if device is None else torch.device(device)
    e, s = cfg.n_envs, cfg.n_slots
    slots = TensorDict(
        {k: _fill((s, e), dt, v, dev).T for k, (dt, v) in SLOT_FIELDS.items()},
        batch_size=[e, s],
        device=dev,
    )
    td = TensorDict(
        {k: _fill((e, *shape), dt, v, dev) for k, (dt, v, shape) in ENV_FIELDS.items()},
        batch_size=[e],
        device=dev,
    )
    td["slots"] = slots
    return td


def as_dict(td: TensorDict) -> State:
    """The state as the nested plain dict the transitions take, flags as int32 0/1 (see FLAG)."""
    d = td.to_dict()
    d["slots"] = {k: v.to(FLAG) if k in FLAG_FIELDS else v for k, v in d["slots"].items()}
    return d


def from_dict(d: State, n_envs: int, n_slots: int, device: torch.device) -> TensorDict:
    """Wrap a nested dict produced by the transitions back into the state TensorDict."""
    slots = {k: v != 0 if k in FLAG_FIELDS else v for k, v in d["slots"].items()}
    slots = TensorDict(slots, batch_size=[n_envs, n_slots], device=device)
    env = {k: v for k, v in d.items() if k != "slots"}
    td = TensorDict(env, batch_size=[n_envs], device=device)
    td["slots"] = slots
    return td


def slot_major(slots: State) -> State:
    """Every slot field in the slot-major layout (a no-op for fields already in it)."""
    return {k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in slots.items()}


def neutral_slots_like(slots: State) -> State:
    """Neutral values with the shapes/dtypes/devices of ``slots`` (what a cleared slot holds)."""
    return {k: torch.full_like(slots[k], SLOT_FIELDS[k][1]) for k in SLOT_FIELDS}


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)``; bool values as ``(mask & a) | (~mask & b)``, which inductor's
    CPU code keeps in vector mask registers (its vectorized bool ``where`` is an element loop)."""
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return (mask & a) | (~mask & b)
    return torch.where(mask, a, b)


def update(fields: State, sel: torch.Tensor, **values: torch.Tensor | float | int | bool) -> None:
    """In the dict ``fields``, replace each named tensor by ``where(sel, value, old)``.

    Values are evaluated by the caller before any write, so ``previous_x=fields["x"]`` reads the
    old value. Python scalars are cast to the field's dtype (no silent int->float promotion).
    """
    for name, value in values.items():
        old = fields[name]
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=old.dtype, device=old.device)
        fields[name] = select(sel, value.to(old.dtype), old)


def where_slots(mask: torch.Tensor, a: State, b: State) -> State:
    """Per-field ``torch.where(mask, a, b)`` over every slot field; ``mask`` broadcasts to [E,S]."""
    return {k: select(mask, a[k], b[k]) for k in a}


def reset_rows(state: State, fresh: State, rows: torch.Tensor) -> State:
    """Take ``fresh`` values for the envs where ``rows`` ([E] bool) is set, keep the rest.

    Uses ``torch.where`` (no boolean-index writes), so it stays compile- and sync-free.
    """
    out = {}
    for k, v in state.items():
        if k == "slots":
            out[k] = where_slots(rows[:, None], fresh["slots"], v)
        else:
            m = rows.reshape(rows.shape + (1,) * (v.dim() - 1))
            out[k] = select(m, fresh[k], v)
    return out
