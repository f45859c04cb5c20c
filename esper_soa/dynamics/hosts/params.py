"""Parameter tables of the host, the sleeper seeds and the gates, and their flat ``[E, size]`` storage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esper_soa.core import rng
from esper_soa.core.spec import TOPOLOGY_BLUEPRINTS, Blueprint, blueprint_params
from esper_soa.dynamics.hosts.config import HostsConfig

CNN_BLUEPRINTS = tuple(Blueprint(b) for b in TOPOLOGY_BLUEPRINTS["cnn"])


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

