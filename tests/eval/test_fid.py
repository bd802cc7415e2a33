"""FID's Fréchet distance against the closed form, CLIP score and Inception Score on known inputs."""

import math

import pytest
import torch

from plainsd.eval.fid import clip_score, fid, frechet_distance, gaussian_fit, inception_score


def test_frechet_distance_closed_forms():
    mu, s = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-10)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    want = 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(torch.tensor([1.0, 0, 0]), torch.diag(v1), mu, torch.diag(v2)) == pytest.approx(want)
    # A rotation of both covariances leaves the distance unchanged.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    d = frechet_distance(mu, q @ torch.diag(v1) @ q.T, mu, q @ torch.diag(v2) @ q.T)
    assert d == pytest.approx(2.0, rel=1e-6)


def test_gaussian_fit_and_fid_of_same_set():
    feats = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    mu, cov = gaussian_fit(feats)
    assert torch.allclose(cov, torch.cov(feats.double().T))
    from PIL import Image

    from plainsd.config import VisionConfig
    from plainsd.models.clip import CLIPVisionModel

    vision = CLIPVisionModel(VisionConfig(width=32, layers=1, heads=1, projection_dim=8)).eval()
    imgs = [Image.new("RGB", (64, 64), (i * 20 % 255, 80, 160)) for i in range(20)]
    assert fid(vision, imgs, imgs) == pytest.approx(0, abs=1e-6)
    other = [Image.new("RGB", (64, 64), (200, i * 20 % 255, 10)) for i in range(20)]
    assert fid(vision, imgs, other) > 0


def test_clip_score_and_inception_score():
    import plainsd
    from PIL import Image

    from plainsd.config import VisionConfig
    from plainsd.models.clip import CLIPVisionModel

    sd = plainsd.build("tiny-sd2")
    vision = CLIPVisionModel(VisionConfig(width=32, layers=1, heads=1, projection_dim=128)).eval()
    score = clip_score(sd.text_encoder, vision, sd.tokenizer, [Image.new("RGB", (64, 64))] * 2, ["a", "b"])
    assert 0 <= score <= 100
    assert inception_score(["a"] * 10) == pytest.approx(1.0)
    assert inception_score(["a", "b", "c", "d"] * 5) == pytest.approx(4.0)
    assert inception_score([]) == 0.0
    assert math.isclose(inception_score(["a", "a", "b", "b"]), 2.0)
