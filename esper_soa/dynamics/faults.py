"""Fault injection: a backend wrapper that makes chosen envs diverge at chosen steps.

Catastrophic divergence (SPEC §13: a non-finite loss terminates the episode, pays -10 and prunes
the live seeds) is rare in the surrogate and in real hosts, so its path is easy to leave untested.
:class:`FaultInjectingDynamics` wraps any backend and, at the ``(step, env)`` pairs it is given,
replaces that env's validation loss with NaN, as a host whose training blew up reports it. Its
divergence guard then does what the backend contract asks of every backend: an env with any
non-finite metric reports ``diverged`` and finite stand-ins (the loss and accuracies of a chance
predictor, zero gradients), so no NaN reaches the state, the observation or the other envs. The
guard applies to the wrapped backend's own metrics too, so a real blow-up is survived the same way.

Steps are counted per env from 1 (the first ``Engine.step`` after construction); the host epoch a
reset runs (epoch 0) is not a step. The schedule is a dense ``[steps, E]`` table read with the
step counter, so ``advance`` stays a pure tensor function (compilable when the wrapped one is).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from esper_soa.core.spec import METRIC_FIELDS
from esper_soa.core.state import State
from esper_soa.core.validation import bad_value, expect_float, expect_int
from esper_soa.dynamics.base import DynamicsBackend

CLOCK = "fault_step"  # aux key: steps taken by each env (kept across resets)
# stand-in values of a diverged env's metrics (the others become 0 / False where non-finite)
_CHANCE_ACC = ("val_acc", "acc_all_seeds_off", "acc_committed", "acc_without_slot")


class FaultInjectingDynamics:
    """Wrap ``inner`` so that env ``e`` diverges (NaN validation loss) at each ``(step, e)`` of ``faults``.

    Args:
        inner: the backend to wrap (surrogate, hosts or any :class:`DynamicsBackend`).
        n_envs: the engine's ``n_envs`` (the schedule's width).
        faults: ``(step, env)`` pairs; ``step >= 1`` counts ``Engine.step`` calls.
        n_classes: the diverged env reports a chance predictor's loss ``ln(n_classes)`` and
            accuracy ``100 / n_classes`` (10: the surrogate's and CIFAR-10's).
    """

    def __init__(
        self, inner: DynamicsBackend, n_envs: int, faults: Iterable[tuple[int, int]], n_classes: float = 10.0
    ) -> None:
        n_envs = expect_int("FaultInjectingDynamics(n_envs)", n_envs, 1)
        pairs = []
        for pair in faults:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise bad_value("FaultInjectingDynamics(faults)", "(step, env) pairs", pair)
            step = expect_int("FaultInjectingDynamics(faults) step", pair[0], 1)
            env = expect_int("FaultInjectingDynamics(faults) env", pair[1], 0, n_envs - 1)
            pairs.append((step, env))
        n_classes = expect_float("FaultInjectingDynamics(n_classes)", n_classes, 1.0, low_open=True)
        self.inner = inner
        self.compilable = getattr(inner, "compilable", True)
        self.seed_params_table = getattr(inner, "seed_params_table", None)
        device = getattr(inner, "device", torch.device("cpu"))
        # row k = step k (row 0 and the last row stay False: no step 0, no fault after the schedule)
        table = torch.zeros(max((s for s, _ in pairs), default=0) + 2, n_envs, dtype=torch.bool, device=device)
        for step, env in pairs:
            table[step, env] = True
        self.schedule = table
        self.diverged_loss = math.log(n_classes)
        self.diverged_acc = 100.0 / n_classes

    def init_aux(self, n_envs: int, seed: int) -> dict[str, torch.Tensor]:
        aux = self.inner.init_aux(n_envs, seed)
        return {**aux, CLOCK: torch.zeros(n_envs, dtype=torch.int64, device=self.schedule.device)}

    def reset_aux(self, aux: dict, rows: torch.Tensor, episode_seed: torch.Tensor) -> dict:
        inner = self.inner.reset_aux({k: v for k, v in aux.items() if k != CLOCK}, rows, episode_seed)
        return {**inner, CLOCK: aux[CLOCK]}

    def advance(self, state: State, aux: dict) -> tuple[dict[str, torch.Tensor], dict]:
        is_step = state["epoch"] > 0  # the reset's host epoch runs on epoch 0
        clock = aux[CLOCK] + is_step.to(torch.int64)
        metrics, inner = self.inner.advance(state, {k: v for k, v in aux.items() if k != CLOCK})
        row = clock.clamp(max=self.schedule.shape[0] - 1)
        fire = is_step & self.schedule[row, torch.arange(row.shape[0], device=row.device)]
        metrics = dict(metrics)
        metrics["val_loss"] = torch.where(fire, torch.full_like(metrics["val_loss"], math.nan), metrics["val_loss"])
        return self.guard(metrics), {**inner, CLOCK: clock}

    def guard(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Any non-finite metric of an env makes it ``diverged``, with finite stand-ins."""
        floats = [k for k, (dtype, _) in METRIC_FIELDS.items() if dtype.is_floating_point]
        bad = [~torch.isfinite(metrics[k]).reshape(metrics[k].shape[0], -1).all(-1) for k in floats]
        diverged = metrics["diverged"] | torch.stack(bad).any(0)
        out = dict(metrics, diverged=diverged)
        for k in floats:
            v = metrics[k]
            d = diverged.reshape(-1, *([1] * (v.dim() - 1)))
            if k == "val_loss":
                stand_in = torch.full_like(v, self.diverged_loss)
            elif k in _CHANCE_ACC:
                stand_in = torch.full_like(v, self.diverged_acc)
            else:  # host_params, gradient and interaction terms: keep the finite ones
                stand_in = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
            out[k] = torch.where(d, stand_in, v)
        return out
