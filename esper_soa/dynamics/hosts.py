"""Batched-hosts dynamics (SPEC §11 "batched hosts"): E real CNN hosts trained in lock-step.

Every env owns a small CNN host (three blocks ``conv3x3 -> GroupNorm -> ReLU -> maxpool2``, widths
``HostsConfig.channels`` = 8/16/32, global average pool, linear classifier). Slot ``i`` sits after
block ``i`` and has width ``channels[i]`` (8/16/32, not ``spec.slot_widths``' 32/64/128: see
``seed_params_table``). All E hosts are one model: each module (the host, every sleeper seed, every
gate) is one flat ``[E, size]`` tensor in ``aux`` (named views split off it), and the forward pass
runs the E hosts side by side as a grouped convolution (layout ``[batch, E * channels, H, W]``,
``groups=E``), so one minibatch is one forward and one backward for all envs. GroupNorm (per
sample, no running statistics) keeps train and eval identical and keeps envs independent; a
diverging env cannot leak into the others (tested).

Sleeper seeds: each slot pre-allocates one seed module per cnn blueprint (CONV_LIGHT, ATTENTION,
NORM, DEPTHWISE, BOTTLENECK, CONV_SMALL, CONV_HEAVY; parameter counts follow
``esper_soa.core.spec.blueprint_params`` at the slot's width) plus a per-slot gate, so the topology is
static. Every seed is residual, ``s = x + f(x)`` with a small last layer (``seed_init_scale``), so a
fresh seed is close to the identity. Env ``e`` uses blueprint ``state.slots.blueprint[e, s]``: once
per ``advance`` the envs are grouped by (slot, blueprint) (at most 7 groups per slot, a loop over
blueprints, never over envs) and each group's seed runs on the gathered activations of its envs
only, its output scattered back with ``index_add``. Blending (SPEC §7, ``h`` = ``x`` = the slot
input because the host path through a slot is the identity):
``ADD h + a (s - h)``, ``MULTIPLY h (1 + a tanh(s - x))``, ``GATE h + a g (s - h)`` with
``g = sigmoid(w . mean_hw(x) + b)`` a learned per-sample gate.

Stages: DORMANT/GERMINATED/PRUNED/EMBARGOED/RESETTING -> identity. TRAINING -> the slot adds
``d - d.detach()`` where ``d`` is the alpha-1 blend of the seed run on the *detached* slot input: the
value added is exactly 0 (host outputs bit-identical) and the host gets no gradient from the seed,
while the seed learns from the task loss as if fully blended (straight-through "incubation").
BLENDING/HOLDING -> blended with the slot's alpha, seed and host both train. FOSSILIZED -> blended
with alpha 1, seed frozen. A new seed (``germination_epoch``/blueprint differ from what ``aux``
remembers) gets fresh weights from the per-env counter RNG (:mod:`esper_soa.core.rng`) keyed by its
germination epoch, so runs are reproducible. SGD with momentum is implemented functionally on the
stacked tensors; seed and gate updates are masked to the envs whose seed is live and training.

One ``advance`` = one host epoch: ``minibatches_per_epoch`` minibatches, each env drawing its own
deterministic sample order (a per-env permutation of the training split from the counter RNG), then
one validation pass over a fixed validation prefix. Counterfactuals are computed in that same pass:
at each slot, the envs with an active seed there (blended, alpha > 0) fork an "alpha 0" copy of
their activations, stacked as extra branches of the batch, so every env is evaluated once per
subset of *its* active slots (at most ``2^S`` = 8 variants) and blocks before its first active
slot run once. ``acc_without_slot`` / ``acc_all_seeds_off`` / ``interaction_sum`` (pairwise
``acc(both on) - acc(i off) - acc(j off) + acc(both off)`` summed over partners) are read off those
variants (a slot without an active seed changes nothing when forced off), so the interaction term
is always computed. Validation is gradient-free and uses faster kernels for the same function:
block 0 as one unfold + matmul against all envs' filters (the images are shared), and
GroupNorm -> ReLU -> maxpool with the pool taken before the norm's (monotone) affine map.

Gradient telemetry (slots in TRAINING/BLENDING/HOLDING), measured on every ``grad_stride``-th
minibatch (minibatch 0 always) and averaged over the epoch: ``gradient_norm`` = L2 norm of the env's
live-seed parameter gradients; ``gradient_ratio`` = RMS-per-parameter ratio seed/host
(``(|g_seed| / sqrt(n_seed)) / (|g_host| / sqrt(n_host))``, so small blueprints are not "vanishing"
just for being small); ``has_vanishing`` = ratio < ``vanish_ratio``; ``has_exploding`` = ratio >
``explode_ratio`` or non-finite; ``gradient_health`` = ``1 - |log10 ratio| / health_log10_span``
clamped to [0, 1]. Non-finite gradients report norm, ratio and health 0 and ``has_exploding``.
The norms are per-env reductions of gradients the step computes anyway, so the stride only trims
a few reductions per minibatch.

Divergence: an env whose training or validation loss is non-finite reports ``diverged``; its
``val_loss`` is replaced by ``ln(n_classes)`` and its accuracies by chance (100 / n_classes) so the
observation stays finite (the engine then collapses the env, SPEC §13).

Layout choice, measured on one host minibatch forward+backward (E=32, minibatch 32, 8x8 digits,
2 CPU cores shared with other jobs, best of 10 interleaved rounds): grouped conv 16.3 ms vs
torch.func ``vmap(grad(...))`` 18.3 ms vs unfold + bmm 42.9 ms vs a per-env Python loop 41.1 ms
(quiet machine, 2 threads); under load 36.6 / 54.2 / 235.7 / 275.3 ms; one thread, process CPU
time: grouped 15.9-16.4 ms vs vmap 22.4-29.1 ms (``bench/test_bench_hosts.py::test_layout_choice``).
Grouped convolutions won every round and, unlike vmap, can run a seed on a gathered subset of
envs, so they are used.

Whole host epoch (``pytest bench/test_bench_hosts.py -s``: 4 minibatches of 32, 256 validation
images, a mid-episode mix of seeds; one thread, process CPU time, same shared machine, two runs):
batched vs per-env loop 0.071-0.081 s vs 0.155-0.166 s at E=8 (2.1-2.2x), 0.182-0.186 s vs
0.588-0.643 s at E=32 (3.2-3.5x), 0.597-0.731 s vs 2.44-2.59 s at E=128 (3.5-4.1x). The batched
path's per-env cost (~5 ms per env-epoch) is bound by memory traffic over the small-channel
activations rather than by per-op overhead, so on a CPU the ratio grows only slowly with E; the
design is accelerator-shaped (one kernel per layer for all envs).

Not fullgraph-compilable: ``advance`` runs autograd and groups envs by blueprint on the host
(one small device->host copy of the ``[E, S]`` slot fields per call, plus a check for new seeds),
so engines should not wrap it in ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esper_soa.core import rng
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    LIVE_STAGES,
    TOPOLOGY_BLUEPRINTS,
    AlphaAlgorithm,
    Blueprint,
    Stage,
    blueprint_params,
    stage_in,
)
from esper_soa.core.state import State
from esper_soa.core.validation import backend_config
from esper_soa.dynamics.data import DATASETS, HostDataset, load_dataset

CNN_BLUEPRINTS = tuple(Blueprint(b) for b in TOPOLOGY_BLUEPRINTS["cnn"])
MAX_SLOTS = 3
GN_EPS = 1e-5

_SEEDED = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)  # seed runs in forward
_TRAINS = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)  # seed parameters get updates

_ST_DATA = 1  # per-epoch data order, counter = aux["rng_counter"]
_ST_HOST = 1000  # + parameter index: host init at reset (counter 0)
_ST_SEED = 2000  # + 100 * slot + 10 * blueprint index (gate: 90) + parameter index: seed init at
# germination (counter = germination epoch)


@dataclass(frozen=True)
class HostsConfig:
    """Every knob of the batched-hosts backend."""

    channels: tuple[int, ...] = (8, 16, 32)  # widths of the host's conv blocks; slot i has width channels[i]
    norm_groups: int = 4  # GroupNorm groups in host blocks and seeds (each width must be divisible)
    minibatch_size: int = 32  # training images per env per minibatch
    minibatches_per_epoch: int = 16  # minibatches per host epoch (= per advance); cycles the split if larger
    val_size: int = 256  # validation images evaluated per epoch: a fixed prefix of the validation split
    val_chunk: int = 8192  # images x envs per validation chunk: bounds the working set (cache) and memory
    host_lr: float = 0.05  # SGD learning rate of the host parameters
    host_momentum: float = 0.9  # SGD momentum of the host parameters
    host_weight_decay: float = 0.0  # L2 weight decay of the host parameters
    seed_lr: float = 0.05  # SGD learning rate of seed (and gate) parameters
    seed_momentum: float = 0.9  # SGD momentum of seed parameters (buffers reset at germination)
    seed_weight_decay: float = 0.0  # L2 weight decay of seed parameters
    seed_init_scale: float = 0.1  # gain of a fresh seed's last layer (seeds start near the identity)
    grad_stride: int = 4  # gradient telemetry on every k-th minibatch of the epoch (minibatch 0 always)
    vanish_ratio: float = 0.01  # has_vanishing when the seed/host RMS-gradient ratio is below this
    explode_ratio: float = 10.0  # has_exploding when that ratio is above this (or non-finite)
    health_log10_span: float = 4.0  # gradient_health = 1 - |log10 ratio| / span, clamped to [0, 1]
    dataset: str = "digits"  # "digits" (sklearn, embedded) or "cifar10" (needs data_path)
    data_path: str | None = None  # directory with CIFAR-10's data_batch_1..5 and test_batch
    digits_val: int = 360  # size of the digits validation split (the rest trains)
    image_size: int = 8  # digits only: side the 8x8 images are resized to (>= 2 ** len(channels))

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HostsConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if len(self.channels) < 1 or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise bad("channels", "a non-empty tuple of positive ints")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.channels):
            raise bad("norm_groups", f"a positive divisor of every width in {self.channels}")
        for name in ("minibatch_size", "minibatches_per_epoch", "val_size", "val_chunk", "grad_stride",
                     "digits_val"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        for name in ("host_lr", "seed_lr", "seed_init_scale", "vanish_ratio", "explode_ratio",
                     "health_log10_span"):
            if not getattr(self, name) > 0.0:
                raise bad(name, "> 0")
        for name in ("host_momentum", "seed_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "a value in [0, 1)")
        for name in ("host_weight_decay", "seed_weight_decay"):
            if getattr(self, name) < 0.0:
                raise bad(name, ">= 0")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"one of {DATASETS}")
        if self.image_size < 2 ** len(self.channels):
            raise bad("image_size", f">= 2 ** len(channels) = {2 ** len(self.channels)}")


# Named configurations (``esper-soa --dynamics hosts --preset NAME``). "calibrated" is the host the
# surrogate is fitted to (docs/CALIBRATION.md): channels 2/4/8 leave headroom on digits (alone ~82 %
# after 60 epochs of 4 minibatches) so that a good seed adds >= 1 pp (measured: +2.5 +- 0.7 pp for the
# best slot/blueprint, ``calibration.seed_headroom``), where the default 8/16/32 host reaches ~97 %
# alone and seeds barely matter. 4 minibatches per epoch keep an epoch cheap on a CPU.
HOSTS_PRESETS: dict[str, HostsConfig] = {
    "default": HostsConfig(),
    "calibrated": HostsConfig(channels=(2, 4, 8), norm_groups=2, minibatches_per_epoch=4),
}


# ----------------------------------------------------------------------------- parameter tables
@dataclass(frozen=True)
class ParamSpec:
    """Shape (without the env dim) and init of one parameter: N(0, std^2) if std > 0, else const."""

    shape: tuple[int, ...]
    std: float = 0.0
    const: float = 0.0


def host_param_specs(hcfg: HostsConfig, in_channels: int, n_classes: int) -> dict[str, ParamSpec]:
    """Host parameters (Kaiming-normal convs, unit norms, 1/sqrt(fan_in) classifier)."""
    specs: dict[str, ParamSpec] = {}
    c_in = in_channels
    for i, c in enumerate(hcfg.channels):
        specs[f"conv{i}.w"] = ParamSpec((c, c_in, 3, 3), std=math.sqrt(2.0 / (9 * c_in)))
        specs[f"conv{i}.b"] = ParamSpec((c,))
        specs[f"norm{i}.g"] = ParamSpec((c,), const=1.0)
        specs[f"norm{i}.b"] = ParamSpec((c,))
        c_in = c
    specs["fc.w"] = ParamSpec((n_classes, c_in), std=1.0 / math.sqrt(c_in))
    specs["fc.b"] = ParamSpec((n_classes,))
    return specs


def seed_param_specs(blueprint: Blueprint, c: int, init_scale: float) -> dict[str, ParamSpec]:
    """One seed's parameters at width ``c``; counts equal ``blueprint_params(blueprint, c)``."""
    q = max(c // 4, 1)
    k = init_scale

    def kaiming(shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> ParamSpec:
        return ParamSpec(shape, std=gain * math.sqrt(2.0 / fan_in))

    out_norm = {"g": ParamSpec((c,), const=k), "b": ParamSpec((c,))}
    table = {
        Blueprint.CONV_LIGHT: {"w": kaiming((c, c, 3, 3), 9 * c), **out_norm},
        Blueprint.ATTENTION: {
            "w1": kaiming((q, c), c), "b1": ParamSpec((q,)),
            "w2": kaiming((c, q), q, gain=k), "b2": ParamSpec((c,)),
        },
        Blueprint.NORM: out_norm,
        Blueprint.DEPTHWISE: {"wd": kaiming((c, 1, 3, 3), 9), "wp": kaiming((c, c), c), **out_norm},
        Blueprint.BOTTLENECK: {
            "w1": kaiming((q, c), c), "w2": kaiming((q, q, 3, 3), 9 * q), "w3": kaiming((c, q), q), **out_norm,
        },
        Blueprint.CONV_SMALL: {"w": kaiming((c, c), c), **out_norm},
        Blueprint.CONV_HEAVY: {
            "w1": kaiming((c, c, 3, 3), 9 * c), "g1": ParamSpec((c,), const=1.0), "b1": ParamSpec((c,)),
            "w2": kaiming((c, c, 3, 3), 9 * c), "g2": ParamSpec((c,), const=k), "b2": ParamSpec((c,)),
        },
    }
    specs = table[Blueprint(blueprint)]
    assert sum(math.prod(p.shape) for p in specs.values()) == blueprint_params(blueprint, c)
    return specs


def gate_param_specs(c: int) -> dict[str, ParamSpec]:
    """The per-slot GATE network: ``g = sigmoid(w . mean_hw(x) + b)``."""
    return {"w": ParamSpec((c,), std=1.0 / math.sqrt(c)), "b": ParamSpec(())}


def _draw(spec: ParamSpec, key: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """``[n, *spec.shape]`` initial values for the envs with RNG ``key``/``counter`` ``[n]``."""
    if spec.std > 0.0:
        return spec.std * rng.normal(key, counter, stream, spec.shape)
    return torch.full((key.shape[0], *spec.shape), spec.const, dtype=torch.float32, device=key.device)


class FlatModule:
    """One module of every env stored as a single ``[n_envs, size]`` tensor, with named views.

    Flat storage keeps the optimiser and the gradient norms at a handful of ops per module
    instead of a handful per parameter tensor (on CPU the per-op overhead dominated).
    """

    def __init__(self, specs: dict[str, ParamSpec], stream: int) -> None:
        self.specs = specs
        self.stream = stream  # RNG stream of the first parameter; parameter j uses stream + j
        self.shapes = {name: sp.shape for name, sp in specs.items()}
        self.sizes = [math.prod(sp.shape) for sp in specs.values()]
        self.size = sum(self.sizes)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named ``[n, *shape]`` views of a flat ``[n, size]`` tensor (gradients flow through).

        One ``split`` (whose backward is a single ``cat``) rather than a slice per parameter
        (whose backwards would each materialise a full-size zero gradient).
        """
        parts = flat.split(self.sizes, dim=1)
        return {k: t.view(flat.shape[0], *shape) for (k, shape), t in zip(self.shapes.items(), parts)}

    def draw(self, key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """Fresh flat values ``[n, size]`` for the envs with RNG ``key``/``counter`` ``[n]``."""
        parts = [_draw(sp, key, counter, self.stream + j).reshape(key.shape[0], -1)
                 for j, sp in enumerate(self.specs.values())]
        return torch.cat(parts, 1)


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
        return F.relu(F.max_pool2d(_ggn(x, g, b, n, groups), 2))
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


def _blend_delta(
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


# ----------------------------------------------------------------------------- grouped (batched) ops
def _gconv(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
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


def _ggn(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Per-env GroupNorm: env e's channels are one contiguous block of ``groups`` groups.

    On planes of <= 4 pixels each group is normalised as one plane and the affine map applied
    after: the native kernel's backward is ~2x slower there (it loops over tiny per-channel planes).
    """
    if x.shape[-2] * x.shape[-1] > 4:
        return F.group_norm(x, n * groups, g.reshape(-1), b.reshape(-1), GN_EPS)
    bsz, ct = x.shape[:2]
    y = F.group_norm(x.reshape(bsz, n * groups, -1), n * groups, None, None, GN_EPS).view_as(x)
    return torch.addcmul(b.reshape(1, ct, 1, 1), y, g.reshape(1, ct, 1, 1))


def _seed_f_grouped(bp: Blueprint, p: dict[str, torch.Tensor], x: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Residual branch f of ``n`` envs' seeds of blueprint ``bp``; x ``[B, n*c, H, W]``."""
    if bp == Blueprint.CONV_LIGHT:
        return _ggn(_gconv(x, p["w"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.CONV_SMALL:
        return _ggn(_gconv(x, p["w"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.CONV_HEAVY:
        y = F.relu(_ggn(_gconv(x, p["w1"], n), p["g1"], p["b1"], n, groups))
        return _ggn(_gconv(y, p["w2"], n), p["g2"], p["b2"], n, groups)
    if bp == Blueprint.DEPTHWISE:
        c = p["wd"].shape[1]
        if x.shape[-2:] == (1, 1):  # depthwise on one pixel: the centre tap scales each channel
            y = x * p["wd"][..., 1, 1].reshape(1, n * c, 1, 1)
        else:
            y = F.conv2d(x, p["wd"].reshape(n * c, 1, 3, 3), padding=1, groups=n * c)
        return _ggn(_gconv(y, p["wp"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.BOTTLENECK:
        y = F.relu(_gconv(x, p["w1"], n))
        y = F.relu(_gconv(y, p["w2"], n))
        return _ggn(_gconv(y, p["w3"], n), p["g"], p["b"], n, groups)
    if bp == Blueprint.NORM:
        return _ggn(x, p["g"], p["b"], n, groups)
    if bp == Blueprint.ATTENTION:
        bsz, _, h, w = x.shape
        c = p["w1"].shape[2]
        x4 = x.view(bsz, n, c, h * w)
        z = F.relu(torch.einsum("bnc,nqc->bnq", x4.mean(-1), p["w1"]) + p["b1"])
        z = torch.einsum("bnq,ncq->bnc", z, p["w2"]) + p["b2"]
        return (x4 * (2.0 * torch.sigmoid(z) - 1.0).unsqueeze(-1)).view_as(x)
    raise ValueError(f"blueprint {bp!r} is not a cnn blueprint")


def _sgd(
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


@dataclass
class _SlotTable:
    """Host (CPU) copy of the ``[E, S]`` slot fields that decide which seed runs where."""

    bp: torch.Tensor  # blueprint
    alpha: torch.Tensor  # effective blend weight: slot alpha; 1 for FOSSILIZED and (straight-through) TRAINING
    algorithm: torch.Tensor
    incubate: torch.Tensor  # TRAINING: runs in training only, adds exactly 0
    trains: torch.Tensor  # TRAINING / BLENDING / HOLDING: the seed gets updates
    seeded: torch.Tensor  # the seed runs in the training forward
    active: torch.Tensor  # the seed changes the output: BLENDING / HOLDING / FOSSILIZED with alpha > 0


@dataclass
class _Branch:
    """One node of the evaluation variant tree (see ``BatchedHostsDynamics._eval_plan``)."""

    bits: int  # slots forced to alpha 0 in this branch
    rows: torch.Tensor  # CPU env indices of the branch
    hv: dict[str, torch.Tensor]  # their host parameters (views)
    forks: dict[int, tuple[list[_Group], torch.Tensor, int]] = field(default_factory=dict)
    # slot -> (seed groups applied there, positions of the envs forking off, index of the child branch)


@dataclass
class _Group:
    """Envs of one forward branch whose slot ``slot`` runs blueprint ``bp``."""

    slot: int
    bp: Blueprint
    pos: torch.Tensor  # [n] positions of those envs in the branch's activations
    rows: torch.Tensor  # [n] their env indices (rows of the stacked parameters)
    alpha: torch.Tensor  # [n]
    algorithm: torch.Tensor  # [n]
    incubate: torch.Tensor | None  # [n] bool, TRAINING envs (None: none in the group)
    trains: bool  # some env of the group updates this seed
    use_gate: bool  # some env of the group blends with GATE
    all_incubate: bool = False  # every env of the group is in TRAINING
    alpha_one: bool = False  # every env of the group blends with alpha 1
    algorithms: frozenset[int] = frozenset()  # blend algorithms present (NONE folded into ADD)


# ----------------------------------------------------------------------------- the backend
class BatchedHostsDynamics:
    """Real small CNN hosts, one per env, trained as one grouped model (see the module docstring)."""

    compilable = False  # advance runs autograd and groups envs by blueprint on the host

    def __init__(self, cfg: EngineConfig, hcfg: HostsConfig | None = None) -> None:
        given = cfg.dynamics_config if hcfg is None else hcfg
        hcfg = backend_config("EngineConfig.dynamics_config", given, HostsConfig)
        if cfg.topology != "cnn":
            raise ValueError(f"BatchedHostsDynamics: topology must be 'cnn' (CNN hosts), got {cfg.topology!r}")
        if cfg.n_slots > MAX_SLOTS or cfg.n_slots > len(hcfg.channels):
            raise ValueError(
                f"BatchedHostsDynamics: n_slots must be <= {min(MAX_SLOTS, len(hcfg.channels))} (one slot after "
                f"each of the host's {len(hcfg.channels)} conv blocks, at most {MAX_SLOTS}), got {cfg.n_slots}"
            )
        self.cfg = cfg
        self.hcfg = hcfg
        self.n_slots = cfg.n_slots
        self.device = cfg.torch_device
        digits = {"n_val": hcfg.digits_val, "image_size": hcfg.image_size} if hcfg.dataset == "digits" else {}
        self.data: HostDataset = load_dataset(hcfg.dataset, hcfg.data_path, self.device, **digits)
        if hcfg.val_size > self.data.x_val.shape[0]:
            raise ValueError(
                f"HostsConfig.val_size={hcfg.val_size} exceeds the {self.data.x_val.shape[0]} validation images"
            )
        self.widths = tuple(hcfg.channels[: self.n_slots])
        self.n_classes = self.data.n_classes
        # every module of every env: the host, each slot's sleeper seeds (one per cnn blueprint), each slot's gate
        self.modules: dict[str, FlatModule] = {
            "host": FlatModule(host_param_specs(hcfg, self.data.in_channels, self.n_classes), _ST_HOST)
        }
        for s, c in enumerate(self.widths):
            for j, bp in enumerate(CNN_BLUEPRINTS):
                specs = seed_param_specs(bp, c, hcfg.seed_init_scale)
                self.modules[self.seed_module(s, bp)] = FlatModule(specs, _ST_SEED + 100 * s + 10 * j)
            self.modules[f"gate{s}"] = FlatModule(gate_param_specs(c), _ST_SEED + 100 * s + 90)
        self.host = self.modules["host"]
        self.host_params = float(self.host.size)
        # [S, 13] parameter count of each blueprint at this backend's slot widths (what the seeds really have)
        self.seed_params_table = torch.tensor(
            [[float(blueprint_params(b, c)) for b in Blueprint] for c in self.widths], device=self.device
        )
        self._val_x = self.data.images(self.data.x_val[: hcfg.val_size])
        self._val_y = self.data.y_val[: hcfg.val_size]

    @staticmethod
    def seed_module(slot: int, blueprint: Blueprint) -> str:
        return f"seed{slot}.{Blueprint(blueprint).name}"

    # ------------------------------------------------------------------ aux: init / reset / seeds
    def init_aux(self, n_envs: int, seed: int) -> dict[str, torch.Tensor]:
        """Fresh aux: keys ``episode_seed(seed, env, 0)``, freshly initialised hosts, no seeds.

        Layout: ``rng_key``/``rng_counter`` ``[E]``; ``seed_token``/``seed_bp`` ``[E, S]`` (the seed
        each slot holds: germination epoch + 1 and blueprint, 0 = none); per module (``host``,
        ``seed{s}.{BLUEPRINT}``, ``gate{s}``) its flat parameters ``[E, size]`` and ``mom.`` buffers.
        """
        dev = self.device
        aux: dict[str, torch.Tensor] = {
            "rng_key": torch.zeros(n_envs, dtype=torch.int64, device=dev),
            "rng_counter": torch.zeros(n_envs, dtype=torch.int64, device=dev),
            "seed_token": torch.zeros(n_envs, self.n_slots, dtype=torch.int64, device=dev),
            "seed_bp": torch.zeros(n_envs, self.n_slots, dtype=torch.int64, device=dev),
        }
        for name, mod in self.modules.items():
            aux[name] = torch.zeros(n_envs, mod.size, dtype=torch.float32, device=dev)
            aux["mom." + name] = torch.zeros(n_envs, mod.size, dtype=torch.float32, device=dev)
        env = torch.arange(n_envs, dtype=torch.int64, device=dev)
        keys = rng.episode_seed(seed, env, torch.zeros_like(env))
        return self.reset_aux(aux, torch.ones(n_envs, dtype=torch.bool, device=dev), keys)

    def reset_aux(self, aux: dict, rows: torch.Tensor, episode_seed: torch.Tensor) -> dict:
        """New episode for the envs in ``rows`` ([E] bool): re-key, fresh host, zero momenta, no seeds.

        Everything is selected with ``torch.where``, so rows outside ``rows`` stay bit-identical.
        """
        key_in = torch.as_tensor(episode_seed, dtype=torch.int64, device=aux["rng_key"].device)
        key = torch.where(rows, key_in & rng.MASK32, aux["rng_key"])
        out = dict(aux)
        out["rng_key"] = key
        for k, v in aux.items():
            if k == "rng_key":
                continue
            m = rows.reshape(rows.shape + (1,) * (v.dim() - 1))
            # the host is drawn afresh; counters, seed memory, momenta and sleeper seeds are zeroed
            # (seeds are drawn when they germinate)
            fresh = self.host.draw(key, torch.zeros_like(key)) if k == "host" else torch.zeros_like(v)
            out[k] = torch.where(m, fresh, v)
        return out

    def refresh_seeds(self, state: State, aux: dict) -> dict:
        """Fresh weights (and zero momenta) for seeds germinated since the last call.

        A slot holds a new seed when it is live and its ``germination_epoch``/``blueprint`` differ
        from what ``aux`` remembers; the draw is keyed by (env key, germination epoch), so it does
        not depend on when or how often this runs. Idempotent.
        """
        sl = state["slots"]
        live = stage_in(sl["stage"], LIVE_STAGES)
        germ = sl["germination_epoch"].to(torch.int64)  # state codes may be int32
        token = torch.where(live, germ + 1, 0)
        bp = torch.where(live, sl["blueprint"].to(torch.int64), 0)
        new = live & ((token != aux["seed_token"]) | (bp != aux["seed_bp"]))
        out = dict(aux)
        out["seed_token"], out["seed_bp"] = token, bp
        if not bool(new.any()):
            return out
        for s in range(self.n_slots):
            envs = new[:, s].nonzero().squeeze(1)
            if envs.numel() == 0:
                continue
            key, ctr = aux["rng_key"][envs], germ[envs, s]
            for name in [self.seed_module(s, bp) for bp in CNN_BLUEPRINTS] + [f"gate{s}"]:
                val = self.modules[name].draw(key, ctr)
                out[name] = out[name].index_copy(0, envs, val)
                out["mom." + name] = out["mom." + name].index_copy(0, envs, torch.zeros_like(val))
        return out

    def env_params(self, aux: dict, env: int, momentum: bool = False) -> dict[str, torch.Tensor]:
        """One env's parameters (or momentum buffers) by name, e.g. ``"host.conv0.w"`` (copies)."""
        prefix = "mom." if momentum else ""
        return {
            f"{name}.{k}": v[0].clone()
            for name, mod in self.modules.items()
            for k, v in mod.views(aux[prefix + name][env: env + 1]).items()
        }

    def data_order(self, aux: dict) -> torch.Tensor:
        """``[E, minibatches_per_epoch, minibatch_size]`` training indices of this epoch, per env."""
        h = self.hcfg
        n_train = self.data.x_train.shape[0]
        u = rng.uniform(aux["rng_key"], aux["rng_counter"], _ST_DATA, (n_train,))
        perm = torch.argsort(u, dim=1, stable=True)
        take = torch.arange(h.minibatches_per_epoch * h.minibatch_size, device=perm.device) % n_train
        return perm[:, take].view(-1, h.minibatches_per_epoch, h.minibatch_size)

    # ------------------------------------------------------------------ forward
    def _slot_table(self, state: State) -> _SlotTable:
        """One device->host copy of the slot fields; the groups below are built from it."""
        sl = state["slots"]
        stage = sl["stage"].cpu()
        incubate = stage == int(Stage.TRAINING)
        alpha = torch.where((stage == int(Stage.FOSSILIZED)) | incubate, 1.0, sl["alpha"].cpu())
        blended = stage_in(stage, (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED))
        return _SlotTable(
            bp=sl["blueprint"].cpu().to(torch.int64), alpha=alpha, algorithm=sl["algorithm"].cpu().to(torch.int64),
            incubate=incubate,
            trains=stage_in(stage, _TRAINS), seeded=stage_in(stage, _SEEDED), active=blended & (alpha > 0.0),
        )

    @staticmethod
    def _fossil_rows(state: State) -> torch.Tensor:
        """``[E, S]`` CPU bool: the slot holds a FOSSILIZED seed (kept on in ``acc_committed``)."""
        return state["slots"]["stage"].cpu() == int(Stage.FOSSILIZED)

    def _groups(self, tab: _SlotTable, s: int, rows: torch.Tensor | None, train: bool) -> list[_Group]:
        """Blueprint groups of slot ``s`` among the envs ``rows`` (CPU indices; None = all, in order)."""
        if rows is None:
            rows = torch.arange(tab.bp.shape[0])
        runs = (tab.seeded if train else tab.active)[rows, s]
        bp_r = tab.bp[rows, s]
        dev = self.device
        groups = []
        for bp in CNN_BLUEPRINTS:
            sel = runs & (bp_r == int(bp))
            if not bool(sel.any()):
                continue
            pos = sel.nonzero().squeeze(1)
            env = rows[pos]
            inc = tab.incubate[env, s] if train else torch.zeros(env.numel(), dtype=torch.bool)
            algo = tab.algorithm[env, s]
            present = frozenset(max(int(a), int(AlphaAlgorithm.ADD)) for a in algo.unique().tolist())
            groups.append(_Group(
                slot=s, bp=bp, pos=pos.to(dev), rows=env.to(dev), alpha=tab.alpha[env, s].to(dev),
                algorithm=algo.to(dev), incubate=inc.to(dev) if bool(inc.any()) else None,
                trains=train and bool(tab.trains[env, s].any()),
                use_gate=int(AlphaAlgorithm.GATE) in present,
                all_incubate=bool(inc.all()), alpha_one=bool((tab.alpha[env, s] == 1.0).all()),
                algorithms=present,
            ))
        return groups

    def _apply_slot(self, p: dict[str, torch.Tensor], groups: list[_Group], h: torch.Tensor, n: int) -> torch.Tensor:
        """Slot output for the ``n`` envs of ``h``: ``h`` plus each group's blend delta at its positions."""
        bsz, _, hh, ww = h.shape
        c = h.shape[1] // n
        h5 = h.view(bsz, n, c, hh, ww)
        out = h5.clone()  # accumulated in place: one copy per slot, not one per group
        for g in groups:
            m = g.pos.numel()
            x = h5.index_select(1, g.pos)
            if g.all_incubate:  # TRAINING envs see detached activations (gradient isolation)
                x = x.detach()
            elif g.incubate is not None:
                x = torch.where(g.incubate.view(1, m, 1, 1, 1), x.detach(), x)
            name = self.seed_module(g.slot, g.bp)
            ps = self.modules[name].views(p[name].index_select(0, g.rows))
            f = _seed_f_grouped(g.bp, ps, x.reshape(bsz, m * c, hh, ww), m, self.hcfg.norm_groups)
            f = f.view(bsz, m, c, hh, ww)
            gate = None
            if g.use_gate:
                gp = self.modules[f"gate{g.slot}"].views(p[f"gate{g.slot}"].index_select(0, g.rows))
                gate = torch.sigmoid((x.mean((3, 4)) * gp["w"]).sum(-1) + gp["b"]).view(bsz, m, 1, 1, 1)
            d = _blend_delta(x, f, g.algorithm.view(1, m, 1, 1, 1), gate, g.algorithms)
            if not g.alpha_one:
                d = g.alpha.view(1, m, 1, 1, 1) * d
            if g.all_incubate:  # value 0, gradient only into the seed (straight-through)
                d = d - d.detach()
            elif g.incubate is not None:
                d = d - g.incubate.view(1, m, 1, 1, 1).to(d.dtype) * d.detach()
            out.index_add_(1, g.pos, d)
        return out.reshape(bsz, n * c, hh, ww)

    def _block(
        self, hv: dict[str, torch.Tensor], i: int, h: torch.Tensor, n: int, folded: bool = False
    ) -> torch.Tensor:
        """Host block ``i`` of ``n`` envs side by side (grouped conv; ``h`` ``[B, n*C, H, W]``).
        ``folded``: ``hv`` comes from :meth:`_eval_host_views` (norm gains made non-negative)."""
        w = hv[f"conv{i}.w"]
        y = F.conv2d(h, w.reshape(-1, *w.shape[2:]), hv[f"conv{i}.b"].reshape(-1), padding=1, groups=n)
        return gn_relu_pool(y, hv[f"norm{i}.g"], hv[f"norm{i}.b"], n, self.hcfg.norm_groups, folded)

    def _eval_host_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Host views with each norm gain's sign folded into the conv before it (exact: negating a
        conv's weights and bias negates its output, its group mean, and leaves the normalised
        output times ``|g|`` unchanged), so validation can max-pool before the norm's affine map."""
        hv = self.host.views(flat)
        for i in range(len(self.hcfg.channels)):
            g = hv[f"norm{i}.g"]
            sign = torch.where(g < 0, -1.0, 1.0)
            hv[f"conv{i}.w"] = hv[f"conv{i}.w"] * sign[:, :, None, None, None]
            hv[f"conv{i}.b"] = hv[f"conv{i}.b"] * sign
            hv[f"norm{i}.g"] = g.abs()
        return hv

    def _block0_shared(self, hv: dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
        """Block 0 when every env sees the same images ``x`` ``[B, C, H, W]`` (validation, folded
        ``hv``): one unfold + batched matmul against all envs' filters, bias fused, output already
        in the grouped layout; ~4x cheaper on CPU than the grouped conv."""
        w = hv["conv0.w"].reshape(n * hv["conv0.w"].shape[1], -1)  # [n*C0, C*9]
        bsz, _, hh, ww = x.shape
        u = F.unfold(x, 3, padding=1)  # [B, C*9, H*W]
        bias = hv["conv0.b"].reshape(1, -1, 1).expand(bsz, -1, hh * ww)
        y = torch.baddbmm(bias, w.expand(bsz, -1, -1), u).view(bsz, -1, hh, ww)
        return gn_relu_pool(y, hv["norm0.g"], hv["norm0.b"], n, self.hcfg.norm_groups, True)

    def _head(self, hv: dict[str, torch.Tensor], h: torch.Tensor, n: int) -> torch.Tensor:
        bsz = h.shape[0]
        feat = h.view(bsz, n, -1, h.shape[-2] * h.shape[-1]).mean(-1)
        return torch.einsum("bec,ekc->bek", feat, hv["fc.w"]) + hv["fc.b"]

    def _train_forward(self, p: dict[str, torch.Tensor], x: torch.Tensor, groups: list[list[_Group]]) -> torch.Tensor:
        """Training logits ``[B, E, K]``; ``x`` ``[B, E*C, H, W]`` holds env e's images in channel block e."""
        n = p["host"].shape[0]
        hv = self.host.views(p["host"])
        h = x
        for i in range(len(self.hcfg.channels)):
            h = self._block(hv, i, h, n)
            if i < self.n_slots and groups[i]:
                h = self._apply_slot(p, groups[i], h, n)
        return self._head(hv, h, n)

    def _eval_plan(self, p: dict[str, torch.Tensor], tab: _SlotTable) -> list[_Branch]:
        """The on/off variant tree for the current slot fields (built once per evaluation).

        A branch is (off-slot bits, its envs, their host weights). At each slot, every branch whose
        envs have an active seed there applies it and forks an "off" branch holding only those envs
        (with the pre-seed activations); later blocks run per branch on gathered host weights. So
        env e is evaluated once per subset of *its* active slots, as a per-env loop would, and the
        blocks before the first active slot run once for all variants.
        """
        n_env = tab.bp.shape[0]
        branches = [_Branch(0, torch.arange(n_env), self._eval_host_views(p["host"]))]
        for i in range(self.n_slots):
            for br in list(branches):
                groups = self._groups(tab, i, br.rows, train=False)
                if not groups:
                    continue
                pos = tab.active[br.rows, i].nonzero().squeeze(1)
                rows = br.rows[pos]
                br.forks[i] = (groups, pos.to(self.device), len(branches))
                hv = self._eval_host_views(p["host"][rows.to(self.device)])
                branches.append(_Branch(br.bits | (1 << i), rows, hv))
        return branches

    def _variant_logits(self, p: dict[str, torch.Tensor], x: torch.Tensor, plan: list[_Branch]) -> list[torch.Tensor]:
        """Logits ``[B, n, K]`` of every branch of ``plan`` for images ``x`` shared by all envs."""
        acts: list[torch.Tensor | None] = [None] * len(plan)
        acts[0] = self._block0_shared(plan[0].hv, x, plan[0].rows.numel())
        for i in range(len(self.hcfg.channels)):
            if i > 0:
                acts = [None if a is None else self._block(br.hv, i, a, br.rows.numel(), folded=True)
                        for br, a in zip(plan, acts)]
            for k, br in enumerate(plan):
                if i not in br.forks:
                    continue
                groups, pos, child = br.forks[i]
                h = acts[k]
                bsz, _, hh, ww = h.shape
                n = br.rows.numel()
                acts[child] = h.view(bsz, n, -1, hh, ww).index_select(1, pos).reshape(bsz, -1, hh, ww)
                acts[k] = self._apply_slot(p, groups, h, n)
        return [self._head(br.hv, a, br.rows.numel()) for br, a in zip(plan, acts)]

    def _assemble(self, plan: list[_Branch], values: list[torch.Tensor], tab: _SlotTable) -> torch.Tensor:
        """``[2^S, E, ...]`` per-variant values from per-branch values ``[n, ...]`` (env first).

        Variant v (bit s = slot s forced to alpha 0) of env e is the branch with bits
        ``v & active_bits(e)``: forcing alpha 0 on a slot without an active seed changes nothing.
        """
        n_env = tab.bp.shape[0]
        rest = values[0].shape[1:]
        table = torch.zeros(2 ** self.n_slots, n_env, *rest, device=self.device, dtype=values[0].dtype)
        for br, val in zip(plan, values):
            table[br.bits, br.rows.to(self.device)] = val
        active_bits = (tab.active.to(torch.int64) << torch.arange(self.n_slots)).sum(1)  # [E]
        v = torch.arange(2 ** self.n_slots)[:, None] & active_bits[None, :]
        return table[v.to(self.device), torch.arange(n_env, device=self.device)[None, :]]

    def predict(self, state: State, aux: dict, x: torch.Tensor, off: tuple[int, ...] = ()) -> torch.Tensor:
        """Eval logits ``[B, E, K]`` of every env on the images ``x`` ``[B, C, H, W]``, with the seeds
        of the slots in ``off`` forced to alpha 0 (the counterfactual the metrics use)."""
        tab = self._slot_table(state)
        with torch.no_grad():
            plan = self._eval_plan(aux, tab)
            logits = [lg.transpose(0, 1) for lg in self._variant_logits(aux, x, plan)]
            return self._assemble(plan, logits, tab)[sum(1 << s for s in off)].transpose(0, 1)

    # ------------------------------------------------------------------ one epoch
    @torch.enable_grad()  # the hosts train with autograd even when the caller (a rollout) runs under no_grad
    def train_epoch(
        self, state: State, aux: dict, tab: _SlotTable | None = None
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """One host epoch of SGD for every env; returns (new aux, raw telemetry)."""
        h = self.hcfg
        sl = state["slots"]
        n_env = aux["rng_key"].shape[0]
        tab = self._slot_table(state) if tab is None else tab
        groups = [self._groups(tab, s, None, train=True) for s in range(self.n_slots)]
        order = self.data_order(aux)
        trains = stage_in(sl["stage"], _TRAINS)
        is_gate = sl["algorithm"] == int(AlphaAlgorithm.GATE)
        # trainable modules and the env mask of their update (None = every env)
        masks: dict[str, torch.Tensor | None] = {"host": None}
        seed_sel: dict[str, tuple[int, torch.Tensor]] = {}
        for gs in groups:
            for g in gs:
                if g.trains:
                    sel = trains[:, g.slot] & (sl["blueprint"][:, g.slot] == int(g.bp))
                    masks[self.seed_module(g.slot, g.bp)] = sel
                    seed_sel[self.seed_module(g.slot, g.bp)] = (g.slot, sl["blueprint"][:, g.slot] == int(g.bp))
                if g.trains and g.use_gate:
                    masks[f"gate{g.slot}"] = trains[:, g.slot] & is_gate[:, g.slot]
        keys = list(masks)
        p = dict(aux)
        finite = torch.ones(n_env, dtype=torch.bool, device=self.device)
        host_norm = torch.zeros(n_env, device=self.device)
        seed_norm = torch.zeros(n_env, self.n_slots, device=self.device)
        n_measured = 0
        for mb in range(h.minibatches_per_epoch):
            idx = order[:, mb]  # [E, B]
            x = self.data.images(self.data.x_train[idx])  # [E, B, C, H, W]
            x = x.transpose(0, 1).reshape(idx.shape[1], -1, *x.shape[-2:])
            y = self.data.y_train[idx]  # [E, B]
            leaves = {k: p[k].detach().requires_grad_(True) for k in keys}
            logits = self._train_forward({**p, **leaves}, x, groups)
            loss = F.cross_entropy(
                logits.reshape(-1, self.n_classes), y.t().reshape(-1), reduction="none"
            ).view(idx.shape[1], n_env).mean(0)
            finite = finite & torch.isfinite(loss)
            grads = dict(zip(keys, torch.autograd.grad(loss.sum(), [leaves[k] for k in keys])))
            if mb % h.grad_stride == 0:
                n_measured += 1
                host_norm = host_norm + grads["host"].pow(2).sum(1).sqrt()
                sq = torch.zeros(n_env, self.n_slots, device=self.device)
                for name, (s, own) in seed_sel.items():
                    sq[:, s] += torch.where(own, grads[name].pow(2).sum(1), 0.0)
                seed_norm = seed_norm + sq.sqrt()
            for k in keys:
                host = k == "host"
                lr = h.host_lr if host else h.seed_lr
                mom = h.host_momentum if host else h.seed_momentum
                wd = h.host_weight_decay if host else h.seed_weight_decay
                p[k], p["mom." + k] = _sgd(p[k], grads[k], p["mom." + k], lr, mom, wd, masks[k])
        p["rng_counter"] = aux["rng_counter"] + 1
        telemetry = {"host_norm": host_norm / n_measured, "seed_norm": seed_norm / n_measured, "finite": finite}
        return p, telemetry

    def evaluate(self, state: State, aux: dict, tab: _SlotTable | None = None) -> dict[str, torch.Tensor]:
        """Validation of every env with all on/off seed variants in one batched pass per chunk.

        Returns val_loss, val_acc, acc_without_slot, acc_all_seeds_off, acc_committed, interaction_sum (see the
        module docstring) and ``finite`` (the full model's loss is finite).
        """
        h = self.hcfg
        n_env = aux["rng_key"].shape[0]
        tab = self._slot_table(state) if tab is None else tab
        loss_sum = torch.zeros(n_env, device=self.device)
        with torch.no_grad():
            plan = self._eval_plan(aux, tab)
            correct = [torch.zeros(br.rows.numel(), device=self.device) for br in plan]
            step = max(1, h.val_chunk // n_env)
            for start in range(0, h.val_size, step):
                x = self._val_x[start: start + step]
                y = self._val_y[start: start + step]
                for k, logits in enumerate(self._variant_logits(aux, x, plan)):
                    correct[k] += (logits.argmax(-1) == y[:, None]).sum(0)
                    if k == 0:  # every seed on: the reported model
                        bsz, n, n_cls = logits.shape
                        loss_sum += F.cross_entropy(
                            logits.reshape(-1, n_cls), y[:, None].expand(bsz, n).reshape(-1), reduction="none"
                        ).view(bsz, n).sum(0)
            correct = self._assemble(plan, correct, tab)
        acc = 100.0 * correct / h.val_size  # [2^S, E], bit s of the index = slot s off
        # the committed model is one more variant of the same pass: every non-fossil active seed off
        fossil = self._fossil_rows(state)
        uncommitted = ((tab.active & ~fossil).to(torch.int64) << torch.arange(self.n_slots)).sum(1)
        env_idx = torch.arange(n_env, device=self.device)
        s_n = self.n_slots
        inter = torch.zeros(n_env, s_n, device=self.device)
        for i in range(s_n):
            for j in range(s_n):
                if i != j:
                    inter[:, i] += acc[0] - acc[1 << i] - acc[1 << j] + acc[(1 << i) | (1 << j)]
        val_loss = loss_sum / h.val_size
        return {
            "val_loss": val_loss,
            "val_acc": acc[0],
            "acc_without_slot": torch.stack([acc[1 << s] for s in range(s_n)], 1),
            "acc_all_seeds_off": acc[-1],
            "acc_committed": acc[uncommitted.to(self.device), env_idx],
            "interaction_sum": inter,
            "finite": torch.isfinite(val_loss),
        }

    def advance(self, state: State, aux: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """One host epoch for every env, then validation: returns (metrics, new aux)."""
        aux = self.refresh_seeds(state, aux)
        tab = self._slot_table(state)
        new_aux, tel = self.train_epoch(state, aux, tab)
        ev = self.evaluate(state, new_aux, tab)
        sl = state["slots"]
        n_env = aux["rng_key"].shape[0]
        trains = stage_in(sl["stage"], _TRAINS)
        bp = sl["blueprint"].to(torch.int64).clamp(0, len(Blueprint) - 1)
        n_seed = torch.gather(self.seed_params_table.expand(n_env, -1, -1), 2, bp[..., None]).squeeze(-1)
        grad = grad_summary(tel["seed_norm"], tel["host_norm"][:, None], n_seed, self.host_params, self.hcfg)
        diverged = ~(tel["finite"] & ev["finite"])
        chance = 100.0 / self.n_classes
        dv, dvs = diverged, diverged[:, None]
        metrics = {
            "val_loss": torch.where(dv, math.log(self.n_classes), ev["val_loss"]),
            "val_acc": torch.where(dv, chance, ev["val_acc"]),
            "acc_all_seeds_off": torch.where(dv, chance, ev["acc_all_seeds_off"]),
            "acc_committed": torch.where(dv, chance, ev["acc_committed"]),
            "host_params": torch.full((n_env,), self.host_params, device=self.device),
            "diverged": diverged,
            "acc_without_slot": torch.where(dvs, chance, ev["acc_without_slot"]),
            "interaction_sum": torch.where(dvs, 0.0, ev["interaction_sum"]),
        }
        for k, v in grad.items():
            metrics[k] = torch.where(trains, v, torch.zeros_like(v))
        return metrics, new_aux


# ----------------------------------------------------------------------------- per-env reference
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
        if st.stage in _TRAINS:
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
