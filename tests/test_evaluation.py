"""Held-out evaluation (``esper_soa.training.evaluation``) and the ``esper-soa eval`` command: J_final and
committed accuracy from the state, per-episode outcomes read at the episode's end, the checkpoint
round trip, the surrogate-to-hosts path and the CLI's input errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from esper_soa.cli import main
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import Stage
from esper_soa.core.state import make_state
from esper_soa.training.evaluation import (
    COLUMNS,
    baseline_factory,
    committed_objective,
    compare,
    evaluate_controller,
    load_checkpoint_model,
)
from esper_soa.training.rollout import collect_baseline
from esper_soa.training.train import TrainConfig, train

CFG = EngineConfig(n_envs=8, max_epochs=60, validate_actions=False)


def test_committed_objective_counts_fossils_only() -> None:
    st = make_state(EngineConfig(n_envs=3, n_slots=3))
    st["acc_all_seeds_off"] = torch.tensor([80.0, 80.0, 70.0])
    st["acc_committed"] = torch.tensor([81.5, 80.0, 71.0])
    sl = st["slots"]
    sl["stage"][0] = torch.tensor([int(Stage.FOSSILIZED), int(Stage.BLENDING), int(Stage.FOSSILIZED)])
    sl["seed_params"][0] = torch.tensor([10_000.0, 99_999.0, 40_000.0])
    sl["stage"][1, 1] = int(Stage.HOLDING)  # live but not committed: its parameters count for nothing
    sl["seed_params"][1, 1] = 5_000.0
    out = committed_objective(st)
    torch.testing.assert_close(out["acc_committed"], torch.tensor([81.5, 80.0, 71.0]))
    torch.testing.assert_close(out["j_final"], torch.tensor([1.5 - 50_000 / 50_000, 0.0, 1.0]))
    torch.testing.assert_close(out["params_added"], torch.tensor([50_000.0, 0.0, 0.0]))
    torch.testing.assert_close(out["fossils"], torch.tensor([2.0, 0.0, 0.0]))


def test_outcomes_are_read_at_the_end_of_each_episode() -> None:
    """Returns agree with the collector-based evaluation of the same controller and seeds; the
    wait controller commits nothing; a heuristic run reports the J of its fossils."""
    seeds = [7]
    heu = evaluate_controller("heuristic", baseline_factory("heuristic"), CFG, seeds)
    assert heu.episodes == 8 and set(heu.outcomes) == set(COLUMNS)
    ref = collect_baseline("heuristic", replace(CFG, seed=seeds[0]), episodes=1)
    assert heu.mean("return") == pytest.approx(ref.mean_return, abs=1e-4)
    assert heu.mean("final_acc") == pytest.approx(ref.mean_final_accuracy, abs=1e-4)
    assert heu.mean("fossils") == pytest.approx(ref.fossils_per_episode)
    assert heu.outcomes["fossils"].sum() > 0  # 60 epochs: the heuristic fossilizes somewhere
    wait = evaluate_controller("wait", baseline_factory("wait"), CFG, seeds)
    assert (wait.outcomes["fossils"] == 0).all() and (wait.outcomes["j_final"] == 0).all()
    torch.testing.assert_close(wait.outcomes["acc_committed"], wait.outcomes["final_acc"])
    # COMMITTED pays nothing to a controller that never acts; the heuristic's returns vary
    assert (wait.outcomes["return"] == 0).all() and wait.sem("return") == 0
    assert heu.sem("return") > 0 and heu.summary()["j_final"]["sem"] >= 0


def test_checkpoint_round_trip_and_surrogate_to_hosts(tmp_path) -> None:
    """The checkpoint's policy acts exactly like the trained one, and runs on the real hosts."""
    engine = EngineConfig(n_envs=8, max_epochs=6, seed=3, validate_actions=False)
    result = train(TrainConfig(engine=engine, updates=1, rollout_len=6, hidden=32, progress=False,
                               log_dir=str(tmp_path)))
    model, cfg = load_checkpoint_model(tmp_path / "checkpoint.pt")
    assert cfg.hidden == 32 and cfg.engine.max_epochs == 6
    held_out = EngineConfig(n_envs=4, max_epochs=6, validate_actions=False)
    a = compare(result.model, held_out, [50], baselines=())
    b = compare(model, held_out, [50], baselines=())
    for ra, rb in zip(a, b):
        assert ra.name == rb.name
        for k in COLUMNS:
            torch.testing.assert_close(ra.outcomes[k], rb.outcomes[k])
    from esper_soa.dynamics.hosts import HostsConfig

    hosts = EngineConfig(n_envs=2, max_epochs=2, dynamics="hosts", validate_actions=False,
                         dynamics_config=HostsConfig(minibatch_size=8, minibatches_per_epoch=1, val_size=32))
    (row,) = compare(model, hosts, [50], baselines=())[:1]
    assert row.episodes == 2 and ((row.outcomes["final_acc"] > 0) & (row.outcomes["final_acc"] <= 100)).all()


def test_cli_eval_table_and_json(tmp_path, capsys) -> None:
    main(["train", "--n-envs", "8", "--max-epochs", "5", "--updates", "1", "--eval-envs", "2",
          "--eval-seeds", "9", "--log-dir", str(tmp_path)])
    capsys.readouterr()
    out_json = tmp_path / "table.json"
    main(["eval", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--n-envs", "3", "--seeds", "11,12",
          "--baselines", "wait", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "5-epoch episodes" in out  # inherited from the checkpoint
    saved = json.loads(out_json.read_text())
    assert list(saved["rows"]) == ["ppo (greedy)", "ppo (sampled)", "wait"]
    assert all(r["episodes"] == 6 for r in saved["rows"].values())
    assert saved["engine"]["max_epochs"] == 5 and saved["engine"]["dynamics"] == "surrogate"
    # train --log-dir also wrote the run's PNGs (matplotlib is a dev dependency) and TorchRL CSVs
    for png in ("learning_curves.png", "lifecycle.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    main(["plot", str(tmp_path), "--envs", "2", "--seed", "5"])
    assert "wrote" in capsys.readouterr().out


def test_trace_records_the_swimlane() -> None:
    """The trace is the episode step by step: stages from the reset on, the ops taken, the last
    row equal to the final state the outcomes were read from."""
    cfg = EngineConfig(n_envs=4, max_epochs=12, validate_actions=False)
    res = evaluate_controller("random", baseline_factory("random"), cfg, [3, 4], trace_envs=2)
    tr = res.trace
    assert tr["stage"].shape == (13, 2, 3) and tr["alpha"].shape == (13, 2, 3) and tr["op"].shape == (12, 2)
    assert (tr["stage"][0] == int(Stage.DORMANT)).all()
    assert (tr["op"] != 0).any()  # random germinates somewhere
    torch.testing.assert_close(tr["val_acc"][-1], res.outcomes["final_acc"][:2])
    wait = evaluate_controller("wait", baseline_factory("wait"), cfg, [3], trace_envs=1).trace
    assert (wait["op"] == 0).all() and (wait["stage"] == int(Stage.DORMANT)).all()


def test_plot_without_metrics_says_what_is_missing(tmp_path) -> None:
    from esper_soa.training.plots import plot_run

    with pytest.raises(FileNotFoundError, match="esper-soa train --log-dir RUN"):
        plot_run(tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--dataset", "cifar10"], "only with --dynamics hosts"),
        (["eval", "--dynamics", "hosts", "--dataset", "cifar10"], "expected --data-path"),
        (["eval", "--dynamics", "hosts", "--dataset", "cifar10", "--data-path", "/nonexistent"], "not a directory"),
        (["eval", "--dynamics", "hosts", "--data-path", "/tmp"], "only with --dataset cifar10"),
        (["eval", "--checkpoint", "/nonexistent/checkpoint.pt"], "not a file"),
        (["eval", "--baselines", "heuristic,oracle"], "got oracle"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cifar10_without_its_files_says_what_is_missing(tmp_path) -> None:
    from esper_soa.dynamics.hosts import HostsConfig

    cfg = EngineConfig(n_envs=1, dynamics="hosts", dynamics_config=HostsConfig(dataset="cifar10",
                                                                                 data_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="lacks data_batch_1"):
        evaluate_controller("wait", baseline_factory("wait"), cfg, [0])


def test_presets_select_the_backend_config() -> None:
    from argparse import Namespace

    from esper_soa.cli import dynamics_config_from_args
    from esper_soa.dynamics.hosts import HOSTS_PRESETS
    from esper_soa.dynamics.surrogate import SURROGATE_PRESETS

    def args(**kw) -> Namespace:
        return Namespace(**{"dynamics": "surrogate", "dataset": None, "data_path": None, "preset": None, **kw})

    assert dynamics_config_from_args(args()) is None  # the plain default surrogate
    assert dynamics_config_from_args(args(preset="calibrated")) == SURROGATE_PRESETS["calibrated"]
    hosts = dynamics_config_from_args(args(dynamics="hosts"))
    assert hosts == HOSTS_PRESETS["calibrated"] and hosts.channels == (2, 4, 8)
    assert dynamics_config_from_args(args(dynamics="hosts", preset="default")).channels == (8, 16, 32)
    # the calibrated surrogate is the refit: noisier hosts with a higher plateau and larger seed effects
    cal, default = SURROGATE_PRESETS["calibrated"], SURROGATE_PRESETS["default"]
    assert cal.eval_noise_std > default.eval_noise_std and cal.host_acc_max_max > default.host_acc_max_max
    assert cal.benefit_pp > default.benefit_pp
