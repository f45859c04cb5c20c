"""TorchRL environment: ``EsperEnv(EnvBase)`` with ``batch_size=[n_envs]`` over the batched engine.

The env is a thin shell: it moves actions from the TensorDict into :class:`Engine.step`,
returns the engine's outputs under TorchRL's keys, and keeps the masks on the action specs up
to date. Partial resets go through the ``"_reset"`` key and ``torch.where`` inside the engine;
``maybe_reset`` resets the done rows without asking the device whether any row is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv, Transform, TransformedEnv

from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import head_views, sample_masked_action
from esper_soa.core.spec import (
    DONE_KEYS,
    EMPTY_BLUEPRINT_INDEX,
    HEAD_NAMES,
    MASK_KEYS,
    OUTCOME_KEYS,
    Blueprint,
    Op,
    head_sizes,
    unstack_action,
)
from esper_soa.dynamics.base import DynamicsBackend
from esper_soa.env.engine import Engine

LOG_PROB_SUFFIXES = ("_log_prob", "_entropy")
# engine-output entries EsperEnv passes through as they are (plus executed_op/success)
OUTPUT_KEYS = ("observation", "blueprint_index", *OUTCOME_KEYS, "masks", "reward", *DONE_KEYS)


def torchrl_output(out: TensorDictBase) -> TensorDict:
    """EsperEnv's TorchRL keys for an ``Engine.step``/``reset`` output, without copies: what both
    ``EsperEnv`` and the trainer's engine-direct collection hand on. ``executed_op``/``success``
    say what the step actually did (an invalid action runs as WAIT with ``success`` False when
    ``validate_actions`` is off); a reset reports WAIT, succeeded. ``masks`` is the engine's
    ``{head, slot_by_op}`` as it comes."""
    batch_size, device = out.batch_size, out.device
    executed = out.get("executed_op", None)
    if executed is None:
        executed = torch.zeros(batch_size, dtype=torch.int64, device=device)
        success = torch.ones(batch_size, dtype=torch.bool, device=device)
    else:
        success = out.get("success") > 0
    return TensorDict(
        {
            **{k: out.get(k) for k in OUTPUT_KEYS},
            "executed_op": executed,
            "success": success,
        },
        batch_size=batch_size,
        device=device,
    )


def action_td(action: torch.Tensor, batch_size: Sequence[int], device: torch.device) -> TensorDict:
    """``{"action": {head: [...]}}`` from an ``[..., 8]`` action: column views, no copies."""
    return TensorDict({"action": unstack_action(action)}, batch_size=batch_size, device=device)


class LiveMaskCategorical(Categorical):
    """A ``Categorical`` head whose mask is read from the engine whenever it is used.

    The masks change every step; reading them live keeps the base env's spec and every clone a
    ``TransformedEnv`` makes of it up to date, without copies or per-step spec writes. An
    expanded copy (the spec a ``SerialEnv``/``ParallelEnv`` builds from its workers' metadata)
    cannot see the workers' engines, so it drops the live mask; :class:`EsperActionMask` then
    keeps a static one up to date from the batched env's outputs.
    """

    def __init__(self, n: int, shape=None, device=None, dtype=torch.int64, mask=None, *, mask_fn=None) -> None:
        self._mask_fn = mask_fn
        self._static_mask = None
        super().__init__(n, shape=shape, device=device, dtype=dtype, mask=mask)

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask_fn() if self._mask_fn is not None else self._static_mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._static_mask = value

    def clone(self) -> Categorical:
        if self._mask_fn is None:
            return super().clone()
        return type(self)(self.space.n, self.shape, self.device, self.dtype, mask_fn=self._mask_fn)

    def expand(self, *shape) -> Categorical:
        shape = torch.Size(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape)
        if self._mask_fn is None or shape == self.shape:
            return super().expand(shape) if shape != self.shape else self.clone()
        return type(self)(self.space.n, shape, self.device, self.dtype)  # another batch: no live mask


class EsperActionSpec(Composite):
    """The eight action heads; ``rand()`` samples op first, then a slot that op allows (SPEC §9).

    The env's ``masks`` (``head`` ``[*shape, 8, K]``, ``slot_by_op`` ``[*shape, 6, S]``) are read
    live from the engine (``masks_fn``) or set statically (``set_masks``, used by
    :class:`EsperActionMask` on batched envs); the leaves' masks are views of ``head``.
    """

    masks_fn = None
    masks = None

    def _copy_masks(self, out: Composite) -> EsperActionSpec:
        if not isinstance(out, EsperActionSpec):
            out = EsperActionSpec(dict(out.items()), shape=out.shape, device=out.device)
        if out.shape == self.shape:
            out.masks_fn, out.masks = self.masks_fn, self.masks
        return out

    def clone(self) -> EsperActionSpec:
        return self._copy_masks(super().clone())

    def to(self, dest) -> EsperActionSpec:
        return self._copy_masks(super().to(dest))

    def expand(self, *shape) -> EsperActionSpec:
        return self._copy_masks(super().expand(*shape))

    def set_masks(self, masks: TensorDictBase | dict[str, torch.Tensor]) -> None:
        """Static masks (the env's ``masks`` entry): every head's leaf gets its view of ``head``."""
        for name, view in head_views(masks).items():
            self[name].update_mask(view)
        self.masks = {k: masks[k] for k in MASK_KEYS}

    def current_masks(self) -> dict[str, torch.Tensor]:
        """The masks ``rand`` samples under (the env's ``masks`` entry)."""
        masks = self.masks_fn() if self.masks_fn is not None else self.masks
        if masks is None:
            raise RuntimeError(
                "EsperActionSpec.rand: expected live or set masks, got none (a batched env's spec is a copy "
                "that cannot see its workers' engines: wrap it as TransformedEnv(batched_env, EsperActionMask()))"
            )
        return masks

    def rand(self, shape: torch.Size | None = None) -> TensorDictBase:
        shape = torch.Size(shape or ())
        masks = {k: m.expand(*shape, *m.shape) for k, m in self.current_masks().items()}
        return TensorDict(unstack_action(sample_masked_action(masks)), [*shape, *self.shape], device=self.device)


class EsperActionMask(Transform):
    """Keeps a (batched) env's action spec masks equal to the ``masks`` it just returned.

    TorchRL's ``ActionMask`` for the Esper action: needed on ``SerialEnv``/``ParallelEnv`` of
    :class:`EsperEnv`, whose specs are copies made from worker metadata (the base env's own spec
    reads the engine live). Then ``rand_action``, ``check_env_specs``, ``Collector(policy=None)``
    and ``RandomPolicy`` draw valid actions, op first.
    """

    def __init__(self) -> None:
        super().__init__(in_keys=[], out_keys=[])

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        spec = self.container.full_action_spec["action"]
        spec.set_masks(next_tensordict.get("masks"))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._call(tensordict_reset)


def make_batched_env(
    num_workers: int, make_env: Callable[[], EsperEnv], parallel: bool = False, **kwargs: Any
) -> TransformedEnv:
    """``SerialEnv`` (or ``ParallelEnv``) of ``num_workers`` :class:`EsperEnv` with the action masks
    kept on its spec (:class:`EsperActionMask`); ``kwargs`` go to the batched env."""
    batched = (ParallelEnv if parallel else SerialEnv)(num_workers, make_env, **kwargs)
    return TransformedEnv(batched, EsperActionMask())


class EsperEnv(EnvBase):
    """Batched Esper seed-lifecycle environment (one RL step = one host epoch).

    Keys: ``observation`` [E, 23+31S] float32 (a feature-major view, see features.py),
    ``blueprint_index`` [E, S] int64, ``masks`` (one bool tensor per head, ``slot_by_op``
    [E, 6, S]), ``action`` (one int64 head each, SPEC §2 order), ``reward`` [E, 1],
    ``done``/``terminated``/``truncated`` [E, 1].

    Args:
        cfg: engine configuration (n_envs, slots, topology, device, seed, compile, ...).
        dynamics: optional backend instance overriding ``cfg.dynamics``.
        **overrides: fields of :class:`EngineConfig` to replace in ``cfg``.

    Example::

        from torchrl.envs.utils import check_env_specs
        from esper_soa import EsperEnv, EngineConfig

        env = EsperEnv(EngineConfig(n_envs=256, seed=0))
        check_env_specs(env)
        td = env.rollout(150, auto_reset=True)  # [256, 150], random mask-respecting actions
        td["next", "reward"].sum(1).mean(), td["next", "committed_gain"][:, -1].mean()  # return, J
    """

    def __init__(
        self, cfg: EngineConfig | None = None, dynamics: DynamicsBackend | None = None, **overrides
    ) -> None:
        if cfg is not None and not isinstance(cfg, EngineConfig):
            raise ValueError(f"EsperEnv(cfg): expected an EngineConfig or None, got {type(cfg).__name__}")
        unknown = sorted(set(overrides) - {f.name for f in fields(EngineConfig)})
        if unknown:
            raise ValueError(f"EsperEnv: expected EngineConfig fields as keyword overrides, got unknown {unknown}")
        cfg = replace(cfg or EngineConfig(), **overrides)
        device = cfg.torch_device
        super().__init__(device=device, batch_size=torch.Size([cfg.n_envs]))
        self.cfg = cfg
        self.engine = Engine(cfg, dynamics)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(cfg.seed)
        self._make_specs()

    # --- specs ----------------------------------------------------------------------------
    def _make_specs(self) -> None:
        e, s, dev = self.cfg.n_envs, self.cfg.n_slots, self.device
        sizes = head_sizes(s)
        masks = self.engine.masks
        heads = EsperActionSpec(
            {
                name: LiveMaskCategorical(
                    sizes[name], shape=(e,), dtype=torch.int64, device=dev, mask_fn=self._head_mask(name)
                )
                for name in HEAD_NAMES
            },
            shape=(e,),
            device=dev,
        )
        heads.masks_fn = lambda: self.engine.masks
        self.action_spec = Composite(action=heads, shape=(e,), device=dev)
        self.observation_spec = Composite(
            observation=Unbounded(shape=(e, self.cfg.obs_dim), dtype=torch.float32, device=dev),
            blueprint_index=Bounded(EMPTY_BLUEPRINT_INDEX, len(Blueprint) - 1, shape=(e, s), dtype=torch.int64, device=dev),
            # the outcome of the state just reached, for evaluation (policies do not read them):
            # J in pp, the committed accuracy (non-fossil seeds off), val_acc, number of fossils
            **{k: Unbounded(shape=(e,), dtype=torch.float32, device=dev) for k in OUTCOME_KEYS},
            executed_op=Categorical(len(Op), shape=(e,), dtype=torch.int64, device=dev),
            success=Categorical(2, shape=(e,), dtype=torch.bool, device=dev),
            masks=Composite(
                {k: Binary(n=masks[k].shape[-1], shape=masks[k].shape, dtype=torch.bool, device=dev) for k in MASK_KEYS},
                shape=(e,),
                device=dev,
            ),
            shape=(e,),
            device=dev,
        )
        self.reward_spec = Unbounded(shape=(e, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            {k: Categorical(2, shape=(e, 1), dtype=torch.bool, device=dev) for k in DONE_KEYS},
            shape=(e,),
            device=dev,
        )

    def _head_mask(self, name: str):
        """The live mask of one action head: a zero-copy view of the engine's ``masks["head"]``
        (the slot head's is the union over ops; its op-conditioned rows are ``slot_by_op``)."""
        return lambda: head_views(self.engine.masks)[name]

    # --- EnvBase hooks --------------------------------------------------------------------

    def _reset_rows(self, tensordict: TensorDictBase | None) -> torch.Tensor | None:
        """The ``"_reset"`` entry as ``[E]`` bool (``[E]`` or ``[E, 1]`` accepted), or None."""
        if tensordict is None or "_reset" not in tensordict.keys():
            return None
        rows = tensordict.get("_reset")
        e = self.cfg.n_envs
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or tuple(rows.shape) not in ((e,), (e, 1)):
            got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(
                f"EsperEnv reset: expected '_reset' as a bool tensor of shape ({e},) or ({e}, 1), got {got}"
            )
        return rows.reshape(e)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        td = torchrl_output(self.engine.reset(self._reset_rows(tensordict)))
        del td["reward"]
        return td

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action", None)
        if not isinstance(action, TensorDictBase):
            shape = tuple(getattr(action, "shape", ()))
            got = "no 'action' entry" if action is None else f"{type(action).__name__} {shape}"
            raise ValueError(
                f"EsperEnv.step: expected an 'action' entry holding one tensor per head {HEAD_NAMES} "
                f"(('action', 'op'), ('action', 'slot'), ...), got {got}"
            )
        # TorchRL's composite distributions write per-head ("action", "<head>_log_prob") entries
        # beside the heads: those are not action heads; any other extra key is refused
        heads = {k: v for k, v in action.items() if not (isinstance(k, str) and k.endswith(LOG_PROB_SUFFIXES))}
        return torchrl_output(self.engine.step(heads))

    def _set_seed(self, seed: int | None) -> None:
        seed = 0 if seed is None else int(seed)
        self.engine.set_seed(seed)
        self._generator.manual_seed(seed)

    # --- batched conveniences -------------------------------------------------------------
    def maybe_reset(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Reset the done rows in place of TorchRL's ``any()`` check: no host sync per step."""
        rows = tensordict.get("done").reshape(self.cfg.n_envs)
        fresh = torchrl_output(self.engine.reset(rows))
        del fresh["reward"]
        tensordict.update(fresh)
        return tensordict

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """A random action valid in the env's current state (the masks on the action specs),
        the slot drawn after the op (SPEC §9)."""
        td = action_td(sample_masked_action(self.engine.masks, self._generator), self.batch_size, self.device)
        if tensordict is None:
            return td
        tensordict.update(td)
        return tensordict
