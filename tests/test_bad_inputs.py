"""Every bad input gets a clear ValueError naming the argument, what was expected and what came
(issue 18): one table, one row per probe. A row is (id, call, regex the message must match)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.core.spec import HEAD_NAMES, unstack_action
from esper_soa.dynamics.surrogate import SurrogateConfig
from esper_soa.env.engine import Engine
from esper_soa.env.esper_env import EsperEnv
from esper_soa.training.train import TrainConfig, Trainer

E = 2


def _engine(**kw) -> Engine:
    eng = Engine(EngineConfig(n_envs=E, max_epochs=5, **kw))
    eng.reset()
    return eng


def _env() -> EsperEnv:
    env = EsperEnv(n_envs=E, max_epochs=5)
    env.reset()
    return env


def _action(**override) -> dict:
    action = {h: torch.zeros(E, dtype=torch.int64) for h in HEAD_NAMES}
    action.update(override)
    return action


def _without(head: str) -> dict:
    action = _action()
    del action[head]
    return action


def _env_step(td: TensorDict) -> None:
    _env().step(td)


CASES = [
    # EngineConfig
    ("n_envs=True", lambda: EngineConfig(n_envs=True), r"EngineConfig\.n_envs: expected an int >= 1, got True"),
    ("n_slots=True", lambda: EngineConfig(n_slots=True), r"EngineConfig\.n_slots: expected an int in \[1, 16\], got True"),
    ("n_envs=2.0", lambda: EngineConfig(n_envs=2.0), r"n_envs: expected an int >= 1, got 2\.0"),
    ("enabled_slots='yes'", lambda: EngineConfig(enabled_slots="yes"), r"enabled_slots: expected None or 3 bools.*got 'yes'"),
    ("enabled_slots ints", lambda: EngineConfig(enabled_slots=(1, 0, 1)), r"enabled_slots: expected None or 3 bools"),
    ("seed=nan", lambda: EngineConfig(seed=float("nan")), r"EngineConfig\.seed: expected an int in \[0, .*got nan"),
    ("seed='0'", lambda: EngineConfig(seed="0"), r"EngineConfig\.seed: expected an int.*got '0'"),
    ("seed=1.5", lambda: EngineConfig(seed=1.5), r"EngineConfig\.seed: expected an int.*got 1\.5"),
    ("seed=-1", lambda: EngineConfig(seed=-1), r"EngineConfig\.seed: expected an int in \[0, .*got -1"),
    ("seed=2**70", lambda: EngineConfig(seed=2**70), r"EngineConfig\.seed: expected an int in \[0, 9223372036854775807\]"),
    ("validate_actions='no'", lambda: EngineConfig(validate_actions="no"), r"validate_actions: expected a bool, got 'no'"),
    ("auto_forward_g1='x'", lambda: EngineConfig(auto_forward_g1="x"), r"auto_forward_g1: expected a bool, got 'x'"),
    ("compile='yes'", lambda: EngineConfig(compile="yes"), r"EngineConfig\.compile: expected a bool, got 'yes'"),
    ("compile=1", lambda: EngineConfig(compile=1), r"EngineConfig\.compile: expected a bool, got 1"),
    ("topology", lambda: EngineConfig(topology="mlp"), r"topology: expected one of \('cnn', 'transformer'\), got 'mlp'"),
    ("dynamics", lambda: EngineConfig(dynamics="real"), r"EngineConfig\.dynamics: expected one of \('surrogate', 'hosts'\)"),
    ("dynamics_config=42", lambda: EngineConfig(dynamics_config=42), r"dynamics_config: expected None, .*got 42"),
    ("dynamics_config={'x': 1}", lambda: Engine(EngineConfig(dynamics_config={"x": 1})),
     r"dynamics_config: expected fields of SurrogateConfig .*got \"unknown \['x'\]\""),
    ("dynamics_config wrong dataclass", lambda: Engine(EngineConfig(dynamics="hosts", dynamics_config=SurrogateConfig())),
     r"dynamics_config: expected None, a HostsConfig or a dict of its fields, got SurrogateConfig"),
    ("device=3", lambda: EngineConfig(device=3), r"EngineConfig\.device: expected a torch device or its name"),
    ("device='gpu'", lambda: EngineConfig(device="gpu"), r"EngineConfig\.device: expected a torch device, got 'gpu'"),
    # Engine entry points
    ("step(list)", lambda: _engine().step(_action(op=[0, 0])), r"action\['op'\]: expected a torch\.Tensor, got list"),
    ("step(numpy)", lambda: _engine().step(_action(slot=np.zeros(E, dtype=np.int64))),
     r"action\['slot'\]: expected a torch\.Tensor, got ndarray"),
    ("step missing head", lambda: _engine().step(_without("tempo")), r"action: missing head 'tempo'"),
    ("step extra head", lambda: _engine().step(_action(speed=torch.zeros(E))), r"action: unknown heads \['speed'\]"),
    ("step(float [E, 8])", lambda: _engine().step(torch.zeros(E, 8)), r"action: expected an integer dtype, got torch\.float32"),
    ("step([E, 7])", lambda: _engine().step(torch.zeros(E, 7, dtype=torch.int64)), r"action: expected shape \(2, 8\)"),
    ("step(list)", lambda: _engine().step([0] * 8), r"action: expected an \[E, 8\] tensor, or a dict .*got 'list'"),
    ("step float dtype", lambda: _engine().step(_action(op=torch.zeros(E))), r"action\['op'\]: expected an integer dtype"),
    ("reset(list)", lambda: _engine().reset([True, False]), r"reset rows: expected a bool tensor of shape \(2,\).*got list"),
    ("reset(int rows)", lambda: _engine().reset(torch.ones(E, dtype=torch.int64)), r"reset rows: .*got torch\.int64 \(2,\)"),
    ("set_seed(nan)", lambda: _engine().set_seed(float("nan")), r"Engine\.set_seed\(seed\): expected an int.*got nan"),
    ("set_seed(2**70)", lambda: _engine().set_seed(2**70), r"Engine\.set_seed\(seed\): expected an int in \[0, "),
    ("set_seed(-1)", lambda: _engine().set_seed(-1), r"Engine\.set_seed\(seed\): expected an int in \[0, .*got -1"),
    ("set_seed(True)", lambda: _engine().set_seed(True), r"Engine\.set_seed\(seed\): expected an int.*got True"),
    # EsperEnv
    ("env.step no action", lambda: _env_step(TensorDict({}, batch_size=[E])), r"EsperEnv\.step: expected an 'action' entry.*got no 'action' entry"),
    ("env.step flat action", lambda: _env_step(TensorDict({"action": torch.zeros(E, dtype=torch.int64)}, batch_size=[E])),
     r"EsperEnv\.step: expected an 'action' entry .*got Tensor \(2,\)"),
    ("env.step missing head", lambda: _env_step(TensorDict({"action": _without("tempo")}, batch_size=[E])),
     r"action: missing head 'tempo'"),
    ("env.step extra head", lambda: _env_step(TensorDict({"action": _action(extra=torch.zeros(E))}, batch_size=[E])),
     r"action: unknown heads \['extra'\]"),
    ("env.reset _reset [E, 2]", lambda: _env().reset(TensorDict({"_reset": torch.ones(E, 2, dtype=torch.bool)}, batch_size=[E])),
     r"'_reset' as a bool tensor of shape \(2,\) or \(2, 1\), got torch\.bool \(2, 2\)"),
    ("env.set_seed(-1)", lambda: _env().set_seed(-1), r"set_seed\(seed\): expected an int in \[0, .*got -1"),
    ("EsperEnv(unknown=1)", lambda: EsperEnv(n_env=2), r"EsperEnv: expected EngineConfig fields .*got unknown \['n_env'\]"),
    ("EsperEnv(cfg=dict)", lambda: EsperEnv({"n_envs": 2}), r"EsperEnv\(cfg\): expected an EngineConfig or None, got dict"),
    # TrainConfig
    ("checkpoint_every='2'", lambda: TrainConfig(checkpoint_every="2"), r"TrainConfig\.checkpoint_every: expected an int >= 0, got '2'"),
    ("lr=inf", lambda: TrainConfig(lr=float("inf")), r"TrainConfig\.lr: expected a finite number > 0\.0, got inf"),
    ("max_grad_norm=inf", lambda: TrainConfig(max_grad_norm=float("inf")), r"max_grad_norm: expected a finite number > 0\.0, got inf"),
    ("hidden=True", lambda: TrainConfig(hidden=True), r"TrainConfig\.hidden: expected an int >= 1, got True"),
    ("normalize_obs='no'", lambda: TrainConfig(normalize_obs="no"), r"TrainConfig\.normalize_obs: expected a bool, got 'no'"),
    ("log_dir=123", lambda: TrainConfig(log_dir=123), r"TrainConfig\.log_dir: expected None or a path .*got 123"),
    ("lmbda=-0.1", lambda: TrainConfig(lmbda=-0.1), r"TrainConfig\.lmbda: expected a finite number in \[0\.0, 1\.0\], got -0\.1"),
    ("gamma=nan", lambda: TrainConfig(gamma=float("nan")), r"TrainConfig\.gamma: expected a finite number in \(0\.0, 1\.0\]"),
    ("target_kl=inf", lambda: TrainConfig(target_kl=float("inf")), r"TrainConfig\.target_kl: expected a finite number > 0\.0"),
    ("entropy multiplier nan",
     lambda: TrainConfig(entropy_multipliers=tuple((h, float("nan")) for h in HEAD_NAMES)),
     r"TrainConfig\.entropy_multipliers\['op'\]: expected a finite number >= 0\.0, got nan"),
    ("engine=dict", lambda: TrainConfig(engine={}), r"TrainConfig\.engine: expected an EngineConfig, got \{\}"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


def test_cuda_on_a_cpu_only_build_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this torch build has CUDA")
    with pytest.raises(ValueError, match=r"EngineConfig\.device: expected a device this torch build can use .*got 'cuda'"):
        EngineConfig(device="cuda")


def test_numpy_scalars_and_tensordict_actions_are_accepted() -> None:
    cfg = EngineConfig(n_envs=E, max_epochs=5, seed=np.int64(3), compile=np.bool_(False))
    assert type(cfg.seed) is int and cfg.seed == 3 and cfg.compile is False
    eng = Engine(cfg)
    eng.reset()
    eng.set_seed(np.int32(4))
    assert eng.base_seed == 4
    out = eng.step(TensorDict(unstack_action(sample_masked_action(eng.masks)), batch_size=[E]))
    assert out["observation"].isfinite().all()
    assert TrainConfig(seed=np.int64(1), lr=np.float32(1e-3)).lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "content, pattern",
    [(b"", "an empty file"), (b"\x8e\x02random bytes, not a checkpoint", "an unreadable file")],
    ids=["empty", "random-bytes"],
)
def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, content: bytes, pattern: str) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    trainer = Trainer(TrainConfig(engine=EngineConfig(n_envs=4, max_epochs=4), updates=1, minibatches=1, progress=False))
    with pytest.raises(ValueError, match=f"resume: expected a checkpoint written by Trainer.save, got {pattern}"):
        trainer.load(path)
    torch.save({"something": "else"}, path)
    with pytest.raises(ValueError, match="checkpoint version: expected 1, got None"):
        trainer.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        trainer.load(tmp_path / "missing.pt")
