"""Reward-integrity report: ``python -m bench.reward_integrity [n_envs]`` prints, for every reward
mode (SHAPED included, which fails: that is the measured farm exploit), every scripted
controller's return, discounted return and J_final with standard errors, and the gate verdict."""

from __future__ import annotations

import sys

from esper_soa.core.config import REWARD_MODES
from esper_soa.training.integrity import format_rows, integrity_table

if __name__ == "__main__":
    n_envs = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    for mode in REWARD_MODES:
        rows, verdict = integrity_table(mode, n_envs=n_envs)
        print(format_rows(mode, rows, verdict), flush=True)
