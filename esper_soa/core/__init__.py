"""The pure lifecycle core: spec tables, config, state, alpha, lifecycle ops and gates, masks,
observation, reward and the step functions. Plain tensor functions that ``torch.compile``
accepts; nothing here knows about TorchRL, policies or training."""
