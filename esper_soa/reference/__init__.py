"""The plain-Python, object-per-env oracle of the same SPEC, for differential tests and the
"before" benchmarks. It imports only the core (constants, field tables, reward constants,
heuristic config), never the engine or the agents.

Modules: :mod:`.state` (RefSlot, RefEnv), :mod:`.reward` (reward methods), :mod:`.lifecycle`
(ReferenceEngine), :mod:`.heuristic` (RefHeuristic).
"""

from esper_soa.reference.heuristic import RefHeuristic, ref_heuristic_actions
from esper_soa.reference.lifecycle import ReferenceEngine
from esper_soa.reference.reward import phi, timing_discount
from esper_soa.reference.state import RefEnv, RefSlot

__all__ = ["RefEnv", "RefHeuristic", "RefSlot", "ReferenceEngine", "phi", "ref_heuristic_actions", "timing_discount"]
