"""Drive torchrl.collectors.Collector over EsperEnv with the heuristic controller; print frames/s.

    python scripts/collect_heuristic.py --n-envs 1024 --max-epochs 150 --episodes 2 [--compile]
"""

from esper_soa.cli import collect_script

if __name__ == "__main__":
    collect_script("heuristic")
