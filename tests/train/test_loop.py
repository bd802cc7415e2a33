"""The training loop: learning-rate schedules, EMA, atomic checkpoints, exact resume."""

import math

import pytest
import torch

from plainsd.train.loop import EMA, TrainConfig, lr_at, train


def test_lr_schedules():
    c = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0) and lr_at(50, c) == 1.0
    c.lr_schedule = "cosine"
    assert lr_at(10, c) == pytest.approx(1.0) and lr_at(55, c) == pytest.approx(0.5) and lr_at(100, c) == 0.0
    c.lr_schedule, c.lr_cycles = "cosine_with_restarts", 3
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(40, c) == pytest.approx(1.0)  # a restart after each third of the steps
    assert lr_at(39, c) < 0.01 and lr_at(25, c) == pytest.approx(0.5, abs=0.01)


def test_config_errors(tmp_path):
    (tmp_path / "c.json").write_text('{"network": "vae", "stepz": 3}')
    with pytest.raises(ValueError, match="unknown settings \\['stepz'\\]"):
        TrainConfig.from_file(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"network": "vae", "lr_schedule": "linear"}')
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        TrainConfig.from_file(tmp_path / "c.json")
    with pytest.raises(ValueError, match="no such training config"):
        TrainConfig.from_file(tmp_path / "none.json")


def test_ema_follows_with_decay():
    p = {"w": torch.zeros(3)}
    ema = EMA(p, 0.9)
    p["w"] += 1.0
    for _ in range(200):
        ema.update(p)
    assert torch.allclose(ema.shadow["w"], torch.ones(3), atol=1e-3)


def _problem(seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.tensor(0.0))  # a 0-dim parameter (like CLIP's temperature) must resume too
    target = torch.tensor([1.0, -2.0, 3.0, 0.5])

    def loss_fn(step, micro):
        g = torch.Generator().manual_seed(step * 10 + micro)
        x = torch.randn(16, 4, generator=g)
        return ((x @ w + b - x @ target - 0.7) ** 2).mean()

    return {"w": w, "b": b}, loss_fn


def test_loss_goes_down_and_resume_is_exact(tmp_path):
    cfg = TrainConfig(network="vae", steps=30, lr=0.3, lr_schedule="cosine", grad_accum=2, ema_decay=0.9,
                      checkpoint_every=10, out=str(tmp_path / "straight"))
    params, loss_fn = _problem()
    straight = train(cfg, params, loss_fn, progress=False)
    assert straight["losses"][-1] < 0.1 * straight["losses"][0]

    params2, loss_fn2 = _problem()
    cfg2 = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "killed")})

    def dies_at_25(step, micro):
        if step == 25:
            raise KeyboardInterrupt
        return loss_fn2(step, micro)

    with pytest.raises(KeyboardInterrupt):
        train(cfg2, params2, dies_at_25, progress=False)
    assert not list((tmp_path / "killed").glob("*.tmp"))
    params3, loss_fn3 = _problem(seed=1)  # fresh process: weights come only from the checkpoint
    resumed = train(cfg2, params3, loss_fn3, resume=True, progress=False)
    assert len(resumed["losses"]) == 30
    assert torch.allclose(params3["w"], params["w"], atol=1e-6)
    assert torch.allclose(params3["b"], params["b"], atol=1e-6)
    assert torch.allclose(resumed["weights"]["w"], straight["weights"]["w"], atol=1e-6)
    assert math.isclose(resumed["losses"][-1], straight["losses"][-1], rel_tol=1e-5)


def test_weight_decay_shrinks_matrices_but_not_biases_gains_or_scalars(tmp_path):
    from plainsd.train.loop import param_groups

    params = {"w": torch.nn.Parameter(torch.ones(2, 3)), "b": torch.nn.Parameter(torch.ones(3)),
              "logit_scale": torch.nn.Parameter(torch.tensor(2.0))}
    assert [len(g["params"]) for g in param_groups(params, 0.1)] == [1, 2]
    cfg = TrainConfig(network="x", steps=10, lr=0.1, weight_decay=0.5, checkpoint_every=100, out=str(tmp_path))
    train(cfg, params, lambda step, micro: 0.0 * sum(p.sum() for p in params.values()), progress=False)
    assert torch.allclose(params["w"], torch.full((2, 3), (1 - 0.1 * 0.5) ** 10))  # AdamW's decoupled decay alone
    assert torch.equal(params["b"], torch.ones(3)) and float(params["logit_scale"]) == 2.0
