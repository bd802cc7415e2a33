"""The shared layers: attention is torch's SDPA in every dtype, GEGLU's in-place inference gives its numbers."""

import pytest
import torch
import torch.nn.functional as F

from plainsd.models import layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_sdpa_over_the_heads(dtype, causal):
    """The models' attention is torch's SDPA in every dtype, whatever the CPU (its oneDNN variants for bf16 are
    the runtime's: tests/runtime/test_attention.py)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 32).to(dtype) for _ in range(3))
    split = [t.reshape(2, 64, 4, 8).transpose(1, 2) for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*split, is_causal=causal).transpose(1, 2).reshape(2, 64, 32)
    assert torch.equal(layers.attention(q, k, v, heads=4, causal=causal), expected)
    if not causal:  # (CrossAttention's is not)
        assert torch.equal(layers.CrossAttention(32, None, heads=4).attend(q, k, v), expected)


def test_geglu_in_place_at_inference_gives_the_same_numbers_and_training_keeps_its_gradient():
    torch.manual_seed(0)
    geglu, x = layers.GEGLU(16, 24), torch.randn(3, 5, 16)
    value, gate = F.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    expected = value * F.gelu(gate)
    with torch.no_grad():
        assert torch.equal(geglu(x), expected)
    with torch.inference_mode():
        assert torch.equal(geglu(x), expected)
    out = geglu(x)  # autograd: out of place
    out.sum().backward()
    w = geglu.proj.weight.detach().requires_grad_()
    v, g = F.linear(x, w, geglu.proj.bias.detach()).chunk(2, dim=-1)
    (v * F.gelu(g)).sum().backward()
    assert torch.equal(out.detach(), expected.detach()) and torch.allclose(geglu.proj.weight.grad, w.grad)
