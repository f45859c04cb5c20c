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

Not fullgraph-compilable: ``advance`` runs autograd and groups envs by blueprint on the host
(one small device->host copy of the ``[E, S]`` slot fields per call, plus a check for new seeds),
so engines should not wrap it in ``torch.compile(fullgraph=True)``.

Why grouped convolutions (and not vmap, unfold + bmm or a per-env loop), and the batched vs
per-env epoch timings: bench/RESULTS.md ("Batched hosts").

Modules: :mod:`.config` (HostsConfig, presets), :mod:`.params` (parameter tables, flat storage),
:mod:`.ops` (grouped per-env ops), :mod:`.backend` (BatchedHostsDynamics). The readable per-env
reference the tests and benches compare against is ``tests/hosts_reference.py``.
"""

from esper_soa.dynamics.hosts.backend import (
    MAX_HOST_SLOTS,
    TRAINED_STAGES,
    BatchedHostsDynamics,
)
from esper_soa.dynamics.hosts.config import HOSTS_PRESETS, HostsConfig
from esper_soa.dynamics.hosts.ops import GN_EPS, gn_relu_pool, grad_summary
from esper_soa.dynamics.hosts.params import (
    CNN_BLUEPRINTS,
    FlatModule,
    ParamSpec,
    gate_param_specs,
    host_param_specs,
    seed_param_specs,
)

__all__ = [
    "CNN_BLUEPRINTS", "GN_EPS", "HOSTS_PRESETS", "MAX_HOST_SLOTS", "TRAINED_STAGES", "BatchedHostsDynamics",
    "FlatModule", "HostsConfig", "ParamSpec", "gate_param_specs", "gn_relu_pool", "grad_summary",
    "host_param_specs", "seed_param_specs",
]
