"""Spec tables as code: the single source of truth for SPEC.md §2 and its constants.

Integer codes are part of the contract (SPEC §2). Everything else in the package (the batched
engine, the reference oracle, the policy) reads the enums and constants from here; the batched
engine additionally reads the tensor lookup tables built by :class:`SpecTables`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import IntEnum

import torch


class Stage(IntEnum):
    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    HOLDING = 6
    FOSSILIZED = 7
    PRUNED = 8
    EMBARGOED = 9
    RESETTING = 10


N_STAGE_CODES = 11  # codes 0..10 (5 unused)
N_STAGE_ONEHOT = 10


def stage_onehot_index(code: int) -> int:
    """Index of a stage code in the 10-dim one-hot (code for 0..4, code-1 for 6..10)."""
    return code if code <= 4 else code - 1


class Op(IntEnum):
    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    PRUNE = 3
    FOSSILIZE = 4
    ADVANCE = 5


class Blueprint(IntEnum):
    NOOP = 0
    CONV_LIGHT = 1
    ATTENTION = 2
    NORM = 3
    DEPTHWISE = 4
    BOTTLENECK = 5
    CONV_SMALL = 6
    CONV_HEAVY = 7
    LORA = 8
    LORA_LARGE = 9
    MLP_SMALL = 10
    MLP = 11
    FLEX_ATTENTION = 12


class Style(IntEnum):
    LINEAR_ADD = 0
    LINEAR_MULTIPLY = 1
    SIGMOID_ADD = 2
    GATED_GATE = 3


class AlphaCurve(IntEnum):
    LINEAR = 0
    COSINE = 1
    SIGMOID_GENTLE = 2
    SIGMOID = 3
    SIGMOID_SHARP = 4


class AlphaMode(IntEnum):
    HOLD = 0
    UP = 1
    DOWN = 2


class AlphaAlgorithm(IntEnum):
    NONE = 0  # neutral value of an empty slot
    ADD = 1
    MULTIPLY = 2
    GATE = 3


# --- head value tables (index -> value) -------------------------------------------------------
TEMPO_EPOCHS = (3, 5, 8)  # FAST, STANDARD, SLOW
ALPHA_TARGETS = (0.5, 0.7, 1.0)  # HALF, SEVENTY, FULL
ALPHA_SPEED_TICKS = (0, 3, 5, 8)  # INSTANT, FAST, MEDIUM, SLOW
CURVE_STEEPNESS = (0.0, 0.0, 6.0, 12.0, 24.0)  # k per AlphaCurve (0 = not a sigmoid)
# Style -> (initial ramp curve, blend algorithm)
STYLE_CURVE = (AlphaCurve.LINEAR, AlphaCurve.LINEAR, AlphaCurve.SIGMOID, AlphaCurve.LINEAR)
STYLE_ALGORITHM = (
    AlphaAlgorithm.ADD,
    AlphaAlgorithm.MULTIPLY,
    AlphaAlgorithm.ADD,
    AlphaAlgorithm.GATE,
)
# Blueprint index of an empty slot in the observation's index tensor (the original's contract;
# an embedding maps it to a learned null row, see policy.BlueprintEmbedding).
EMPTY_BLUEPRINT_INDEX = -1
STYLE_DEFAULT = Style.SIGMOID_ADD  # the only style left unmasked when no op uses the head
ALPHA_TARGET_DEFAULT = 2  # FULL

# Action heads in contract order (SPEC §2). The slot head's size is the configured S.
HEAD_NAMES = ("op", "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")
# Enum members as plain tuples: code under torch.compile iterates these, not the enum classes
# (dynamo in torch 2.11 on Python 3.12 cannot trace ``iter(EnumClass)``).
OPS: tuple[Op, ...] = tuple(Op)

FIXED_HEAD_SIZES = {
    "op": len(Op),
    "blueprint": len(Blueprint),
    "style": len(Style),
    "tempo": len(TEMPO_EPOCHS),
    "alpha_target": len(ALPHA_TARGETS),
    "alpha_speed": len(ALPHA_SPEED_TICKS),
    "alpha_curve": len(AlphaCurve),
}


def head_sizes(n_slots: int) -> dict[str, int]:
    """Number of categories of every action head, in contract order."""
    return {name: (n_slots if name == "slot" else FIXED_HEAD_SIZES[name]) for name in HEAD_NAMES}


def mask_width(n_slots: int) -> int:
    """K: the padded width of the ``head`` mask and of the policy's logits (the largest head)."""
    return max(head_sizes(n_slots).values())


def head_mask_sources(n_slots: int, blueprint_valid: tuple[bool, ...]) -> list[int]:
    """Where each entry of the padded head mask (``[8, K]`` flattened, SPEC §9) comes from: an index
    into the per-env source rows ``[op 0..5 | slot 0..S-1 (union over ops) | styled | 0 | 1]``
    that ``masks.mask_flags`` gathers. Blueprints are fixed by the topology; style and
    alpha_target are free only where an op that uses them (GERMINATE, SET_ALPHA_TARGET) is
    allowed, else only their default; tempo, alpha_speed and alpha_curve are always free;
    padding is 0."""
    styled, zero, one = len(Op) + n_slots, len(Op) + n_slots + 1, len(Op) + n_slots + 2
    by_head = {
        "op": list(range(len(Op))),
        "slot": list(range(len(Op), len(Op) + n_slots)),
        "blueprint": [one if valid else zero for valid in blueprint_valid],
        "style": [one if i == int(STYLE_DEFAULT) else styled for i in range(len(Style))],
        "tempo": [one] * len(TEMPO_EPOCHS),
        "alpha_target": [one if i == ALPHA_TARGET_DEFAULT else styled for i in range(len(ALPHA_TARGETS))],
        "alpha_speed": [one] * len(ALPHA_SPEED_TICKS),
        "alpha_curve": [one] * len(AlphaCurve),
    }
    width = mask_width(n_slots)
    return [i for name in HEAD_NAMES for i in by_head[name] + [zero] * (width - len(by_head[name]))]


# Causal relevance of heads per op (SPEC §9): rows = op, in HEAD_NAMES order.
_RELEVANT_HEADS = {
    Op.WAIT: {"op"},
    Op.GERMINATE: {"op", "slot", "blueprint", "tempo", "style", "alpha_target"},
    Op.SET_ALPHA_TARGET: {"op", "slot", "style", "alpha_target", "alpha_speed", "alpha_curve"},
    Op.PRUNE: {"op", "slot", "alpha_speed", "alpha_curve"},
    Op.FOSSILIZE: {"op", "slot"},
    Op.ADVANCE: {"op", "slot"},
}
HEAD_RELEVANCE = tuple(tuple(h in _RELEVANT_HEADS[op] for h in HEAD_NAMES) for op in Op)

# --- lifecycle constants ----------------------------------------------------------------------
MIN_PRUNE_AGE = 5
EMBARGO_EPOCHS = 5
RESETTING_EPOCHS = 1
G2_MIN_EPOCHS = 10
G2_MIN_HEALTH = 0.7
G2_STRICT_IMPROVEMENT = 0.5  # percentage points
G2_STRICT_GRAD_RATIO = 0.10
G3_STRICT_MIN_EPOCHS = 10
G5_STRICT_CONTRIBUTION = 1.0  # percentage points
ALPHA_ATOL = 1e-6
HISTORY_LEN = 5
OBS_BASE = 23
OBS_SLOT = 31
CF_FRESHNESS_DECAY = 0.995
GAMMA = 0.995

# stages counted by the observation's three "seeds in stage" features: the original counts
# FOSSILIZED seeds with the HOLDING ones (its ``batch_obs_to_features``)
OBS_STAGE_COUNTS = ((Stage.TRAINING,), (Stage.BLENDING,), (Stage.HOLDING, Stage.FOSSILIZED))
LIVE_STAGES = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)
PRUNABLE_STAGES = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)
ADVANCEABLE_STAGES = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING)
GERMINATE_BLOCKING_STAGES = (
    Stage.GERMINATED,
    Stage.TRAINING,
    Stage.PRUNED,
    Stage.EMBARGOED,
    Stage.RESETTING,
)
# Stages whose seed gets a counterfactual when its alpha > 0: the original stops measuring
# FOSSILIZED seeds (their last contribution stays); PRUNED and later have no seed module.
COUNTERFACTUAL_STAGES = PRUNABLE_STAGES
# Stages whose seed reports gradient telemetry (the original collects it for these two only).
GRADIENT_STAGES = (Stage.TRAINING, Stage.BLENDING)

# --- topology and blueprints ------------------------------------------------------------------
TOPOLOGY_BLUEPRINTS = {
    "cnn": (1, 2, 3, 4, 5, 6, 7),
    "transformer": (2, 3, 8, 9, 10, 11, 12),
}
# Default slot widths (channels for cnn, model dim for transformer); slot i uses widths[i % len].
DEFAULT_SLOT_WIDTHS = {"cnn": (32, 64, 128), "transformer": (128,)}


def blueprint_params(blueprint: int, width: int) -> int:
    """Parameter count of a blueprint inserted at a slot of the given width.

    Formulas follow the module each blueprint names (3x3 convs with a norm, SE-style attention,
    rank-8/32 adapters, 1x/4x MLPs, q/k/v/o projections); they are what the rent term prices.
    """
    c = width
    q = max(c // 4, 1)
    table = {
        Blueprint.NOOP: 0,
        Blueprint.CONV_LIGHT: 9 * c * c + 2 * c,
        Blueprint.ATTENTION: 2 * c * q + c + q,
        Blueprint.NORM: 2 * c,
        Blueprint.DEPTHWISE: 9 * c + c * c + 2 * c,
        Blueprint.BOTTLENECK: 2 * c * q + 9 * q * q + 2 * c,
        Blueprint.CONV_SMALL: c * c + 2 * c,
        Blueprint.CONV_HEAVY: 18 * c * c + 4 * c,
        Blueprint.LORA: 2 * 8 * c,
        Blueprint.LORA_LARGE: 2 * 32 * c,
        Blueprint.MLP_SMALL: 2 * c * c + 2 * c,
        Blueprint.MLP: 8 * c * c + 5 * c,
        Blueprint.FLEX_ATTENTION: 4 * c * c + 4 * c,
    }
    return table[Blueprint(blueprint)]


def slot_widths(topology: str, n_slots: int) -> tuple[int, ...]:
    widths = DEFAULT_SLOT_WIDTHS[topology]
    return tuple(widths[i % len(widths)] for i in range(n_slots))


def alpha_progress(t: float, curve: int, steepness: float) -> float:
    """Scalar p(t) of SPEC §7 (used by the reference; the engine has a tensor twin)."""
    if curve == AlphaCurve.LINEAR:
        return t
    if curve == AlphaCurve.COSINE:
        return (1.0 - math.cos(math.pi * t)) / 2.0
    k = steepness

    def s(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    lo, hi = s(-k / 2.0), s(k / 2.0)
    return (s(k * (t - 0.5)) - lo) / (hi - lo)


class SpecTables:
    """Tensor lookup tables on one device, built once per engine."""

    def __init__(
        self,
        topology: str,
        n_slots: int,
        device: torch.device | str = "cpu",
        enabled_slots: tuple[bool, ...] | None = None,
    ) -> None:
        dev = torch.device(device)
        f32 = dict(dtype=torch.float32, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        self.device = dev
        valid = torch.zeros(len(Blueprint), dtype=torch.bool, device=dev)
        valid[list(TOPOLOGY_BLUEPRINTS[topology])] = True
        self.blueprint_valid = valid
        widths = slot_widths(topology, n_slots)
        self.slot_widths = torch.tensor(widths, **f32)
        # [S, 13] parameter count of each blueprint at each slot
        self.blueprint_params = torch.tensor(
            [[float(blueprint_params(b, w)) for b in Blueprint] for w in widths], **f32
        )
        self.tempo_epochs = torch.tensor(TEMPO_EPOCHS, **i64)
        self.alpha_targets = torch.tensor(ALPHA_TARGETS, **f32)
        self.alpha_speed_ticks = torch.tensor(ALPHA_SPEED_TICKS, **i64)
        self.curve_steepness = torch.tensor(CURVE_STEEPNESS, **f32)
        self.style_curve = torch.tensor([int(c) for c in STYLE_CURVE], **i64)
        self.style_algorithm = torch.tensor([int(a) for a in STYLE_ALGORITHM], **i64)
        enabled = enabled_slots if enabled_slots is not None else (True,) * n_slots
        self.slot_enabled = torch.tensor(enabled, dtype=torch.bool, device=dev)
        self.head_mask_sources = torch.tensor(head_mask_sources(n_slots, tuple(valid.tolist())), **i64)
        self.head_relevance = torch.tensor(HEAD_RELEVANCE, dtype=torch.bool, device=dev)


# --- names shared by every layer (kept here, at the bottom, so nothing imports upward) ---------
# The host metrics a dynamics backend reports each epoch (SPEC §11); ``record_epoch`` reads them.
# name -> (dtype, per-slot?)  Per-env fields are [E]; per-slot fields are [E, S].
METRIC_FIELDS: dict[str, tuple[torch.dtype, bool]] = {
    "val_loss": (torch.float32, False),
    "val_acc": (torch.float32, False),  # percent
    "acc_all_seeds_off": (torch.float32, False),  # val_acc with every seed's alpha forced to 0
    "acc_committed": (torch.float32, False),  # val_acc with every non-FOSSILIZED seed's alpha at 0
    "host_params": (torch.float32, False),
    "diverged": (torch.bool, False),  # catastrophic divergence reported by the backend
    "acc_without_slot": (torch.float32, True),  # val_acc with this slot's alpha forced to 0
    "interaction_sum": (torch.float32, True),  # sum of pairwise interaction terms with other slots
    "gradient_norm": (torch.float32, True),
    "gradient_health": (torch.float32, True),  # in [0, 1]
    "gradient_ratio": (torch.float32, True),  # seed grad norm / host grad norm
    "has_vanishing": (torch.bool, True),
    "has_exploding": (torch.bool, True),
}

# The mask entries a step emits and every controller reads (``masks`` in the TorchRL output).
MASK_KEYS = ("head", "slot_by_op")  # head [E, 8, K] (padded, slot row = union), slot_by_op [E, 6, S]
# The action heads' TensorDict keys, in ``HEAD_NAMES`` order.
ACTION_KEYS = tuple(("action", h) for h in HEAD_NAMES)


def stack_action(action: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``{head: [...]}`` -> ``[..., 8]`` int64 in ``HEAD_NAMES`` order (the engine's action form)."""
    return torch.stack([action[name].long() for name in HEAD_NAMES], dim=-1)


def unstack_action(action: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[..., 8]`` -> ``{head: [...]}`` column views (no copies): the ``("action", head)`` keys."""
    return dict(zip(HEAD_NAMES, action.unbind(-1)))

DONE_KEYS = ("done", "terminated", "truncated")
# What a step reports about the state it reached, for evaluation and logs (SPEC §12b), [E] floats.
OUTCOME_KEYS = ("committed_gain", "acc_committed", "val_acc", "fossils")


def stage_in(stage: torch.Tensor, stages: tuple[Stage, ...]) -> torch.Tensor:
    """Elementwise membership of stage codes in a static set."""
    out = stage == int(stages[0])
    for s in stages[1:]:
        out = out | (stage == int(s))
    return out
