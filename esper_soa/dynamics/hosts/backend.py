"""``BatchedHostsDynamics``: E real CNN hosts trained in lock-step (see :mod:`esper_soa.dynamics.hosts`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esper_soa.core import rng
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    LIVE_STAGES,
    AlphaAlgorithm,
    Blueprint,
    Stage,
    blueprint_params,
    stage_in,
)
from esper_soa.core.state import State
from esper_soa.core.validation import backend_config
from esper_soa.dynamics.data import HostDataset, load_dataset
from esper_soa.dynamics.hosts.config import HostsConfig
from esper_soa.dynamics.hosts.ops import (
    blend_delta,
    gn_relu_pool,
    grad_summary,
    seed_branch_grouped,
    sgd_step,
)
from esper_soa.dynamics.hosts.params import (
    CNN_BLUEPRINTS,
    FlatModule,
    gate_param_specs,
    host_param_specs,
    seed_param_specs,
)

# Slots sit after the host's conv blocks (one per block, so at most len(HostsConfig.channels));
# the counterfactual pass evaluates every subset of an env's active slots, 2^S variants, so the
# backend caps S at 3 (8 variants) well below the engine-wide ``core.config.MAX_SLOTS``.
MAX_HOST_SLOTS = 3

_SEEDED = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)  # seed runs in forward
TRAINED_STAGES = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)  # seed parameters get updates

_ST_DATA = 1  # per-epoch data order, counter = aux["rng_counter"]
_ST_HOST = 1000  # + parameter index: host init at reset (counter 0)
_ST_SEED = 2000  # + 100 * slot + 10 * blueprint index (gate: 90) + parameter index: seed init at
# germination (counter = germination epoch)


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
        if cfg.n_slots > MAX_HOST_SLOTS or cfg.n_slots > len(hcfg.channels):
            raise ValueError(
                f"BatchedHostsDynamics: n_slots must be <= {min(MAX_HOST_SLOTS, len(hcfg.channels))} (one slot after "
                f"each of the host's {len(hcfg.channels)} conv blocks, at most {MAX_HOST_SLOTS}), got {cfg.n_slots}"
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
            trains=stage_in(stage, TRAINED_STAGES), seeded=stage_in(stage, _SEEDED), active=blended & (alpha > 0.0),
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
            f = seed_branch_grouped(g.bp, ps, x.reshape(bsz, m * c, hh, ww), m, self.hcfg.norm_groups)
            f = f.view(bsz, m, c, hh, ww)
            gate = None
            if g.use_gate:
                gp = self.modules[f"gate{g.slot}"].views(p[f"gate{g.slot}"].index_select(0, g.rows))
                gate = torch.sigmoid((x.mean((3, 4)) * gp["w"]).sum(-1) + gp["b"]).view(bsz, m, 1, 1, 1)
            d = blend_delta(x, f, g.algorithm.view(1, m, 1, 1, 1), gate, g.algorithms)
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
        trains = stage_in(sl["stage"], TRAINED_STAGES)
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
                p[k], p["mom." + k] = sgd_step(p[k], grads[k], p["mom." + k], lr, mom, wd, masks[k])
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
        trains = stage_in(sl["stage"], TRAINED_STAGES)
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

