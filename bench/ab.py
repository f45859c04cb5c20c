"""A/B speed check against another git revision, in one process (this machine is shared and
noisy: only rounds interleaved in one process compare fairly).

``python -m bench.ab REV`` archives ``esper_soa/`` of ``REV`` into a temp dir as package
``esper_soa_ab``, builds the same workloads with both versions and times them in alternating
rounds: the compiled engine step (E envs, random valid actions) and one trainer update
(collect + PPO). Prints the medians and the ratio HEAD / REV (> 1: HEAD is faster).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import esper_soa

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, into: Path) -> str:
    """Import ``esper_soa`` as of ``rev`` under the name ``esper_soa_ab``; returns that name."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "esper_soa"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "esper_soa").rename(into / "esper_soa_ab")
    for path in (into / "esper_soa_ab").rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("esper_soa.", "esper_soa_ab.").replace("from esper_soa import", "from esper_soa_ab import"))
    root = into / "esper_soa_ab"
    spec = importlib.util.spec_from_file_location("esper_soa_ab", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["esper_soa_ab"] = package
    spec.loader.exec_module(package)
    return "esper_soa_ab"


def module(package: str, *candidates: str) -> ModuleType:
    """The first of ``candidates`` (module paths of the layered or the flat layout) that exists."""
    for name in candidates:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"{package}: none of {candidates}")


def engine_step(package: str, n_envs: int) -> Callable[[], None]:
    """A warmed compiled engine; the callable runs one step with one of 8 pre-drawn actions."""
    pkg = importlib.import_module(package)
    masks = module(package, "core.masks", "masks")
    engine = pkg.Engine(pkg.EngineConfig(n_envs=n_envs, n_slots=3, compile=True, validate_actions=False))
    engine.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        engine.step(masks.sample_masked_action(engine.masks, gen))
    actions = [masks.sample_masked_action(engine.masks, gen) for _ in range(8)]
    it = iter(range(10**9))
    return lambda: engine.step(actions[next(it) % 8])


def trainer_update(package: str, n_envs: int) -> Callable[[], None]:
    """The main job's trainer (``esper-soa train`` defaults: eager engine, actions validated) with
    ``n_envs`` envs; the callable runs one update (collect + GAE + PPO)."""
    pkg = importlib.import_module(package)
    train = module(package, "training.train", "train")
    cfg = train.TrainConfig(engine=pkg.EngineConfig(n_envs=n_envs), updates=10**6, progress=False)
    trainer = train.Trainer(cfg)
    trainer.step()  # warm-up
    return trainer.step


def interleaved(a: Callable[[], None], b: Callable[[], None], rounds: int, repeat: int) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b`` over ``rounds`` alternating rounds."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i, fn in ((0, a), (1, b)) if r % 2 == 0 else ((1, b), (0, a)):
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[i].append((time.perf_counter() - t0) / repeat)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision to compare HEAD's working tree with")
    parser.add_argument("--n-envs", type=int, default=4096, help="envs of the engine workload")
    parser.add_argument("--train-envs", type=int, default=128, help="envs of the trainer workload")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the library default (EngineConfig.threads = 1), robust to neighbours
    with tempfile.TemporaryDirectory() as tmp:
        other = load_revision(args.rev, Path(tmp))
        rows = [
            (f"engine step, compiled, E = {args.n_envs}", engine_step, args.n_envs, 20),
            (f"trainer update (collect + PPO), main-job defaults, E = {args.train_envs}", trainer_update, args.train_envs, 1),
        ]
        print(f"| workload | {args.rev} (ms) | HEAD (ms) | HEAD speed / {args.rev} |\n|---|---:|---:|---:|")
        for name, make, n, repeat in rows:
            old, new = interleaved(make(other, n), make(esper_soa.__name__, n), args.rounds, repeat)
            print(f"| {name} | {old * 1e3:.2f} | {new * 1e3:.2f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
