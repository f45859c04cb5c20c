"""TorchRL environment: ``EsperEnv(EnvBase)`` with ``batch_size=[n_envs]`` over the batched engine.

The env is a thin shell: it moves actions from the TensorDict into :class:`Engine.step`,
returns the engine's outputs under TorchRL's keys, and keeps the masks on the action specs up
to date. Partial resets go through the ``"_reset"`` key and ``torch.where`` inside the engine;
``maybe_reset`` resets the done rows without asking the device whether any row is done.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from esper_soa.config import EngineConfig
from esper_soa.dynamics.base import DynamicsBackend
from esper_soa.engine import Engine
from esper_soa.masks import sample_masked_action
from esper_soa.spec import EMPTY_BLUEPRINT_INDEX, HEAD_NAMES, Blueprint, head_sizes

MASK_KEYS = ("op", "slot_by_op", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")
DONE_KEYS = ("done", "terminated", "truncated")


class LiveMaskCategorical(Categorical):
    """A ``Categorical`` head whose mask is read from the engine whenever it is used.

    The masks change every step; reading them live keeps the base env's spec and every clone a
    ``TransformedEnv`` makes of it up to date, without copies or per-step spec writes.
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
    """

    def __init__(
        self, cfg: EngineConfig | None = None, dynamics: DynamicsBackend | None = None, **overrides
    ) -> None:
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
        self.action_spec = Composite(
            action=Composite(
                {
                    name: LiveMaskCategorical(
                        sizes[name], shape=(e,), dtype=torch.int64, device=dev, mask_fn=self._head_mask(name)
                    )
                    for name in HEAD_NAMES
                },
                shape=(e,),
                device=dev,
            ),
            shape=(e,),
            device=dev,
        )
        self.observation_spec = Composite(
            observation=Unbounded(shape=(e, self.cfg.obs_dim), dtype=torch.float32, device=dev),
            blueprint_index=Bounded(EMPTY_BLUEPRINT_INDEX, len(Blueprint) - 1, shape=(e, s), dtype=torch.int64, device=dev),
            # the real objective, for evaluation (policies do not read them): J in pp and the
            # committed accuracy (non-fossil seeds off) of the state just reached
            committed_gain=Unbounded(shape=(e,), dtype=torch.float32, device=dev),
            acc_committed=Unbounded(shape=(e,), dtype=torch.float32, device=dev),
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
        """The live mask of one action head; the slot head gets the union over ops (its
        op-conditioned rows are ``masks["slot_by_op"]``)."""
        if name == "slot":
            return lambda: self.engine.masks["slot_by_op"].any(1)
        return lambda: self.engine.masks[name]

    # --- EnvBase hooks --------------------------------------------------------------------
    def _output(self, out: TensorDict) -> TensorDict:
        td = TensorDict(
            {
                "observation": out["observation"],
                "blueprint_index": out["blueprint_index"],
                "committed_gain": out["committed_gain"],
                "acc_committed": out["acc_committed"],
                "masks": TensorDict({k: out[f"mask_{k}"] for k in MASK_KEYS}, batch_size=self.batch_size),
                "reward": out["reward"],
                **{k: out[k] for k in DONE_KEYS},
            },
            batch_size=self.batch_size,
            device=self.device,
        )
        return td

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        rows = None
        if tensordict is not None and "_reset" in tensordict.keys():
            rows = tensordict.get("_reset").reshape(self.cfg.n_envs)
        td = self._output(self.engine.reset(rows))
        del td["reward"]
        return td

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action")
        return self._output(self.engine.step({k: action.get(k) for k in HEAD_NAMES}))

    def _set_seed(self, seed: int | None) -> None:
        seed = 0 if seed is None else int(seed)
        self.engine.set_seed(seed)
        self._generator.manual_seed(seed)

    # --- batched conveniences -------------------------------------------------------------
    def maybe_reset(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Reset the done rows in place of TorchRL's ``any()`` check: no host sync per step."""
        rows = tensordict.get("done").reshape(self.cfg.n_envs)
        fresh = self._output(self.engine.reset(rows))
        del fresh["reward"]
        tensordict.update(fresh)
        return tensordict

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """A random action valid in the env's current state (the masks on the action specs),
        the slot drawn after the op (SPEC §9)."""
        action = sample_masked_action(self.engine.masks, self._generator)
        td = TensorDict({"action": action}, batch_size=self.batch_size, device=self.device)
        if tensordict is None:
            return td
        tensordict.update(td)
        return tensordict
