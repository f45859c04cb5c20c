"""PPO on ``EsperEnv`` with TorchRL's stock pieces only: ProbabilisticActor + ClipPPOLoss + GAE.

    python scripts/train_torchrl_recipe.py --n-envs 64 --max-epochs 30 --updates 20

The actor and loss come from :mod:`esper_soa.agents.torchrl_recipe` (the slot head conditioned on the
sampled op, so every action is valid: the env keeps ``validate_actions`` on). Compare with
``scripts/train_ppo.py`` / ``esper-soa train``, which use the project's ``FactoredPPOLoss``.
"""

from __future__ import annotations

import argparse

import torch
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import RewardSum, TransformedEnv

from esper_soa.agents.torchrl_recipe import make_actor_critic, make_ppo_loss, ppo_update
from esper_soa.cli import add_engine_args, engine_config_from_args
from esper_soa.env.esper_env import EsperEnv


def main(argv: list[str] | None = None) -> list[float]:
    """Train and return the mean episode return of each batch that finished episodes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, n_envs=64, max_epochs=30)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args(argv)
    cfg = engine_config_from_args(args)
    torch.manual_seed(args.seed)

    env = TransformedEnv(EsperEnv(cfg), RewardSum())
    actor, critic = make_actor_critic(env.base_env, hidden=args.hidden)
    loss = make_ppo_loss(actor, critic)
    optim = torch.optim.Adam(loss.parameters(), lr=args.lr)
    params = list(loss.parameters())
    frames = cfg.n_envs * cfg.max_epochs  # whole episodes per batch
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=frames * args.updates)
    buffer = ReplayBuffer(
        storage=LazyTensorStorage(frames), sampler=SamplerWithoutReplacement(), batch_size=frames // args.minibatches
    )
    returns = []
    for i, batch in enumerate(collector):  # [E, T]
        done = batch["next", "done"]
        returns.append(batch["next", "episode_reward"][done].mean().item())
        out = ppo_update(loss, optim, buffer, batch, params, args.ppo_epochs)
        ok = batch["next", "success"].float().mean().item()
        print(f"update {i + 1:4d}  return {returns[-1]:8.3f}  kl {out['kl_approx'].item():.4f}  "
              f"entropy {out['entropy'].item():.3f}  ops succeeded {ok:.1%}", flush=True)
    collector.shutdown()
    return returns


if __name__ == "__main__":
    main()
