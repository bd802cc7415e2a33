"""The upscaler recipe: aligned pairs and crops, the VAE's degradation, a short training whose loss falls."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from plainsd.eval.upscaling import psnr
from plainsd.train.data import ShapesDataset
from plainsd.train.loop import TrainConfig
from plainsd.train.recipes import load_vae, settings
from plainsd.train.upscaler import (UpscalerSettings, _crops, render_pairs, train_upscaler, training_pairs,
                                    vae_round_trip)
from plainsd.weights import DEFAULT_MODEL, load_upscaler


def test_pairs_are_one_scene_at_two_sizes():
    scenes = [ShapesDataset(seed=5).scene(i) for i in range(4)]
    small, large = render_pairs(scenes, 32, 4)
    assert small.shape == (4, 3, 32, 32) and large.shape == (4, 3, 128, 128) and small.dtype == torch.uint8
    shrunk = F.avg_pool2d(large.float(), 4)  # the large render, averaged back down, is the small one
    assert float((shrunk - small.float()).abs().mean()) < 2.0
    other = F.avg_pool2d(large.float().roll(1, 0), 4)
    assert float((other - small.float()).abs().mean()) > 10.0


def test_crops_are_aligned():
    small = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    large = F.interpolate(small, scale_factor=4, mode="nearest")  # a target whose crops are known exactly
    s = UpscalerSettings(size=16, crop=5, scale=4)
    x, y = _crops(small, large, [0, 2, 1, 2], s, random.Random(0))
    assert x.shape == (4, 3, 5, 5) and y.shape == (4, 3, 20, 20)
    assert torch.equal(F.interpolate(x, scale_factor=4, mode="nearest"), y)


def test_vae_round_trip_degrades_a_little():
    vae, _ = load_vae(DEFAULT_MODEL)
    small, _ = render_pairs([ShapesDataset(seed=5).scene(i) for i in range(4)], 64, 1)
    trip = vae_round_trip(vae.float(), small)
    values = psnr(trip, small)
    assert all(25 < v < 60 for v in values), values  # the shipped VAE's round trip: close, not exact
    sampled = vae_round_trip(vae.float(), small, torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, trip)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="plain_share"):
        UpscalerSettings.from_extra({"plain_share": 2})
    with pytest.raises(ValueError, match="no setting 'num_feats'"):
        settings(TrainConfig(network="upscaler", extra={"num_feats": 8}))
    with pytest.raises(ValueError, match="shapes data"):
        train_upscaler(TrainConfig(network="upscaler", data={"kind": "folder", "path": "."}, out="/nonexistent"),
                       progress=False)


def test_training_loss_falls_and_the_file_loads(tmp_path):
    extra = {"size": 32, "pairs": 8, "crop": 16, "num_feat": 16, "num_conv": 2, "plain_share": 0.5, "edge_weight": 0.1,
             "object_weight": 2.0}
    cfg = TrainConfig(network="upscaler", steps=80, batch_size=8, lr=5e-3, ema_decay=0.9, checkpoint_every=40,
                      sample_every=80, out=str(tmp_path / "run"), data={"kind": "shapes", "seed": 3}, extra=extra)
    result = train_upscaler(cfg, progress=False)
    losses = result["losses"]  # (each step's loss depends on its crops: compare means)
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20, losses
    path = tmp_path / "run" / "upscaler.safetensors"
    net = load_upscaler(path)
    assert (net.config.num_feat, net.config.num_conv, net.config.scale) == (16, 2, 4)
    assert net.body[0].weight.dtype == torch.float32  # loaded as float32; stored as float16
    # on the whole training pictures, the trained network is closer to the targets than the nearest-neighbour
    # enlargement it starts from (the squared error, its loss; a 32x32 picture's VAE round trip is poor, and its
    # errors, which no upscaler undoes in 80 steps, make most of what is left)
    vae, _ = load_vae(DEFAULT_MODEL)
    small, large = training_pairs(cfg, UpscalerSettings.from_extra(extra), vae.float(), progress=False)
    x, y = small.float() / 255, large.float() / 255
    with torch.no_grad():
        trained = float(((net(x).clamp(0, 1) - y) ** 2).mean())
    nearest = float(((F.interpolate(x, scale_factor=4, mode="nearest") - y) ** 2).mean())
    assert trained < 0.9 * nearest, (trained, nearest)
    meta = safe_open(str(path), framework="pt").metadata()
    assert meta["plainsd.steps"] == "80" and meta["plainsd.data_seed"] == "3"
    assert json.loads(meta["plainsd.recipe"])["extra"] == extra
    assert (tmp_path / "run" / "samples" / "upscaler-000080.png").is_file()
