"""esper_soa: batched, compiled seed-lifecycle environment engine (see README.md)."""

from esper_soa.config import EngineConfig
from esper_soa.engine import Engine
from esper_soa.env import EsperEnv

__all__ = ["Engine", "EngineConfig", "EsperEnv"]
