"""Host-curve fits: per-env ``acc(t) = a_max - (a_max - a0) exp(-t / tau)``, the surrogate's
(log-)uniform ranges from them, and the evaluation noise around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HOST_CURVE_FIELDS = ("host_acc0_min", "host_acc0_max", "host_acc_max_min", "host_acc_max_max",
                     "host_tau_min", "host_tau_max")
SQRT3 = math.sqrt(3.0)


@dataclass
class HostCurveFit:
    """Per-env least-squares fit of ``a_max - (a_max - a0) exp(-t / tau)`` (arrays ``[E]``)."""

    acc0: np.ndarray
    acc_max: np.ndarray
    tau: np.ndarray
    resid_std: np.ndarray  # per-env residual std (3 fitted parameters), pp

    def curve(self, t: np.ndarray) -> np.ndarray:
        """``[E, len(t)]`` fitted curves."""
        e = np.exp(-np.asarray(t, dtype=float)[None, :] / self.tau[:, None])
        return self.acc_max[:, None] - (self.acc_max - self.acc0)[:, None] * e


def _linear_given_tau(y: np.ndarray, w: np.ndarray, t: np.ndarray, tau: np.ndarray,
                      paired: bool = False) -> tuple[np.ndarray, ...]:
    """Exact weighted LS (a_max, a0) and SSE for given tau: every env against every tau of a grid
    ``[G]`` (results ``[E, G]``), or with ``paired`` env e against ``tau[e]`` (results ``[E]``).

    For fixed tau the curve is linear in (a_max, a0): ``a_max (1 - e) + a0 e``, ``e = exp(-t/tau)``.
    """
    e = np.exp(-t[None, :] / tau[:, None])  # [G or E, N]
    f = 1.0 - e
    spec = "en,en->e" if paired else "en,gn->eg"
    s11 = np.einsum(spec, w, f * f)
    s12 = np.einsum(spec, w, f * e)
    s22 = np.einsum(spec, w, e * e)
    b1 = np.einsum(spec, w * y, f)
    b2 = np.einsum(spec, w * y, e)
    det = s11 * s22 - s12 * s12
    det = np.where(np.abs(det) < 1e-12, 1e-12, det)
    a_max = (s22 * b1 - s12 * b2) / det
    a0 = (s11 * b2 - s12 * b1) / det
    yy = (w * y * y).sum(1)
    sse = (yy if paired else yy[:, None]) - (a_max * b1 + a0 * b2)
    return a_max, a0, np.maximum(sse, 0.0)


def fit_host_curves(acc: np.ndarray, mask: np.ndarray | None = None, tau_max: float | None = None) -> HostCurveFit:
    """Least-squares saturating-exponential fit of each row of ``acc`` ``[E, N]`` (t = column index).

    Variable projection: an exact linear solve for (a_max, a0) on a dense log grid of tau, then a
    golden-section refinement of tau around each env's best grid point. ``mask`` ``[E, N]`` drops
    points (e.g. epochs where a seed was blended). ``tau_max`` (default 50 * N) bounds tau: beyond
    a few times the run length the curve is a straight line and a_max is not identified.
    """
    y = np.asarray(acc, dtype=float)
    n = y.shape[1]
    w = np.ones_like(y) if mask is None else np.asarray(mask, dtype=float)
    y = np.where(w > 0, y, 0.0)
    t = np.arange(n, dtype=float)
    hi = float(tau_max) if tau_max is not None else 50.0 * n
    grid = np.exp(np.linspace(math.log(0.05), math.log(hi), 1500))
    _, _, sse = _linear_given_tau(y, w, t, grid)
    k = sse.argmin(1)
    lo_b = np.log(grid[np.maximum(k - 1, 0)])
    hi_b = np.log(grid[np.minimum(k + 1, len(grid) - 1)])
    # golden-section search on log tau, vectorised over envs
    g = (math.sqrt(5.0) - 1.0) / 2.0

    def sse_at(log_tau: np.ndarray) -> np.ndarray:
        return _linear_given_tau(y, w, t, np.exp(log_tau), paired=True)[2]

    a, b = lo_b, hi_b
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = sse_at(c), sse_at(d)
    for _ in range(40):
        left = fc < fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        c_new, d_new = b - g * (b - a), a + g * (b - a)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
        fc, fd = np.where(left, sse_at(c), fd), np.where(left, fc, sse_at(d))
    tau = np.exp((a + b) / 2.0)
    a_max, a0, sse = _linear_given_tau(y, w, t, tau, paired=True)
    dof = np.maximum(w.sum(1) - 3.0, 1.0)
    return HostCurveFit(acc0=a0, acc_max=a_max, tau=tau, resid_std=np.sqrt(sse / dof))


def _uniform_range(x: np.ndarray) -> tuple[float, float]:
    """The uniform distribution with the sample's mean and std (method of moments)."""
    m, s = float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    return m - SQRT3 * s, m + SQRT3 * s


def host_curve_ranges(fit: HostCurveFit) -> dict[str, float]:
    """SurrogateConfig host-curve ranges matching the per-env fits.

    a0 and a_max ~ uniform, tau ~ log-uniform in the surrogate, so each range is the (log-)uniform
    law with the fits' mean and std: less sensitive to one badly fitted env than min/max. Ranges
    are then clipped to what SurrogateConfig accepts (0 <= a0 <= a_max <= 100).
    """
    a0_lo, a0_hi = _uniform_range(fit.acc0)
    am_lo, am_hi = _uniform_range(fit.acc_max)
    lt_lo, lt_hi = _uniform_range(np.log(fit.tau))
    am_hi = min(am_hi, 100.0)
    am_lo = min(max(am_lo, 0.0), am_hi)
    a0_lo = max(a0_lo, 0.0)
    a0_hi = min(max(a0_hi, a0_lo), am_lo)
    a0_lo = min(a0_lo, a0_hi)
    return {
        "host_acc0_min": a0_lo, "host_acc0_max": a0_hi,
        "host_acc_max_min": am_lo, "host_acc_max_max": am_hi,
        "host_tau_min": math.exp(lt_lo), "host_tau_max": math.exp(lt_hi),
    }


def eval_noise(acc: np.ndarray, fit: HostCurveFit, after_taus: float = 4.0, min_points: int = 5) -> float:
    """Per-epoch evaluation noise (``eval_noise_std``) from the host-only curves, pp.

    Uses first differences of the residuals around each env's fit, ``std(diff) / sqrt(2)``: the
    differences cancel slow, systematic misfit of the exponential (real curves are not exactly
    exponential), which the plain residual std would count as noise. Only epochs ``t >= after_taus
    * tau`` count (98 % converged: the plateau, where most decisions fall; the real hosts are far
    noisier while they learn fast, see :func:`noise_profile`); an env with fewer than
    ``min_points`` such epochs contributes all of its epochs.
    """
    acc = np.asarray(acc, dtype=float)
    t = np.arange(acc.shape[1])
    resid = acc - fit.curve(t)
    diffs = []
    for e in range(acc.shape[0]):
        keep = t >= after_taus * fit.tau[e]
        r = resid[e, keep] if keep.sum() >= min_points else resid[e]
        diffs.append(np.diff(r))
    d = np.concatenate(diffs)
    return float(np.sqrt(np.mean(d * d) / 2.0))



def noise_profile(acc: np.ndarray, fit: HostCurveFit, window: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Epoch-resolved evaluation noise: ``std(diff(residual)) / sqrt(2)`` over envs, pooled in
    windows of ``window`` epochs. Shows what a constant ``eval_noise_std`` cannot: real noise decays."""
    t = np.arange(acc.shape[1])
    d = np.diff(np.asarray(acc, dtype=float) - fit.curve(t), axis=1)
    starts = np.arange(0, d.shape[1], window)
    prof = np.array([np.sqrt(np.mean(d[:, s:s + window] ** 2) / 2.0) for s in starts])
    return starts + (window - 1) / 2.0 + 0.5, prof


