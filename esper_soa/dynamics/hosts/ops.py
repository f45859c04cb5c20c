"""Per-env ops for E hosts side by side (grouped layout ``[B, E * C, H, W]``) and the functional SGD.

Each op computes, for every env at once, what a per-env module would; the docstrings say where
a kernel choice differs from the obvious one and why (CPU per-op overhead, memory traffic).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from esper_soa.core.spec import AlphaAlgorithm, Blueprint
from esper_soa.dynamics.hosts.config import HostsConfig

GN_EPS = 1e-5


def _pool_pairs(h: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """2x2 reduction ``op`` (floor) as two strided elementwise ops: for gradient-free validation on
    CPU ~10x faster than ``max_pool2d``, which also computes argmax indices."""
    h = h[..., : h.shape[-2] // 2 * 2, : h.shape[-1] // 2 * 2]
    a = op(h[..., 0::2, :], h[..., 1::2, :])
    return op(a[..., 0::2], a[..., 1::2])


def gn_relu_pool(
    x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, n: int, groups: int, g_nonneg: bool = False
) -> torch.Tensor:
    """``maxpool2(relu(GroupNorm(x)))`` for ``n`` envs side by side (x ``[B, n*C, H, W]``).

    With autograd: ``relu(max_pool2d(GroupNorm(x)))``: the ReLU runs on a quarter of the elements
    and, as max and ReLU commute, values and gradients equal the reference order's (a window whose
    max is <= 0 gets no gradient either way; otherwise both route to its first maximum).

    Without (validation), the per-channel affine map of the norm is monotone, so the 2x2 max is
    taken on the raw input first (the min where the scale is negative; ``g_nonneg`` promises none
    is) and the affine map and ReLU run on a quarter of the elements: same values up to the order
    of the norm's float operations, about 3x less memory traffic.
    """
    if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad):
        return F.relu(F.max_pool2d(grouped_norm(x, g, b, n, groups), 2))
    bsz, ct = x.shape[:2]
    xg = x.reshape(bsz, n * groups, -1)
    k = xg.shape[-1]
    # one-pass statistics (var_mean's small-row reduction is ~30x slower on CPU); activations here
    # have |mean| / std well below 1e3, so E[x^2] - E[x]^2 loses < 1e-4 relative precision
    mean = xg.sum(-1) / k
    var = (torch.linalg.vector_norm(xg, dim=-1).square() / k - mean.square()).clamp_min(0.0)
    scale = g.reshape(1, n * groups, -1) * torch.rsqrt(var + GN_EPS).unsqueeze(-1)  # [B, nG, C/G]
    shift = (b.reshape(1, n * groups, -1) - mean.unsqueeze(-1) * scale).reshape(bsz, ct, 1, 1)
    scale = scale.reshape(bsz, ct, 1, 1)
    pooled = _pool_pairs(x, torch.maximum)
    if not g_nonneg:
        pooled = torch.where(scale >= 0, pooled, _pool_pairs(x, torch.minimum))
    return F.relu(torch.addcmul(shift, pooled, scale))


def blend_delta(
    x: torch.Tensor, f: torch.Tensor, algorithm: torch.Tensor, gate: torch.Tensor | None,
    present: frozenset[int] = frozenset({1, 2, 3}),
) -> torch.Tensor:
    """Blend output minus ``h`` at alpha 1 (h = x): ADD f, MULTIPLY x tanh(f), GATE g f.

    ``present``: the algorithm codes that occur in ``algorithm`` (NONE counts as ADD); a branch no
    env uses is not computed.
    """
    mul, gated = int(AlphaAlgorithm.MULTIPLY), int(AlphaAlgorithm.GATE)
    if present == {mul}:
        return x * torch.tanh(f)
    if present == {gated}:
        return gate * f
    d = f
    if mul in present:
        d = torch.where(algorithm == mul, x * torch.tanh(f), d)
    if gated in present:
        d = torch.where(algorithm == gated, gate * f, d)
    return d


def grad_summary(
    seed_norm: torch.Tensor, host_norm: torch.Tensor, n_seed: torch.Tensor, n_host: float, hcfg: HostsConfig
) -> dict[str, torch.Tensor]:
    """Ratio / health / vanishing / exploding from epoch-mean gradient norms (see module docstring)."""
    ratio = (seed_norm / n_seed.clamp_min(1.0).sqrt()) / (host_norm / math.sqrt(n_host)).clamp_min(1e-30)
    finite = torch.isfinite(ratio)
    health = (1.0 - ratio.clamp_min(1e-30).log10().abs() / hcfg.health_log10_span).clamp(0.0, 1.0)
    return {
        "gradient_norm": torch.where(finite, seed_norm, 0.0),
        "gradient_ratio": torch.where(finite, ratio, 0.0),
        "gradient_health": torch.where(finite, health, 0.0),
        "has_vanishing": finite & (ratio < hcfg.vanish_ratio),
        "has_exploding": ~finite | (ratio > hcfg.explode_ratio),
    }


def grouped_conv(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """Per-env "same" conv: x ``[B, n*ci, H, W]``, w ``[n, co, ci, k, k]`` (or ``[n, co, ci]`` for 1x1).

    On a 1x1 plane only the centre tap sees the input, so the conv is a per-env matmul (a grouped
    conv call costs ~0.1 ms of fixed overhead on CPU; the last slot's seeds run at 1x1).
    """
    if w.dim() == 3:
        w = w.unsqueeze(-1).unsqueeze(-1)
    k = w.shape[-1]
    if x.shape[-2:] == (1, 1):
        bsz = x.shape[0]
        y = torch.einsum("bnc,noc->bno", x.view(bsz, n, -1), w[..., k // 2, k // 2])
        return y.reshape(bsz, -1, 1, 1)
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), padding=k // 2, groups=n)


def grouped_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Per-env GroupNorm: env e's channels are one contiguous block of ``groups`` groups.

    On planes of <= 4 pixels each group is normalised as one plane and the affine map applied
    after: the native kernel's backward is ~2x slower there (it loops over tiny per-channel planes).
    """
    if x.shape[-2] * x.shape[-1] > 4:
        return F.group_norm(x, n * groups, g.reshape(-1), b.reshape(-1), GN_EPS)
    bsz, ct = x.shape[:2]
    y = F.group_norm(x.reshape(bsz, n * groups, -1), n * groups, None, None, GN_EPS).view_as(x)
    return torch.addcmul(b.reshape(1, ct, 1, 1), y, g.reshape(1, ct, 1, 1))


def seed_branch_grouped(bp: Blueprint, p: dict[str, torch.Tensor], x: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Residual branch f of ``n`` envs' seeds of blueprint ``bp``; x ``[B, n*c, H, W]``."""
    if bp == Blueprint.CONV_LIGHT:
        return grouped_norm(grouped_conv(x, p["w"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.CONV_SMALL:
        return grouped_norm(grouped_conv(x, p["w"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.CONV_HEAVY:
        y = F.relu(grouped_norm(grouped_conv(x, p["w1"], n), p["g1"], p["b1"], n, groups))
        return grouped_norm(grouped_conv(y, p["w2"], n), p["g2"], p["b2"], n, groups)
    if bp == Blueprint.DEPTHWISE:
        c = p["wd"].shape[1]
        if x.shape[-2:] == (1, 1):  # depthwise on one pixel: the centre tap scales each channel
            y = x * p["wd"][..., 1, 1].reshape(1, n * c, 1, 1)
        else:
            y = F.conv2d(x, p["wd"].reshape(n * c, 1, 3, 3), padding=1, groups=n * c)
        return grouped_norm(grouped_conv(y, p["wp"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.BOTTLENECK:
        y = F.relu(grouped_conv(x, p["w1"], n))
        y = F.relu(grouped_conv(y, p["w2"], n))
        return grouped_norm(grouped_conv(y, p["w3"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.NORM:
        return grouped_norm(x, p["g"], p["b"], n, groups)
    if bp == Blueprint.ATTENTION:
        bsz, _, h, w = x.shape
        c = p["w1"].shape[2]
        x4 = x.view(bsz, n, c, h * w)
        z = F.relu(torch.einsum("bnc,nqc->bnq", x4.mean(-1), p["w1"]) + p["b1"])
        z = torch.einsum("bnq,ncq->bnc", z, p["w2"]) + p["b2"]
        return (x4 * (2.0 * torch.sigmoid(z) - 1.0).unsqueeze(-1)).view_as(x)
    raise ValueError(f"blueprint {bp!r} is not a cnn blueprint")


def sgd_step(
    p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float, wd: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) out of place; rows outside ``mask`` unchanged."""
    d = torch.add(g, p, alpha=wd) if wd else g
    new_buf = torch.add(d, buf, alpha=momentum)
    new_p = torch.add(p, new_buf, alpha=-lr)
    if mask is not None:
        m = mask.reshape(mask.shape + (1,) * (p.dim() - 1))
        new_buf = torch.where(m, new_buf, buf)
        new_p = torch.where(m, new_p, p)
    return new_p, new_buf

