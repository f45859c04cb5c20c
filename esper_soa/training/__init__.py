"""PPO training, rollouts, held-out evaluation, reward-integrity checks, surrogate calibration
and plots: everything that drives envs and agents."""
