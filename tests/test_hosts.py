"""Tests of the batched-hosts backend (SPEC §11 "batched hosts"), CPU, small sizes.

The central check is equivalence: one batched ``advance`` must equal training each env's host
alone with the readable per-env reference (``train_single_host`` / ``evaluate_single_host``) on the
same data order, for envs in every lifecycle stage and blend algorithm. The rest pins down the
stage semantics (gradient isolation of TRAINING seeds, frozen-but-blended fossils, counterfactuals
equal to the host without the seed), determinism, partial resets and the dataset loaders.
Torch runs one intra-op thread here: on a CPU shared with other jobs, OpenMP barriers stall
whenever a core is taken, which made this file 10x slower; the results do not depend on it.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from esper_soa.core import rng
from esper_soa.core import step as core_step
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import METRIC_FIELDS, Stage
from esper_soa.core.spec import AlphaAlgorithm as A
from esper_soa.core.spec import Blueprint as BP
from esper_soa.core.state import as_dict, make_state
from esper_soa.dynamics.data import (
    CIFAR_TEST_FILE,
    CIFAR_TRAIN_FILES,
    load_cifar10,
    load_dataset,
)
from esper_soa.dynamics.hosts import BatchedHostsDynamics, HostsConfig
from esper_soa.env.engine import Engine
from tests.helpers import random_action
from tests.hosts_reference import (
    evaluate_single_host,
    single_host_forward,
    slot_setups,
    train_single_host,
)

S = 3
HCFG = HostsConfig(minibatch_size=16, minibatches_per_epoch=3, val_size=64, val_chunk=200, grad_stride=2)


pytestmark = pytest.mark.usefixtures("one_thread")


# (stage, blueprint, algorithm, alpha) per slot, one row per env: every stage, blueprint and
# algorithm appears, several envs blend two or three seeds at once (interactions).
MIXED = [
    [(Stage.TRAINING, BP.CONV_LIGHT, A.ADD, 0.0), (Stage.BLENDING, BP.ATTENTION, A.MULTIPLY, 0.4), None],
    [(Stage.BLENDING, BP.NORM, A.GATE, 0.7), (Stage.HOLDING, BP.DEPTHWISE, A.ADD, 1.0),
     (Stage.FOSSILIZED, BP.BOTTLENECK, A.MULTIPLY, 1.0)],
    [(Stage.FOSSILIZED, BP.CONV_SMALL, A.ADD, 1.0), (Stage.TRAINING, BP.CONV_HEAVY, A.GATE, 0.0),
     (Stage.BLENDING, BP.CONV_LIGHT, A.GATE, 0.3)],
    [(Stage.GERMINATED, BP.ATTENTION, A.ADD, 0.0), (Stage.EMBARGOED, BP.NORM, A.ADD, 0.0),
     (Stage.HOLDING, BP.CONV_HEAVY, A.MULTIPLY, 1.0)],
    [None, None, None],
    [(Stage.HOLDING, BP.BOTTLENECK, A.GATE, 1.0), (Stage.BLENDING, BP.CONV_SMALL, A.ADD, 0.5),
     (Stage.TRAINING, BP.DEPTHWISE, A.MULTIPLY, 0.0)],
]


def make(n_envs: int, hcfg: HostsConfig = HCFG, seed: int = 0) -> tuple[BatchedHostsDynamics, dict, dict]:
    cfg = EngineConfig(n_envs=n_envs, n_slots=S, seed=seed)
    dyn = BatchedHostsDynamics(cfg, hcfg)
    return dyn, dyn.init_aux(n_envs, seed), make_state(cfg).to_dict()


def set_slot(state: dict, env: int, slot: int, spec: tuple | None, germ_epoch: int = 0) -> None:
    """Write one slot by hand (what the lifecycle would have done)."""
    sl = state["slots"]
    if spec is None:
        sl["stage"][env, slot] = int(Stage.DORMANT)
        return
    stage, bp, algo, alpha = spec
    sl["stage"][env, slot] = int(stage)
    sl["blueprint"][env, slot] = int(bp)
    sl["algorithm"][env, slot] = int(algo)
    sl["alpha"][env, slot] = alpha
    sl["germination_epoch"][env, slot] = germ_epoch


def mixed_state(state: dict) -> dict:
    for e, row in enumerate(MIXED):
        for s, spec in enumerate(row):
            set_slot(state, e, s, spec, germ_epoch=e + s)
    return state


def clone(state: dict) -> dict:
    return {k: clone(v) if isinstance(v, dict) else v.clone() for k, v in state.items()}


def batches_of(dyn: BatchedHostsDynamics, order: torch.Tensor, env: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = dyn.data
    return [(d.images(d.x_train[order[env, mb]]), d.y_train[order[env, mb]]) for mb in range(order.shape[1])]


def test_batched_epoch_equals_per_env_reference() -> None:
    """Two batched epochs == two epochs of the per-env loop, env by env (params, momenta, metrics)."""
    dyn, aux, state = make(len(MIXED))
    state = mixed_state(state)
    aux = dyn.refresh_seeds(state, aux)
    ref = {e: (dyn.env_params(aux, e), dyn.env_params(aux, e, momentum=True)) for e in range(len(MIXED))}
    for _ in range(2):
        order = dyn.data_order(aux)
        metrics, aux = dyn.advance(state, aux)
        for e in range(len(MIXED)):
            slots = slot_setups(state, e)
            p, m, tel = train_single_host(*ref[e], slots, batches_of(dyn, order, e), HCFG)
            ref[e] = (p, m)
            got, got_mom = dyn.env_params(aux, e), dyn.env_params(aux, e, momentum=True)
            for k in p:
                torch.testing.assert_close(got[k], p[k], atol=2e-5, rtol=1e-4, msg=f"env {e} {k}")
                torch.testing.assert_close(got_mom[k], m[k], atol=2e-5, rtol=1e-4, msg=f"env {e} mom.{k}")
            trains = [st.stage in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING) for st in slots]
            want_norm = torch.where(torch.tensor(trains), tel["seed_norm"], 0.0)
            torch.testing.assert_close(metrics["gradient_norm"][e], want_norm, atol=1e-5, rtol=1e-4)
            # metrics: the reference evaluated on the batched weights (one slow pass per variant)
            ev = evaluate_single_host(dyn.env_params(aux, e), slots, dyn._val_x, dyn._val_y, HCFG)
            one = 100.0 / HCFG.val_size + 1e-3  # at most one near-tie may flip between conv kernels
            assert abs(metrics["val_loss"][e].item() - ev["val_loss"]) < 1e-4
            assert abs(metrics["val_acc"][e].item() - ev["val_acc"]) < one
            assert abs(metrics["acc_all_seeds_off"][e].item() - ev["acc_all_seeds_off"]) < one
            assert abs(metrics["acc_committed"][e].item() - ev["acc_committed"]) < one
            np.testing.assert_allclose(metrics["acc_without_slot"][e].numpy(), ev["acc_without_slot"], atol=one)
            np.testing.assert_allclose(metrics["interaction_sum"][e].numpy(), ev["interaction_sum"], atol=4 * one)
    assert set(metrics) == set(METRIC_FIELDS)
    for k, (dtype, per_slot) in METRIC_FIELDS.items():
        assert metrics[k].dtype == dtype and metrics[k].shape == ((len(MIXED), S) if per_slot else (len(MIXED),))
    assert not metrics["diverged"].any()
    assert (metrics["interaction_sum"].abs() > 0).any(), "two or more blended seeds should interact"
    assert (metrics["host_params"] == dyn.host_params).all()


def test_training_seed_is_isolated_and_trains() -> None:
    """A TRAINING seed changes neither the host's output nor its updates, yet its own weights learn."""
    specs = [(Stage.TRAINING, bp, algo, 0.0) for bp, algo in
             [(BP.CONV_HEAVY, A.ADD), (BP.ATTENTION, A.MULTIPLY), (BP.NORM, A.GATE), (BP.DEPTHWISE, A.GATE)]]
    dyn, aux, with_seed = make(len(specs))
    without = clone(with_seed)
    for e, spec in enumerate(specs):
        set_slot(with_seed, e, 1, spec, germ_epoch=3)
    aux = dyn.refresh_seeds(with_seed, aux)
    x = dyn._val_x[:16]
    assert torch.equal(dyn.predict(with_seed, aux, x), dyn.predict(without, aux, x))
    m_seed, aux_seed = dyn.advance(with_seed, aux)
    m_host, aux_host = dyn.advance(without, aux)
    torch.testing.assert_close(aux_seed["host"], aux_host["host"], atol=1e-7, rtol=0)
    for k in ("val_acc", "val_loss", "acc_all_seeds_off", "acc_without_slot"):
        torch.testing.assert_close(m_seed[k], m_host[k], atol=1e-6, rtol=0, msg=k)
    for e, (_, bp, _, _) in enumerate(specs):
        before, after = dyn.env_params(aux, e), dyn.env_params(aux_seed, e)
        for k in (k for k in before if k.startswith(f"seed1.{bp.name}.")):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
    assert (m_seed["gradient_norm"][:, 1] > 0).all() and (m_seed["gradient_health"][:, 1] > 0).all()
    assert (m_seed["gradient_norm"][:, [0, 2]] == 0).all()


def test_fossil_is_frozen_blended_and_counterfactual_is_host_without_seed() -> None:
    dyn, aux, fossil = make(3)
    for e, (bp, algo) in enumerate([(BP.CONV_LIGHT, A.ADD), (BP.BOTTLENECK, A.MULTIPLY), (BP.CONV_SMALL, A.GATE)]):
        set_slot(fossil, e, 0, (Stage.FOSSILIZED, bp, algo, 1.0), germ_epoch=2)
        set_slot(fossil, e, 2, (Stage.BLENDING, BP.NORM, A.ADD, 0.5), germ_epoch=7)
    aux = dyn.refresh_seeds(fossil, aux)
    # train the fossil's weights away from their init first so "still blended" is not trivial
    trained = clone(fossil)
    trained["slots"]["stage"][:, 0] = int(Stage.HOLDING)
    for _ in range(2):
        _, aux = dyn.advance(trained, aux)
    frozen = {k: v.clone() for k, v in aux.items() if k.startswith(("seed0.", "gate0", "mom.seed0.", "mom.gate0"))}
    assert len(frozen) == 16
    metrics, new = dyn.advance(fossil, aux)
    for k, v in frozen.items():
        assert torch.equal(new[k], v), f"fossil parameter {k} changed"
    assert not torch.equal(new["host"], aux["host"])  # the host still trains
    assert (metrics["gradient_norm"][:, 0] == 0).all()  # fossils report no gradient telemetry
    # counterfactual (slot 0 alpha 0) == the host without that seed, logits and accuracy
    no_seed = clone(fossil)
    no_seed["slots"]["stage"][:, 0] = int(Stage.DORMANT)
    x = dyn._val_x[:32]
    counterfactual = dyn.predict(fossil, new, x, off=(0,))
    torch.testing.assert_close(counterfactual, dyn.predict(no_seed, new, x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(dyn.predict(fossil, new, x), counterfactual), "the fossil must still be blended"
    for e in range(3):  # and the per-env reference agrees on both
        p, slots = dyn.env_params(new, e), slot_setups(fossil, e)
        for off in ((), (0,)):
            want = single_host_forward(p, x, slots, HCFG, off=frozenset(off))
            torch.testing.assert_close(dyn.predict(fossil, new, x, off=off)[:, e], want, atol=1e-5, rtol=1e-5)
    ev_no_seed = dyn.evaluate(no_seed, new)
    ev = dyn.evaluate(fossil, new)
    torch.testing.assert_close(ev["acc_without_slot"][:, 0], ev_no_seed["val_acc"])
    # committed accuracy keeps the fossil (slot 0) on and turns the BLENDING seed (slot 2) off
    torch.testing.assert_close(ev["acc_committed"], ev["acc_without_slot"][:, 2])


def test_deterministic_fresh_seeds_and_partial_reset() -> None:
    dyn, aux_a, state = make(len(MIXED))
    state = mixed_state(state)
    _, aux_b, _ = make(len(MIXED))
    for _ in range(2):
        m_a, aux_a = dyn.advance(state, aux_a)
        m_b, aux_b = dyn.advance(state, aux_b)
    assert all(torch.equal(aux_a[k], aux_b[k]) for k in aux_a)
    assert all(torch.equal(m_a[k], m_b[k]) for k in m_a)
    _, aux_other, _ = make(len(MIXED), seed=1)
    assert not torch.equal(aux_other["host"], dyn.init_aux(len(MIXED), 0)["host"])

    # a re-germinated slot (new germination epoch) gets fresh weights; the same seed is never re-drawn
    k = "seed2.CONV_LIGHT"  # env 2, slot 2 blends a CONV_LIGHT
    assert torch.equal(dyn.refresh_seeds(state, aux_a)[k], aux_a[k])
    regerm = clone(state)
    regerm["slots"]["germination_epoch"][2, 2] = 40
    fresh = dyn.refresh_seeds(regerm, aux_a)
    assert not torch.equal(fresh[k][2], aux_a[k][2])
    assert torch.equal(torch.cat([fresh[k][:2], fresh[k][3:]]), torch.cat([aux_a[k][:2], aux_a[k][3:]]))
    assert torch.equal(fresh["mom." + k][2], torch.zeros_like(fresh[k][2]))
    assert torch.equal(fresh[k], dyn.refresh_seeds(regerm, dyn.refresh_seeds(regerm, aux_b))[k])

    # partial reset: other rows bit-identical, reset rows equal to a fresh init with the same key
    rows = torch.tensor([True, False, False, True, False, False])
    env = torch.arange(len(MIXED))
    keys = rng.episode_seed(0, env, torch.zeros_like(env))
    reset = dyn.reset_aux(aux_a, rows, keys)
    init = dyn.init_aux(len(MIXED), 0)
    for k, v in aux_a.items():
        assert torch.equal(reset[k][~rows], v[~rows]), k
        assert torch.equal(reset[k][rows], init[k][rows]), k


def test_diverged_env_is_isolated() -> None:
    """A NaN host reports diverged with finite metrics; every other env trains exactly as before."""
    dyn, aux, state = make(len(MIXED))
    state = mixed_state(state)
    aux = dyn.refresh_seeds(state, aux)
    bad = dict(aux)
    bad["host"] = aux["host"].clone()
    bad["host"][1, 200:300] = float("nan")  # inside conv1's weights
    m_ok, aux_ok = dyn.advance(state, aux)
    m_bad, aux_bad = dyn.advance(state, bad)
    assert m_bad["diverged"].tolist() == [e == 1 for e in range(len(MIXED))]
    for k, v in m_bad.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    keep = torch.arange(len(MIXED)) != 1
    for k in ("val_acc", "val_loss", "acc_without_slot", "gradient_norm"):
        torch.testing.assert_close(m_bad[k][keep], m_ok[k][keep], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(aux_bad["host"][keep], aux_ok["host"][keep], atol=1e-6, rtol=0)


def test_reference_forward_matches_batched_predict() -> None:
    dyn, aux, state = make(len(MIXED))
    state = mixed_state(state)
    aux = dyn.refresh_seeds(state, aux)
    x = dyn._val_x[:8]
    batched = dyn.predict(state, aux, x)
    for e in range(len(MIXED)):
        single = single_host_forward(dyn.env_params(aux, e), x, slot_setups(state, e), HCFG)
        torch.testing.assert_close(batched[:, e], single, atol=1e-5, rtol=1e-5)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="n_slots must be <= 3"):
        BatchedHostsDynamics(EngineConfig(n_envs=2, n_slots=4), HCFG)
    with pytest.raises(ValueError, match="topology must be 'cnn'"):
        BatchedHostsDynamics(EngineConfig(n_envs=2, n_slots=1, topology="transformer"), HCFG)
    with pytest.raises(ValueError, match="norm_groups"):
        HostsConfig(channels=(6, 16, 32))
    with pytest.raises(ValueError, match="dataset"):
        HostsConfig(dataset="mnist")
    with pytest.raises(ValueError, match="data_path"):
        load_dataset("cifar10")


def _write_cifar(root, n: int, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        d = {b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": g.integers(0, 10, n).tolist(),
             b"batch_label": name.encode()}
        with open(root / name, "wb") as fh:
            pickle.dump(d, fh)


def test_cifar_loader_and_backend(tmp_path) -> None:
    _write_cifar(tmp_path, n=6)
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_val.shape == (6, 3, 32, 32) and ds.y_train.dtype == torch.int64 and ds.n_classes == 10
    with open(tmp_path / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert torch.equal(ds.x_train[6].reshape(-1), torch.from_numpy(raw[b"data"][0]))  # channel-major layout
    assert abs(ds.images(ds.x_train).mean().item()) < 1e-4
    hcfg = HostsConfig(dataset="cifar10", data_path=str(tmp_path), minibatch_size=4, minibatches_per_epoch=2,
                       val_size=6)
    cfg = EngineConfig(n_envs=2, n_slots=2)
    dyn = BatchedHostsDynamics(cfg, hcfg)
    state = make_state(cfg).to_dict()
    set_slot(state, 0, 1, (Stage.BLENDING, BP.CONV_HEAVY, A.GATE, 0.5))
    metrics, _ = dyn.advance(state, dyn.init_aux(2, 0))
    assert torch.isfinite(metrics["val_loss"]).all() and metrics["acc_without_slot"].shape == (2, 2)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / CIFAR_TEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3, test_batch"):
        load_cifar10(tmp_path)


def test_runs_inside_the_engine() -> None:
    """The engine drives the backend through resets, random valid actions and partial resets."""
    cfg = EngineConfig(n_envs=4, n_slots=S, max_epochs=6)
    eng = Engine(cfg, dynamics=BatchedHostsDynamics(cfg, HCFG))
    g = np.random.default_rng(0)
    eng.reset()
    for _ in range(9):
        out = eng.step(random_action(g, eng.masks, S, p_arbitrary=0.0))
        assert torch.isfinite(out["reward"]).all()
        if out["done"].any():
            eng.reset(out["done"].squeeze(-1))
    st = eng.state
    assert ((st["val_acc"] > 0) & (st["val_acc"] <= 100)).all()
    assert (st["host_params"] == eng.dynamics.host_params).all()


def test_partial_reset_runs_only_the_reset_rows() -> None:
    """``Engine.reset(rows)`` on the hosts runs a host epoch for the k reset envs only (O(k)): the
    backend sees k rows, every other row's hosts, momenta and RNG stay bit-identical, and the reset
    rows get what a reset of all envs gives them (same keys)."""
    cfg = EngineConfig(n_envs=5, n_slots=S, max_epochs=6)
    eng = Engine(cfg, dynamics=BatchedHostsDynamics(cfg, HCFG))
    g = np.random.default_rng(1)
    eng.reset()
    for _ in range(3):
        eng.step(random_action(g, eng.masks, S, p_arbitrary=0.0))
    seen: list[int] = []
    advance = eng.dynamics.advance

    def spy(state: dict, aux: dict) -> tuple[dict, dict]:
        seen.append(int(aux["rng_key"].shape[0]))
        return advance(state, aux)

    eng.dynamics.advance = spy
    rows = torch.tensor([False, True, False, True, False])
    before, state_before, episode = dict(eng.aux), eng.state.clone(), eng.episode.clone()
    keys = rng.episode_seed(eng.base_seed, eng.env_index, episode)
    out = eng.reset(rows)
    assert seen == [2]
    for k, v in before.items():
        assert torch.equal(eng.aux[k][~rows], v[~rows]), k
    st = eng.state
    for k in ("val_acc", "epoch", "episode_return", "acc_history"):
        assert torch.equal(st[k][~rows], state_before[k][~rows]), k
    assert (st["epoch"][rows] == 0).all() and not out["done"].any()
    assert eng._state["slots"]["alpha"].stride() == eng._fresh["slots"]["alpha"].stride()  # slot-major kept
    # the reset rows equal the all-rows (where-based) reset with the same keys
    _, full_aux, full_out = core_step.reset(
        as_dict(state_before), before, torch.ones_like(rows), keys,
        fresh=eng._fresh, reset_aux=eng.dynamics.reset_aux, advance=advance, tables=eng.tables, cfg=eng.cfg,
    )
    for k, v in full_aux.items():
        torch.testing.assert_close(eng.aux[k][rows], v[rows], msg=k)
    torch.testing.assert_close(out["observation"][rows], full_out["observation"][rows])
    # no rows: no host epoch at all
    seen.clear()
    kept = dict(eng.aux)
    eng.reset(torch.zeros_like(rows))
    assert seen == [] and all(torch.equal(eng.aux[k], v) for k, v in kept.items())
