"""Readable per-env reference of the batched-hosts backend: one env's host and seeds in plain ops.

What an object-per-env implementation does, env after env; ``tests/test_hosts.py`` checks the
batched backend against it and ``bench/test_bench_hosts.py`` uses it as the "before" loop.
Lives beside its users, not in the package: nothing in ``esper_soa`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esper_soa.core.spec import AlphaAlgorithm, Blueprint, Stage
from esper_soa.core.state import State
from esper_soa.dynamics.hosts import GN_EPS, TRAINED_STAGES, HostsConfig


@dataclass(frozen=True)
class SlotSetup:
    """One slot of one env, as plain Python values (what the reference loop reads)."""

    stage: int
    blueprint: int = 0
    algorithm: int = 0
    alpha: float = 0.0


def slot_setups(state: State, env: int) -> list[SlotSetup]:
    """The slots of env ``env`` of a (batched) state as :class:`SlotSetup` values."""
    sl = state["slots"]
    return [
        SlotSetup(int(sl["stage"][env, s]), int(sl["blueprint"][env, s]), int(sl["algorithm"][env, s]),
                  float(sl["alpha"][env, s]))
        for s in range(sl["stage"].shape[1])
    ]


def _seed_f_single(bp: Blueprint, p: dict[str, torch.Tensor], x: torch.Tensor, groups: int) -> torch.Tensor:
    """Residual branch of one seed on one env's activations ``[B, c, H, W]`` (plain ops)."""
    def gn(y: torch.Tensor, g: str, b: str) -> torch.Tensor:
        return F.group_norm(y, groups, p[g], p[b], GN_EPS)

    def pw(y: torch.Tensor, w: str) -> torch.Tensor:
        return F.conv2d(y, p[w][:, :, None, None])

    if bp == Blueprint.CONV_LIGHT:
        return gn(F.conv2d(x, p["w"], padding=1), "g", "b")
    if bp == Blueprint.CONV_SMALL:
        return gn(pw(x, "w"), "g", "b")
    if bp == Blueprint.CONV_HEAVY:
        y = F.relu(gn(F.conv2d(x, p["w1"], padding=1), "g1", "b1"))
        return gn(F.conv2d(y, p["w2"], padding=1), "g2", "b2")
    if bp == Blueprint.DEPTHWISE:
        y = F.conv2d(x, p["wd"], padding=1, groups=x.shape[1])
        return gn(pw(y, "wp"), "g", "b")
    if bp == Blueprint.BOTTLENECK:
        y = F.relu(pw(x, "w1"))
        y = F.relu(F.conv2d(y, p["w2"], padding=1))
        return gn(pw(y, "w3"), "g", "b")
    if bp == Blueprint.NORM:
        return gn(x, "g", "b")
    if bp == Blueprint.ATTENTION:
        z = F.relu(F.linear(x.mean((2, 3)), p["w1"], p["b1"]))
        z = F.linear(z, p["w2"], p["b2"])
        return x * (2.0 * torch.sigmoid(z) - 1.0)[:, :, None, None]
    raise ValueError(f"blueprint {bp!r} is not a cnn blueprint")


def single_host_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, slots: list[SlotSetup], hcfg: HostsConfig,
    train: bool = False, off: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """One env's host with its seeds, the readable way: logits ``[B, K]`` for images ``[B, C, H, W]``.

    ``off``: slots whose alpha is forced to 0 (counterfactuals). ``train`` enables the incubation
    (straight-through) path of TRAINING seeds; in eval it adds exactly 0 and is skipped.
    """
    h = x
    for i in range(len(hcfg.channels)):
        h = F.conv2d(h, p[f"host.conv{i}.w"], p[f"host.conv{i}.b"], padding=1)
        h = F.group_norm(h, hcfg.norm_groups, p[f"host.norm{i}.g"], p[f"host.norm{i}.b"], GN_EPS)
        h = F.max_pool2d(F.relu(h), 2)
        if i >= len(slots):
            continue
        st = slots[i]
        incubating = train and st.stage == Stage.TRAINING
        blended = st.stage in (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED) and i not in off
        if not (incubating or blended):
            continue
        bp = Blueprint(st.blueprint)
        xin = h.detach() if incubating else h
        ps = {k.rsplit(".", 1)[1]: v for k, v in p.items() if k.startswith(f"seed{i}.{bp.name}.")}
        f = _seed_f_single(bp, ps, xin, hcfg.norm_groups)
        if st.algorithm == AlphaAlgorithm.MULTIPLY:
            d = xin * torch.tanh(f)
        elif st.algorithm == AlphaAlgorithm.GATE:
            gate = torch.sigmoid(xin.mean((2, 3)) @ p[f"gate{i}.w"] + p[f"gate{i}.b"])
            d = gate[:, None, None, None] * f
        else:
            d = f
        if incubating:
            h = h + (d - d.detach())
        else:
            alpha = 1.0 if st.stage == Stage.FOSSILIZED else st.alpha
            h = h + alpha * d
    return F.linear(h.mean((2, 3)), p["host.fc.w"], p["host.fc.b"])


def train_single_host(
    params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor], slots: list[SlotSetup],
    batches: list[tuple[torch.Tensor, torch.Tensor]], hcfg: HostsConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train one env's host (and its live seeds) for one epoch of ``batches``; the per-env baseline.

    Returns (params, momentum buffers, telemetry with the epoch-mean host and per-slot seed
    gradient norms, as :meth:`BatchedHostsDynamics.train_epoch` measures them).
    """
    params = dict(params)
    momentum = dict(momentum)
    trainable = [k for k in params if k.startswith("host.")]
    for i, st in enumerate(slots):
        if st.stage in TRAINED_STAGES:
            trainable += [k for k in params if k.startswith(f"seed{i}.{Blueprint(st.blueprint).name}.")]
            if st.algorithm == AlphaAlgorithm.GATE:
                trainable += [f"gate{i}.w", f"gate{i}.b"]
    host_norm = torch.zeros((), device=params["host.fc.b"].device)
    seed_norm = torch.zeros(len(slots), device=params["host.fc.b"].device)
    measured = 0
    for mb, (x, y) in enumerate(batches):
        leaves = {k: params[k].detach().requires_grad_(True) for k in trainable}
        loss = F.cross_entropy(single_host_forward({**params, **leaves}, x, slots, hcfg, train=True), y)
        grads = dict(zip(trainable, torch.autograd.grad(loss, [leaves[k] for k in trainable])))
        if mb % hcfg.grad_stride == 0:
            measured += 1
            host_norm = host_norm + torch.sqrt(sum(grads[k].pow(2).sum() for k in trainable if k.startswith("host.")))
            for i, st in enumerate(slots):
                ks = [k for k in trainable if k.startswith(f"seed{i}.")]
                if ks:
                    seed_norm[i] += torch.sqrt(sum(grads[k].pow(2).sum() for k in ks))
        with torch.no_grad():
            for k in trainable:
                host = k.startswith("host.")
                lr = hcfg.host_lr if host else hcfg.seed_lr
                mom = hcfg.host_momentum if host else hcfg.seed_momentum
                wd = hcfg.host_weight_decay if host else hcfg.seed_weight_decay
                momentum[k] = mom * momentum[k] + (grads[k] + wd * params[k])
                params[k] = params[k] - lr * momentum[k]
    return params, momentum, {"host_norm": host_norm / measured, "seed_norm": seed_norm / measured}


def evaluate_single_host(
    params: dict[str, torch.Tensor], slots: list[SlotSetup], x: torch.Tensor, y: torch.Tensor, hcfg: HostsConfig
) -> dict[str, float | list[float]]:
    """Validation metrics of one env: one forward pass per counterfactual variant (the per-env way).

    A variant forcing alpha 0 on slots without an active seed (blended with alpha > 0) is the same
    model, so each distinct subset of the active slots is evaluated once.
    """
    n_slots = len(slots)
    active = frozenset(
        s for s, st in enumerate(slots)
        if st.stage == Stage.FOSSILIZED or (st.stage in (Stage.BLENDING, Stage.HOLDING) and st.alpha > 0.0)
    )
    cache: dict[frozenset[int], tuple[float, float]] = {}

    def run(off: frozenset[int]) -> tuple[float, float]:
        key = off & active
        if key not in cache:
            with torch.no_grad():
                logits = single_host_forward(params, x, slots, hcfg, off=key)
            acc = 100.0 * (logits.argmax(-1) == y).float().mean().item()
            cache[key] = (acc, F.cross_entropy(logits, y).item())
        return cache[key]

    full, val_loss = run(frozenset())
    without = [run(frozenset({s}))[0] for s in range(n_slots)]
    inter = [
        sum(full - without[i] - without[j] + run(frozenset({i, j}))[0] for j in range(n_slots) if j != i)
        for i in range(n_slots)
    ]
    return {
        "val_loss": val_loss,
        "val_acc": full,
        "acc_without_slot": without,
        "acc_all_seeds_off": run(frozenset(range(n_slots)))[0],
        "acc_committed": run(frozenset(s for s, st in enumerate(slots) if st.stage != Stage.FOSSILIZED))[0],
        "interaction_sum": inter,
    }
