"""Surrogate host dynamics (SPEC §11): an analytic, stochastic, fully tensorized host + seed model.

The model is written out with equations in ``docs/SURROGATE.md``. In one paragraph: each env's host
follows a saturating learning curve with per-env start, asymptote and time constant; each
(env, slot, blueprint) has a hidden benefit drawn at reset (either sign, larger magnitude for
larger blueprints) that a seed realises only as it trains; a blended seed adds
``alpha * f_algorithm(benefit * learned)`` to the true accuracy, pairs of blended seeds add small
hidden interaction terms, alpha changes and removed seeds put transient dips into the host, and
every reported accuracy is a noisy evaluation whose noise is shared between ``val_acc`` and its
counterfactuals (they are evaluated on the same validation data), so leave-one-out differences
recover the seed's contribution up to a small per-evaluation noise.

Everything is a pure tensor function of ``(state, aux)``: no loops over envs or slots, no host
syncs, no data-dependent Python branches, so ``advance`` compiles with ``fullgraph=True``. All
randomness comes from :mod:`esper_soa.core.rng` keyed by the per-env ``rng_key``/``rng_counter`` in
``aux``; the counter advances on every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from esper_soa.core import rng
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    LIVE_STAGES,
    AlphaAlgorithm,
    Blueprint,
    SpecTables,
    Stage,
    stage_in,
)
from esper_soa.core.state import State
from esper_soa.core.validation import backend_config

N_BLUEPRINTS = len(Blueprint)


@dataclass(frozen=True)
class SurrogateConfig:
    """Every constant of the surrogate model (accuracies in percentage points, times in epochs)."""

    # --- host learning curve: acc(t) = a_max - (a_max - a0) exp(-t / tau), drawn per env at reset
    host_acc0_min: float = 25.0  # lowest host accuracy after the first epoch (t = 0), %
    host_acc0_max: float = 40.0  # highest host accuracy after the first epoch, %
    host_acc_max_min: float = 65.0  # lowest asymptotic host accuracy, %
    host_acc_max_max: float = 85.0  # highest asymptotic host accuracy, %
    host_tau_min: float = 12.0  # shortest host learning time constant (log-uniform draw), epochs
    host_tau_max: float = 40.0  # longest host learning time constant, epochs
    host_params_cnn: float = 250_000.0  # host parameter count reported for topology "cnn"
    host_params_transformer: float = 1_000_000.0  # host parameter count for topology "transformer"
    # --- measurement noise
    eval_noise_std: float = 0.3  # std of the per-epoch validation noise shared by all evaluations, pp
    cf_noise_std: float = 0.15  # std of the extra independent noise of each counterfactual evaluation, pp
    # --- latent seed benefit: benefit_pp * size(s, b) * (blueprint_benefit_mean[b] + benefit_std * z)
    benefit_pp: float = 1.5  # benefit scale of a seed of reference size, pp
    benefit_std: float = 1.0  # spread of the latent benefit around its blueprint mean (units of the scale)
    blueprint_benefit_mean: tuple[float, ...] = (
        0.0,  # NOOP (never valid)
        0.5,  # CONV_LIGHT
        0.4,  # ATTENTION
        0.6,  # NORM
        0.3,  # DEPTHWISE
        0.3,  # BOTTLENECK
        0.4,  # CONV_SMALL
        0.2,  # CONV_HEAVY
        0.5,  # LORA
        0.3,  # LORA_LARGE
        0.4,  # MLP_SMALL
        0.2,  # MLP
        0.3,  # FLEX_ATTENTION
    )  # prior mean of the latent benefit per blueprint (units of the scale); learnable by a policy
    size_ref_params: float = 20_000.0  # seed parameter count whose size factor is 1
    size_exponent: float = 0.25  # size(s, b) = (params(s, b) / size_ref_params) ** size_exponent
    seed_learn_tau: float = 8.0  # seed learning time: learned = 1 - exp(-trained_epochs / tau), epochs
    # --- blend algorithms
    multiply_cap_pp: float = 1.5  # MULTIPLY saturates the effect: cap * tanh(B / cap), pp
    gate_sharpness: float = 1.5  # GATE opens as sigmoid(sharpness * B) with B in pp, 1/pp
    gate_gain: float = 0.9  # GATE passes this fraction of the gated effect (gate overhead)
    # --- pairwise interactions between blended seeds: w_ij * (alpha_i learned_i) * (alpha_j learned_j)
    interaction_std_pp: float = 0.3  # std of the symmetric latent pair term w_ij, pp
    # --- transient dips of the host
    shock_pp: float = 3.0  # host dip per unit of size * (alpha - previous_alpha)^2, pp
    shock_decay: float = 0.5  # fraction of the shock dip left after each further epoch
    coadapt_pp: float = 0.5  # dependency the host builds on a fully blended seed of reference size, pp
    coadapt_rate: float = 0.1  # per-epoch rate at which the dependency follows alpha * size * coadapt_pp
    debt_recovery_rate: float = 0.15  # per-epoch rate at which the host recovers a removed seed's dependency
    # --- validation loss as a function of val_acc: loss_floor - loss_log_scale * ln(acc / 100)
    loss_floor: float = 0.1  # validation loss at 100 % accuracy
    loss_log_scale: float = 1.0  # slope of the loss in -ln(accuracy fraction)
    loss_min_acc_frac: float = 0.01  # accuracy fraction floor inside the log (keeps the loss finite)
    # --- gradient telemetry (slots in TRAINING / BLENDING / HOLDING)
    host_grad_norm: float = 1.0  # host gradient norm at the start of training
    host_grad_floor: float = 0.3  # fraction of the host gradient norm left once the host has converged
    host_grad_noise_std: float = 0.1  # log-normal noise of the host gradient norm
    health_logit_mean: float = 2.0  # mean logit of a seed's latent gradient health (sigmoid -> ~0.88)
    health_logit_std: float = 1.0  # std of that logit across (env, slot, blueprint)
    health_benefit_corr: float = 0.3  # correlation of health logit and latent benefit (telemetry hint)
    health_noise_std: float = 0.05  # per-epoch noise of the measured health (then clamped to [0, 1])
    vanishing_fraction: float = 0.5  # share of seeds whose gradients drift down (vanish); the rest explode
    grad_ratio_nominal: float = 0.5  # seed/host gradient-norm ratio of a perfectly healthy, untrained seed
    grad_dev_scale: float = 8.0  # log-ratio deviation per unit of missing health: +-scale * (1 - health)
    grad_ratio_noise_std: float = 0.2  # per-epoch log-normal noise of the gradient ratio
    grad_ratio_floor: float = 0.5  # fraction of the gradient ratio left once the seed has learnt
    vanish_ratio: float = 0.01  # has_vanishing when the ratio is below this
    explode_ratio: float = 10.0  # has_exploding when the ratio is above this
    # --- catastrophic divergence (terminates the episode in the engine)
    diverge_prob: float = 0.0  # per-env, per-epoch probability of a catastrophic divergence
    diverge_prob_per_exploding: float = 0.0  # added probability per blended seed with exploding gradients
    diverged_acc: float = 10.0  # accuracy reported by a diverged host (chance for 10 classes), %

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SurrogateConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not 0.0 <= self.host_acc0_min <= self.host_acc0_max <= self.host_acc_max_min:
            raise bad("host_acc0_max", "host_acc0_min <= host_acc0_max <= host_acc_max_min")
        if not self.host_acc_max_min <= self.host_acc_max_max <= 100.0:
            raise bad("host_acc_max_max", "host_acc_max_min <= host_acc_max_max <= 100")
        if not 0.0 < self.host_tau_min <= self.host_tau_max:
            raise bad("host_tau_max", "0 < host_tau_min <= host_tau_max")
        if len(self.blueprint_benefit_mean) != N_BLUEPRINTS:
            raise bad("blueprint_benefit_mean", f"{N_BLUEPRINTS} values (one per Blueprint)")
        for name in ("seed_learn_tau", "multiply_cap_pp", "size_ref_params", "loss_min_acc_frac",
                     "grad_ratio_nominal", "vanish_ratio", "explode_ratio"):
            if not getattr(self, name) > 0.0:
                raise bad(name, "> 0")
        for name in ("shock_decay", "coadapt_rate", "debt_recovery_rate", "host_grad_floor",
                     "grad_ratio_floor", "vanishing_fraction", "diverge_prob", "gate_gain"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "a value in [0, 1]")
        if not -1.0 <= self.health_benefit_corr <= 1.0:
            raise bad("health_benefit_corr", "a value in [-1, 1]")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and f.name.endswith("_std") and v < 0.0:
                raise bad(f.name, ">= 0")
            if isinstance(v, float) and f.name.endswith(("_pp", "_prob_per_exploding")) and v < 0.0:
                raise bad(f.name, ">= 0")


# Named configurations (``esper-soa --dynamics surrogate --preset NAME``): the hand-set defaults, and
# "calibrated", fitted by ``scripts/calibrate_surrogate.py`` to the calibrated real hosts
# (``dynamics.hosts.HOSTS_PRESETS["calibrated"]``), see docs/CALIBRATION.md: train on it, evaluate on
# ``--dynamics hosts``.
SURROGATE_PRESETS: dict[str, SurrogateConfig] = {
    "default": SurrogateConfig(),
    "calibrated": SurrogateConfig(
        host_acc0_min=0.0, host_acc0_max=18.631, host_acc_max_min=76.964, host_acc_max_max=97.887,
        host_tau_min=9.26, host_tau_max=36.896, eval_noise_std=3.365, cf_noise_std=4.515,
        benefit_pp=15.651, benefit_std=0.458,
    ),
}


# RNG stream ids. Latent draws use counter 0 of their own streams at reset; per-epoch noise uses the
# env's running counter, so the two families never collide.
_ST_EVAL = 1  # shared validation noise [E]
_ST_CF = 2  # per-slot counterfactual noise [E, S]
_ST_CF_OFF = 3  # all-seeds-off counterfactual noise [E]
_ST_HOST_GRAD = 4  # host gradient-norm noise [E]
_ST_HEALTH = 5  # health measurement noise [E, S]
_ST_RATIO = 6  # gradient-ratio noise [E, S]
_ST_DIVERGE = 7  # divergence uniform [E]
_ST_CF_COMMITTED = 8  # committed (non-fossil seeds off) counterfactual noise [E]
_LT_HOST = 101  # host curve uniforms [E, 3]
_LT_BENEFIT = 102  # benefit normals [E, S, 13]
_LT_HEALTH = 103  # health normals [E, S, 13]
_LT_GRAD_DIR = 104  # vanish/explode direction uniforms [E, S, 13]
_LT_INTERACT = 105  # pair-term normals [E, S, S]

# aux entries re-drawn at reset (latents) and zeroed at reset (running model state)
LATENT_KEYS = ("host_acc0", "host_acc_max", "host_tau", "benefit", "health", "grad_dir", "interaction")
RUNNING_KEYS = ("progress", "coadapt", "debt", "shock")


_TRAINS = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)


class SurrogateDynamics:
    """Default host-dynamics backend (SPEC §11 "surrogate"); see the module docstring."""

    compilable = True  # advance is a pure tensor function
    seed_params_table = None  # seeds are priced by the spec's blueprint table

    def __init__(self, cfg: EngineConfig, scfg: SurrogateConfig | None = None) -> None:
        given = cfg.dynamics_config if scfg is None else scfg
        scfg = backend_config("EngineConfig.dynamics_config", given, SurrogateConfig)
        self.cfg = cfg
        self.scfg = scfg
        self.n_slots = cfg.n_slots
        self.device = cfg.torch_device
        tables = SpecTables(cfg.topology, cfg.n_slots, self.device)
        # [S, 13] size factor of each blueprint at each slot (0 for NOOP, which has no parameters)
        self.size_scale = (tables.blueprint_params / scfg.size_ref_params) ** scfg.size_exponent
        self.benefit_mean = torch.tensor(scfg.blueprint_benefit_mean, dtype=torch.float32, device=self.device)
        self.host_params = scfg.host_params_cnn if cfg.topology == "cnn" else scfg.host_params_transformer

    # ------------------------------------------------------------------ latents and resets
    def draw_latents(self, key: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-episode latent of every env, as a function of the per-env key only."""
        c = self.scfg
        dev, s = key.device, self.n_slots
        zero = torch.zeros_like(key)
        u = rng.uniform(key, zero, _LT_HOST, (3,))
        acc0 = c.host_acc0_min + (c.host_acc0_max - c.host_acc0_min) * u[:, 0]
        acc_max = c.host_acc_max_min + (c.host_acc_max_max - c.host_acc_max_min) * u[:, 1]
        log_lo, log_hi = math.log(c.host_tau_min), math.log(c.host_tau_max)
        tau = torch.exp(log_lo + (log_hi - log_lo) * u[:, 2])

        z_b = rng.normal(key, zero, _LT_BENEFIT, (s, N_BLUEPRINTS))
        size = self.size_scale.to(dev)
        benefit = c.benefit_pp * size * (self.benefit_mean.to(dev) + c.benefit_std * z_b)

        z_h = rng.normal(key, zero, _LT_HEALTH, (s, N_BLUEPRINTS))
        rho = c.health_benefit_corr
        logit = c.health_logit_mean + c.health_logit_std * (rho * z_b + math.sqrt(1.0 - rho * rho) * z_h)
        health = torch.sigmoid(logit)
        u_dir = rng.uniform(key, zero, _LT_GRAD_DIR, (s, N_BLUEPRINTS))
        grad_dir = torch.where(u_dir < c.vanishing_fraction, -1.0, 1.0)

        z_i = rng.normal(key, zero, _LT_INTERACT, (s, s))
        off_diag = 1.0 - torch.eye(s, dtype=torch.float32, device=dev)
        interaction = c.interaction_std_pp * (z_i + z_i.transpose(1, 2)) * (off_diag / math.sqrt(2.0))
        return {
            "host_acc0": acc0,
            "host_acc_max": acc_max,
            "host_tau": tau,
            "benefit": benefit,
            "health": health,
            "grad_dir": grad_dir,
            "interaction": interaction,
        }

    def init_aux(self, n_envs: int, seed: int) -> dict[str, torch.Tensor]:
        """Fresh aux for ``n_envs`` envs: keys ``episode_seed(seed, env, 0)``, counters 0, latents drawn."""
        dev, s = self.device, self.n_slots
        f32 = dict(dtype=torch.float32, device=dev)
        aux = {
            "rng_key": torch.zeros(n_envs, dtype=torch.int64, device=dev),
            "rng_counter": torch.zeros(n_envs, dtype=torch.int64, device=dev),
            "host_acc0": torch.zeros(n_envs, **f32),
            "host_acc_max": torch.zeros(n_envs, **f32),
            "host_tau": torch.ones(n_envs, **f32),
            "benefit": torch.zeros(n_envs, s, N_BLUEPRINTS, **f32),
            "health": torch.zeros(n_envs, s, N_BLUEPRINTS, **f32),
            "grad_dir": torch.ones(n_envs, s, N_BLUEPRINTS, **f32),
            "interaction": torch.zeros(n_envs, s, s, **f32),
            "progress": torch.zeros(n_envs, s, **f32),
            "coadapt": torch.zeros(n_envs, s, **f32),
            "debt": torch.zeros(n_envs, **f32),
            "shock": torch.zeros(n_envs, **f32),
        }
        env = torch.arange(n_envs, dtype=torch.int64, device=dev)
        keys = rng.episode_seed(seed, env, torch.zeros_like(env))
        return self.reset_aux(aux, torch.ones(n_envs, dtype=torch.bool, device=dev), keys)

    def reset_aux(self, aux: dict, rows: torch.Tensor, episode_seed: torch.Tensor) -> dict:
        """Re-key the envs in ``rows`` ([E] bool) with ``episode_seed`` ([E] or scalar int64 keys,
        see :func:`esper_soa.core.rng.episode_seed`), re-draw their latents, zero their running state.

        Latents are drawn for every row and selected with ``torch.where``, so rows outside ``rows``
        stay bit-identical and the function stays branch- and sync-free.
        """
        key_in = torch.as_tensor(episode_seed, dtype=torch.int64, device=aux["rng_key"].device)
        key = torch.where(rows, key_in & rng.MASK32, aux["rng_key"])
        fresh = self.draw_latents(key)
        out = dict(aux)
        out["rng_key"] = key
        out["rng_counter"] = torch.where(rows, torch.zeros_like(aux["rng_counter"]), aux["rng_counter"])
        for k in LATENT_KEYS:
            m = rows.reshape(rows.shape + (1,) * (aux[k].dim() - 1))
            out[k] = torch.where(m, fresh[k], aux[k])
        for k in RUNNING_KEYS:
            m = rows.reshape(rows.shape + (1,) * (aux[k].dim() - 1))
            out[k] = torch.where(m, torch.zeros_like(aux[k]), aux[k])
        return out

    # ------------------------------------------------------------------ one epoch
    def advance(self, state: State, aux: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """One host epoch for every env (after the lifecycle tick and the epoch increment)."""
        metrics, new_aux, _ = self.advance_with_truth(state, aux)
        return metrics, new_aux

    def advance_with_truth(
        self, state: State, aux: dict
    ) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
        """:meth:`advance` plus the noiseless quantities behind the metrics (for tests and plots)."""
        c = self.scfg
        sl = state["slots"]
        stage, alpha, prev_alpha = sl["stage"], sl["alpha"], sl["previous_alpha"]
        algorithm = sl["algorithm"]
        dev = alpha.device
        e, s = alpha.shape
        key, counter = aux["rng_key"], aux["rng_counter"]
        t = state["epoch"].to(torch.float32)

        live = stage_in(stage, LIVE_STAGES)
        trains = stage_in(stage, _TRAINS)
        bp = sl["blueprint"].clamp(0, N_BLUEPRINTS - 1).unsqueeze(-1)  # [E, S, 1]
        size = torch.gather(self.size_scale.to(dev).expand(e, s, N_BLUEPRINTS), 2, bp).squeeze(-1)

        # seeds learn only while they train; a fossil keeps what it learnt; a cleared slot forgets
        progress = torch.where(trains, aux["progress"] + 1.0, torch.where(live, aux["progress"], 0.0))
        learned = 1.0 - torch.exp(-progress / c.seed_learn_tau)

        active = live & (alpha > 0.0)
        a = torch.where(active, alpha, 0.0)

        # what the fully blended seed would add, per blend algorithm
        b = torch.gather(aux["benefit"], 2, bp).squeeze(-1) * learned
        eff_mul = c.multiply_cap_pp * torch.tanh(b / c.multiply_cap_pp)
        eff_gate = c.gate_gain * torch.sigmoid(c.gate_sharpness * b) * b
        is_mul = algorithm == int(AlphaAlgorithm.MULTIPLY)
        is_gate = algorithm == int(AlphaAlgorithm.GATE)
        effect = torch.where(is_mul, eff_mul, torch.where(is_gate, eff_gate, b))

        # host co-adaptation: the host comes to rely on a blended seed; removing the seed (slot no
        # longer live) turns that reliance into a debt the host recovers from over time
        dep_target = a * size * c.coadapt_pp
        coadapt = torch.where(live, aux["coadapt"] + c.coadapt_rate * (dep_target - aux["coadapt"]), 0.0)
        released = torch.where(live, 0.0, aux["coadapt"]).sum(-1)
        debt = aux["debt"] * (1.0 - c.debt_recovery_rate) + released
        compensation = torch.minimum(coadapt, dep_target)

        # alpha shock: transient host dip from this step's alpha changes
        d_alpha = alpha - prev_alpha
        shock = aux["shock"] * c.shock_decay + c.shock_pp * (size * d_alpha * d_alpha).sum(-1)

        contribution = torch.where(active, a * effect + compensation, 0.0)
        q = a * learned
        pair = aux["interaction"] * q.unsqueeze(2) * q.unsqueeze(1)
        interaction_sum = pair.sum(-1)

        a0, a_max = aux["host_acc0"], aux["host_acc_max"]
        curve = a_max - (a_max - a0) * torch.exp(-t / aux["host_tau"])
        host_acc = curve - shock - debt - coadapt.sum(-1)
        acc_true = host_acc + contribution.sum(-1) + 0.5 * interaction_sum.sum(-1)

        # noisy evaluations: one validation noise per env shared by every evaluation of the epoch
        n_eval = c.eval_noise_std * rng.normal(key, counter, _ST_EVAL)
        n_cf = c.cf_noise_std * rng.normal(key, counter, _ST_CF, (s,))
        n_off = c.cf_noise_std * rng.normal(key, counter, _ST_CF_OFF)
        val_acc = (acc_true + n_eval).clamp(0.0, 100.0)
        without = (acc_true.unsqueeze(1) - contribution - interaction_sum + n_eval.unsqueeze(1) + n_cf)
        acc_without = torch.where(active, without.clamp(0.0, 100.0), val_acc.unsqueeze(1))
        any_active = active.any(-1)
        acc_off = torch.where(any_active, (host_acc + n_eval + n_off).clamp(0.0, 100.0), val_acc)
        # committed model: fossils stay on (with their pair terms), every other seed off; the same
        # measurement as val_acc / acc_off when every active seed is / none is a fossil
        fossil = active & (stage == int(Stage.FOSSILIZED))
        ff = fossil.to(torch.float32)
        committed_true = (
            host_acc + (contribution * ff).sum(-1) + 0.5 * (pair * ff.unsqueeze(2) * ff.unsqueeze(1)).sum((1, 2))
        )
        n_comm = c.cf_noise_std * rng.normal(key, counter, _ST_CF_COMMITTED)
        acc_committed = torch.where(
            (active & ~fossil).any(-1),
            torch.where(fossil.any(-1), (committed_true + n_eval + n_comm).clamp(0.0, 100.0), acc_off),
            val_acc,
        )

        # gradient telemetry for seeds that train
        host_gn = (
            c.host_grad_norm
            * (c.host_grad_floor + (1.0 - c.host_grad_floor) * torch.exp(-t / aux["host_tau"]))
            * torch.exp(c.host_grad_noise_std * rng.normal(key, counter, _ST_HOST_GRAD))
        )
        h_lat = torch.gather(aux["health"], 2, bp).squeeze(-1)
        g_dir = torch.gather(aux["grad_dir"], 2, bp).squeeze(-1)
        log_ratio = (
            math.log(c.grad_ratio_nominal)
            + g_dir * c.grad_dev_scale * (1.0 - h_lat)
            + c.grad_ratio_noise_std * rng.normal(key, counter, _ST_RATIO, (s,))
        )
        converge = c.grad_ratio_floor + (1.0 - c.grad_ratio_floor) * torch.exp(-progress / c.seed_learn_tau)
        ratio = torch.exp(log_ratio) * converge
        health = (h_lat + c.health_noise_std * rng.normal(key, counter, _ST_HEALTH, (s,))).clamp(0.0, 1.0)
        vanishing = trains & (ratio < c.vanish_ratio)
        exploding = trains & (ratio > c.explode_ratio)
        zero = torch.zeros_like(ratio)
        grad_norm = torch.where(trains, ratio * host_gn.unsqueeze(1), zero)
        health = torch.where(trains, health, zero)
        ratio = torch.where(trains, ratio, zero)

        # rare catastrophic divergence (probability 0 by default)
        p_div = c.diverge_prob + c.diverge_prob_per_exploding * (exploding & active).sum(-1).to(torch.float32)
        diverged = rng.uniform(key, counter, _ST_DIVERGE) < p_div
        val_acc = torch.where(diverged, c.diverged_acc, val_acc)
        acc_without = torch.where(diverged.unsqueeze(1), c.diverged_acc, acc_without)
        acc_off = torch.where(diverged, c.diverged_acc, acc_off)
        acc_committed = torch.where(diverged, c.diverged_acc, acc_committed)

        frac = (val_acc / 100.0).clamp(min=c.loss_min_acc_frac)
        val_loss = c.loss_floor - c.loss_log_scale * torch.log(frac)

        metrics = {
            "val_loss": val_loss,
            "val_acc": val_acc,
            "acc_all_seeds_off": acc_off,
            "acc_committed": acc_committed,
            "host_params": torch.full((e,), self.host_params, dtype=torch.float32, device=dev),
            "diverged": diverged,
            "acc_without_slot": acc_without,
            "interaction_sum": interaction_sum,
            "gradient_norm": grad_norm,
            "gradient_health": health,
            "gradient_ratio": ratio,
            "has_vanishing": vanishing,
            "has_exploding": exploding,
        }
        new_aux = dict(aux)
        new_aux.update(
            rng_counter=counter + 1, progress=progress, coadapt=coadapt, debt=debt, shock=shock
        )
        truth = {
            "host_curve": curve,  # undisturbed host learning curve
            "host_acc": host_acc,  # host with every seed's alpha at 0 (dips included)
            "committed": committed_true,  # noiseless acc_committed (fossils on, other seeds off)
            "acc_true": acc_true,  # noiseless val_acc
            "contribution": contribution,  # noiseless val_acc - acc_without_slot minus the slot's pair terms
            "effect": effect,  # per-slot effect of the fully blended seed (before alpha)
            "learned": learned,
        }
        return metrics, new_aux, truth

