"""Reward-integrity gate (issue 13) on the scripted controllers of esper_soa.agents.adversaries."""

from __future__ import annotations

import pytest

from esper_soa.training.integrity import NEVER_FOSSILIZE, integrity_table


@pytest.mark.slow
def test_committed_farms_earn_less_than_heuristic_and_wait_shaped_farms_more() -> None:
    """COMMITTED removes the farm exploit SHAPED has: every never-fossilizing farm earns less
    than the heuristic and than doing nothing, while under SHAPED the farms out-earn both."""
    committed, verdict = integrity_table("committed", n_envs=32)
    ret = {r.name: float(r.ret.mean()) for r in committed}
    assert verdict["farms_lose"]
    assert all(ret[n] < ret["wait"] for n in NEVER_FOSSILIZE if n != "wait")
    shaped, shaped_verdict = integrity_table("shaped", n_envs=32)
    sret = {r.name: float(r.ret.mean()) for r in shaped}
    assert not shaped_verdict["passed"] and sret["farm_blending_largest"] > max(sret["heuristic"], sret["wait"])


@pytest.mark.slow
def test_committed_passes_the_full_gate() -> None:
    _, verdict = integrity_table("committed", n_envs=48)
    assert verdict["passed"], verdict
