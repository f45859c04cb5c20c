"""The engine that compiles and drives the core step, and the TorchRL ``EnvBase`` around it."""

from esper_soa.env.engine import Engine
from esper_soa.env.esper_env import (
    EsperActionMask,
    EsperActionSpec,
    EsperEnv,
    LiveMaskCategorical,
    make_batched_env,
)

__all__ = ["Engine", "EsperActionMask", "EsperActionSpec", "EsperEnv", "LiveMaskCategorical", "make_batched_env"]
