"""Constants of the SPEC §14a heuristic controller, below both of its implementations.

The tensorized controller (:mod:`esper_soa.agents.heuristic`) and the plain-Python oracle
(:mod:`esper_soa.reference.heuristic`) read the same :class:`HeuristicConfig`; it lives in the core
so the reference does not import the agents layer. How the rules read it: docs/SEMANTICS.md
("Heuristic controller").
"""

from __future__ import annotations

from dataclasses import dataclass

from esper_soa.core.spec import (
    ALPHA_SPEED_TICKS,
    ALPHA_TARGETS,
    TEMPO_EPOCHS,
    TOPOLOGY_BLUEPRINTS,
    AlphaCurve,
    Blueprint,
    Style,
)

NEVER_PRUNED = 1_000_000  # epochs_since_prune of a controller that has not pruned (saturates here)


@dataclass(frozen=True)
class HeuristicConfig:
    """Every constant of the §14a controller (accuracies in percentage points, times in epochs)."""

    plateau_epsilon: float = 0.5  # an epoch-to-epoch val_acc gain <= this counts as no gain
    plateau_epochs: int = 3  # consecutive no-gain epochs that make a plateau
    min_epoch: int = 5  # no germination before this epoch
    prune_cooldown: int = 5  # no germination until this many epochs after the controller's last prune
    blueprint_penalty_on_prune: float = 2.0  # added to a blueprint's penalty when its seed is pruned
    blueprint_penalty_decay: float = 0.5  # per-epoch factor on every penalty
    blueprint_penalty_threshold: float = 3.0  # a blueprint is skipped while its penalty is >= this
    prune_after_epochs: int = 5  # TRAINING/BLENDING seeds are judged from this many epochs in stage
    accuracy_drop: float = 2.0  # prune when val_acc fell this much below accuracy_at_germination
    fossilize_contribution: float = 0.5  # HOLDING: fossilize from this contribution (with total >= 0)
    prune_contribution: float = 0.1  # HOLDING: prune above this contribution when total < 0
    prune_undecided_holding: bool = True  # prune a measured HOLDING seed no rule fossilizes (False: WAIT)
    cnn_rotation: tuple[int, ...] = (
        Blueprint.CONV_LIGHT,
        Blueprint.CONV_HEAVY,
        Blueprint.ATTENTION,
        Blueprint.NORM,
        Blueprint.DEPTHWISE,
    )
    transformer_rotation: tuple[int, ...] = (
        Blueprint.LORA,
        Blueprint.MLP,
        Blueprint.ATTENTION,
        Blueprint.NORM,
        Blueprint.MLP_SMALL,
    )
    germinate_style: int = Style.SIGMOID_ADD
    germinate_tempo: int = 1  # index into TEMPO_EPOCHS: STANDARD (5 epochs)
    germinate_alpha_target: int = 2  # index into ALPHA_TARGETS: FULL
    prune_alpha_speed: int = 0  # index into ALPHA_SPEED_TICKS: INSTANT
    prune_alpha_curve: int = AlphaCurve.LINEAR

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HeuristicConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("plateau_epochs", "min_epoch", "prune_cooldown", "prune_after_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "an int >= 0")
        if not 0.0 < self.blueprint_penalty_decay <= 1.0:
            raise bad("blueprint_penalty_decay", "a factor in (0, 1]")
        for name, n in (
            ("germinate_style", len(Style)),
            ("germinate_tempo", len(TEMPO_EPOCHS)),
            ("germinate_alpha_target", len(ALPHA_TARGETS)),
            ("prune_alpha_speed", len(ALPHA_SPEED_TICKS)),
            ("prune_alpha_curve", len(AlphaCurve)),
        ):
            if not 0 <= int(getattr(self, name)) < n:
                raise bad(name, f"an index in [0, {n})")
        for topology in TOPOLOGY_BLUEPRINTS:
            rotation = self.rotation(topology)
            if not rotation or any(b not in TOPOLOGY_BLUEPRINTS[topology] for b in rotation):
                allowed = TOPOLOGY_BLUEPRINTS[topology]
                raise bad(f"{topology}_rotation", f"a non-empty tuple of {topology} blueprints {allowed}")

    def rotation(self, topology: str) -> tuple[int, ...]:
        """Blueprint codes germinated in turn for ``topology``."""
        return tuple(int(b) for b in getattr(self, f"{topology}_rotation"))
