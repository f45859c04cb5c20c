"""Controllers and their learning pieces: the factored masked distribution, the actor-critic,
the PPO loss, the SPEC §14a heuristic, scripted/random baselines and reward adversaries."""
