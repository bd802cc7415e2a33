"""Attention's bf16 CPU paths give float32 SDPA's answer within bf16 tolerance, and take the path they say."""

import pytest
import torch
import torch.nn.functional as F

from plainsd.models import layers

fused = pytest.mark.skipif(not layers._fused_exp_available(), reason="torch has no oneDNN linear with a fused sigmoid "
                           "(torch.ops.mkldnn._linear_pointwise) or this CPU has no oneDNN bf16 kernels")


def _split(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _sdpa(q, k, v, heads):
    """torch's SDPA on [B, N, C] tensors in their own dtype."""
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return out.transpose(1, 2).reshape(q.shape)


def _errors(got, q, k, v, heads):
    """Relative errors of `got` and of bf16 SDPA against float32 SDPA."""
    ref = _sdpa(q.float(), k.float(), v.float(), heads)
    bf16 = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads)
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    return rel(got), rel(bf16)


def _spy(monkeypatch, names):
    calls = []
    for name in names:
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    return calls


@fused
@pytest.mark.parametrize("n, m, c, heads, path", [
    (1024, 1024, 80, 2, "_attention_fused"),  # self-attention at 1024 tokens, heads of 40 as SD1.5's first level
    (4096, 77, 80, 2, "_attention_fused"),  # the text's 77 keys (padded to 80) at 4096 tokens
    (1024, 77, 80, 2, "_attention_batched"),  # the text at 1024 tokens: few scores, one batched product
    (1024, 1024, 128, 2, "_attention_fused"),  # SD2's heads of 64
    (1024, 1024, 512, 1, "_attention_fused"),  # the VAE's single head of 512
])
def test_bf16_attention_paths_within_bf16_tolerance(monkeypatch, n, m, c, heads, path):
    torch.manual_seed(0)
    calls = _spy(monkeypatch, ["_attention_fused", "_attention_batched"])
    q, k, v = torch.randn(2, n, c), torch.randn(2, m, c), torch.randn(2, m, c)
    got = layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=heads)
    assert calls == [path] and got.dtype == torch.bfloat16 and got.shape == q.shape
    err, err_sdpa = _errors(got, q, k, v, heads)
    assert err < 0.01 and err < 2 * err_sdpa, (err, err_sdpa)  # as close to float32 as bf16 SDPA is


@fused
def test_fused_attention_with_large_scores():
    """Scores in the tens (peaked attention): the bound is looser, the exponentials smaller, the answer as good."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1024, 80) * 3, torch.randn(1, 1024, 80) * 3, torch.randn(1, 1024, 80)
    got = layers._attention_fused(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
    err, err_sdpa = _errors(got, q, k, v, 2)
    assert err < 2 * err_sdpa, (err, err_sdpa)


@fused
def test_fused_attention_recomputes_rows_whose_bound_was_too_loose(monkeypatch):
    """One key far out along a direction half the queries ignore: for those, the bound |q| max|k - c| is ~200
    above their real scores, every exponential underflows, and the row must come from a plain softmax."""
    torch.manual_seed(2)
    n = m = 512
    q, k, v = torch.randn(1, n, 40), torch.randn(1, m, 40) * 0.1, torch.randn(1, m, 40)
    k[0, 0, 0] = 200.0
    q[0, :, 0] = 0.0
    q[0, ::2, 0] = 30.0  # even rows point at the far key (their bound is tight), odd rows ignore it
    rows = []
    real_softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, *a, **kw: rows.append(x.shape[0]) or real_softmax(x, *a, **kw))
    got = layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=1)
    assert rows == [n // 2]  # the odd rows, in one plain softmax
    err, err_sdpa = _errors(got, q, k, v, 1)
    assert err < 2 * err_sdpa, (err, err_sdpa)


def test_float32_and_training_keep_sdpa(monkeypatch):
    torch.manual_seed(0)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or real_sdpa(*a, **kw))
    q, k, v = torch.randn(2, 1024, 80), torch.randn(2, 1024, 80), torch.randn(2, 1024, 80)
    layers.attention(q, k, v, heads=2)  # float32
    qg = q.bfloat16().requires_grad_()
    layers.attention(qg, k.bfloat16(), v.bfloat16(), heads=2).float().sum().backward()  # gradients needed
    assert calls == ["sdpa", "sdpa"] and qg.grad is not None
