"""Distribution metrics: FID on CLIP image features, CLIP score, and an Inception Score over the judge's classes.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the features of two image
sets: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). By default the features are those of the CLIP image
tower plainsd trains for its own model (so the numbers are comparable between plainsd's models, not with
published FIDs, which use InceptionV3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..images import to_tensor


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2), computed in float64.

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), which stays symmetric and so can use eigh.
    """
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross))


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


@torch.no_grad()
def clip_features(vision, images, batch: int = 64) -> torch.Tensor:
    """Unit-normalised CLIP image embeddings of PIL images."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.cat([to_tensor(im) for im in images[i:i + batch]])
        out.append(F.normalize(vision(x).float(), dim=-1))
    return torch.cat(out)


def fid(vision, images_a, images_b) -> float:
    return frechet_distance(*gaussian_fit(clip_features(vision, images_a)), *gaussian_fit(clip_features(vision, images_b)))


@torch.no_grad()
def clip_score(text_encoder, vision, tokenizer, images, prompts) -> float:
    """Mean of 100 * max(cos(text, image), 0), as torchmetrics defines CLIP score."""
    t = F.normalize(text_encoder.pooled(tokenizer(list(prompts))).float(), dim=-1)
    v = clip_features(vision, images)
    return float((100 * (t * v).sum(-1).clamp(min=0)).mean())


def inception_score(labels: list[str]) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with the judge's hard labels: exp of the label entropy (1 .. classes)."""
    if not labels:
        return 0.0
    counts: dict[str, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    n = len(labels)
    return math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))
