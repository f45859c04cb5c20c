"""Old flat module paths (``esper_soa.engine``, ``esper_soa.spec``, ...) from before the layered
layout (0.x, 2026-11-30): importing one gives the module at its new path and a
``DeprecationWarning``, so code written against the flat layout keeps working."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "spec": "core.spec", "config": "core.config", "validation": "core.validation",
    "state": "core.state", "rng": "core.rng", "alpha": "core.alpha",
    "lifecycle": "core.lifecycle", "masks": "core.masks", "features": "core.features",
    "reward": "core.reward", "transition": "core.step", "engine": "env.engine",
    "distribution": "agents.distribution", "policy": "agents.policy", "loss": "agents.loss",
    "heuristic": "agents.heuristic", "baselines": "agents.baselines",
    "adversaries": "agents.adversaries", "torchrl_recipe": "agents.torchrl_recipe",
    "train": "training.train", "evaluation": "training.evaluation",
    "integrity": "training.integrity", "calibration": "training.calibration",
    "plots": "training.plots",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``esper_soa.<old>`` to a module object that forwards to ``esper_soa.<new>``."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        if package != __package__ or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = f"{__package__}.{MOVED[module.__name__.rpartition('.')[2]]}"
        warnings.warn(f"{module.__name__} moved to {new}", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__getattr__ = lambda name: getattr(target, name)  # type: ignore[method-assign]


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
