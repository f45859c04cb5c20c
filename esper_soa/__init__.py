"""esper_soa: batched, compiled seed-lifecycle environment engine (see README.md).

Layers, bottom to top (nothing imports upward): ``core`` (pure lifecycle tensors) ->
``dynamics`` (host backends) -> ``env`` (engine, TorchRL env) -> ``agents`` (policy, loss,
heuristic) -> ``training`` and ``cli``; ``reference`` is the per-env oracle beside them.
"""

from esper_soa import _moved
from esper_soa.core.config import EngineConfig
from esper_soa.env.engine import Engine
from esper_soa.env.esper_env import EsperEnv, make_batched_env

_moved.install()

__all__ = ["Engine", "EngineConfig", "EsperEnv", "make_batched_env"]
