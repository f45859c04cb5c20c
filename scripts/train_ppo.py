"""PPO on ``EsperEnv`` written the way a TorchRL user would: Collector -> GAE -> minibatch PPO.

    python scripts/train_ppo.py --n-envs 256 --max-epochs 30 --updates 30

The same pieces as ``esper_soa.training.train`` (which adds exact checkpoints, logs and a faster
engine-direct collection): the factored actor-critic, ``FactoredPPOLoss`` with TorchRL's
``GAE`` as its value estimator, a ``ReplayBuffer`` sampling minibatches without replacement.
"""

from __future__ import annotations

import argparse

import torch
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import Compose, RewardSum, TransformedEnv
from torchrl.objectives.utils import ValueEstimators

from esper_soa.agents.loss import FactoredPPOLoss
from esper_soa.agents.policy import ActorCritic, RewardNormalizer
from esper_soa.agents.torchrl_recipe import ppo_update
from esper_soa.cli import add_engine_args, engine_config_from_args
from esper_soa.env.esper_env import EsperEnv


def main(argv: list[str] | None = None) -> list[float]:
    """Train and return the mean episode return of each batch that finished episodes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, n_envs=256, max_epochs=30)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rollout-len", type=int, default=None, help="steps per env per batch (default: max epochs)")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--target-kl", type=float, default=0.015)
    args = parser.parse_args(argv)
    args.no_validate = True  # actions come from the masks; skip the per-step host sync
    cfg = engine_config_from_args(args)
    torch.manual_seed(args.seed)

    model = ActorCritic(cfg.n_slots, hidden=args.hidden)
    env = TransformedEnv(EsperEnv(cfg), Compose(RewardSum(), *model.env_transforms()))
    loss = FactoredPPOLoss(model)
    loss.make_value_estimator(ValueEstimators.GAE)  # gamma .995, lambda .98 (SPEC §14)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-5)
    params = list(model.parameters())
    reward_norm = RewardNormalizer(cfg.n_envs, loss.gamma)
    steps = args.rollout_len or cfg.max_epochs
    frames = cfg.n_envs * steps
    collector = Collector(
        env, model.policy, frames_per_batch=frames, total_frames=frames * args.updates,
        auto_register_policy_transforms=False,
    )
    buffer = ReplayBuffer(
        storage=LazyTensorStorage(frames), sampler=SamplerWithoutReplacement(), batch_size=frames // args.minibatches
    )
    returns = []
    for i, batch in enumerate(collector):  # [E, T]
        done = batch["next", "done"]
        finished = batch["next", "episode_reward"][done]
        if finished.numel():
            returns.append(finished.mean().item())
        # scale rewards by the running return std; the observed horizon makes truncation terminal
        batch["next", "reward"] = reward_norm(batch["next", "reward"].squeeze(-1), done.squeeze(-1)).unsqueeze(-1)
        batch["next", "terminated"] = done.clone()
        out = ppo_update(loss, optim, buffer, batch, params, args.ppo_epochs, kl_key="approx_kl", target_kl=args.target_kl)
        model.obs_norm.update(batch["observation"])  # after the update: sampling == loss stats
        ret = f"{returns[-1]:8.3f}" if finished.numel() else "       -"
        print(f"update {i + 1:4d}  return {ret}  kl {out['approx_kl'].item():.4f}  "
              f"entropy(op) {out['entropy'][0].item():.3f}", flush=True)
    collector.shutdown()
    return returns


if __name__ == "__main__":
    main()
