"""Token merging: the same numbers as tomesd (A1111's settings), and the matching's own arithmetic."""

import copy

import pytest
import torch

from plainsd.config import UNetConfig
from plainsd.models.tome import bipartite_matching
from plainsd.models.unet import BasicTransformerBlock, UNetModel


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=4,
                     context_dim=32, norm_groups=8)
    model = UNetModel(cfg).eval()
    for p in model.parameters():  # larger than the initialisation's (zero output layers): attention matters
        torch.nn.init.normal_(p, std=0.2)
    return model


def _tomesd_unet(unet, ratio, max_downsample):
    """A copy of `unet` patched by tomesd as A1111 patches its model (use_rand off, self-attention only)."""
    tomesd = pytest.importorskip("tomesd", reason="tomesd is a test extra: pip install -e '.[test]'")
    ref = copy.deepcopy(unet)
    ref.set_token_merging(0.0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.diffusion_model = ref  # the latent-diffusion layout tomesd patches
    tomesd.apply_patch(holder, ratio=ratio, max_downsample=max_downsample, use_rand=False, merge_attn=True,
                       merge_crossattn=False, merge_mlp=False)
    for block in ref.modules():  # tomesd patches latent diffusion's _forward; our blocks' forward calls it here
        if isinstance(block, BasicTransformerBlock):
            block.forward = lambda x, context, merging=None, block=block: block._forward(x, context)
    return ref


@pytest.mark.parametrize("size, ratio, max_downsample", [((16, 12), 0.5, 1), ((15, 11), 0.5, 1), ((16, 16), 0.75, 2),
                                                        ((9, 13), 0.3, 2), ((16, 16), 0.9, 1)])
def test_same_as_tomesd(unet, size, ratio, max_downsample, record_parity):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, *size, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10.0, 500.0])
    ref = _tomesd_unet(unet, ratio, max_downsample)
    with torch.no_grad():
        unet.set_token_merging(0.0)
        plain = unet(x, t, c)
        unet.set_token_merging(ratio, max_downsample)
        try:
            ours = unet(x, t, c)
        finally:
            unet.set_token_merging(0.0)
        theirs = ref(x, t, c)
    diff = (ours - theirs).abs().max().item()
    record_parity(f"token merging {ratio} (max downsample {max_downsample}) vs tomesd, {size[0]}x{size[1]}", diff)
    # the same tokens merged: what is left is the attention's summation order (tomesd orders the tokens
    # differently); merging itself moves the output 1000x more
    assert diff < 1e-5
    assert (ours - plain).abs().max().item() > 1e-3


def test_merge_and_unmerge():
    h, w, c = 4, 6, 3
    x = torch.randn(1, h * w, c)
    # every source equal to its cell's destination (the top-left token): merging loses nothing
    grid = x.view(h, w, c)
    copies = grid[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, h * w, c)
    merge, unmerge = bipartite_matching(copies, h, w, r=18)  # 24 tokens, 6 destinations, 18 sources: all merge
    merged = merge(copies)
    assert merged.shape == (1, 6, c)
    torch.testing.assert_close(merged[0], grid[::2, ::2].reshape(6, c))
    torch.testing.assert_close(unmerge(merged), copies)
    # in bf16 (the bf16 path's dtype), with tokens wide enough that only a copy has a cosine near 1
    wide = torch.randn(h // 2, w // 2, 64).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, h * w, 64)
    merge, unmerge = bipartite_matching(wide.bfloat16(), h, w, r=18)
    assert merge(wide.bfloat16()).shape == (1, 6, 64)
    torch.testing.assert_close(unmerge(merge(wide.bfloat16())), wide.bfloat16())
    # r sources fewer, each merged one averaged into its best match, and given that average back
    merge, unmerge = bipartite_matching(x, h, w, r=5)
    merged = merge(x)
    assert merged.shape == (1, 19, c)
    back = unmerge(merged)
    changed = (back - x).abs().amax(dim=-1)[0] > 0
    assert 6 <= int(changed.sum()) <= 10  # the 5 merged sources, and the 1-5 destinations they joined
    kept = ~changed
    torch.testing.assert_close(back[0, kept], x[0, kept])
    # a ratio of 0 merges nothing; a metric of the wrong length is refused
    merge, unmerge = bipartite_matching(x, h, w, r=0)
    assert merge(x) is x and unmerge(x) is x
    with pytest.raises(ValueError, match="4x5 map's 20 tokens, got 24"):
        bipartite_matching(x, 4, 5, r=3)


def test_set_token_merging_levels(unet):
    unet.set_token_merging(0.5)
    try:
        ratios = {m.downsample: m.merge_ratio for m in unet.modules() if hasattr(m, "merge_ratio")}
        assert ratios == {1: 0.5, 2: 0.0}
        unet.set_token_merging(0.5, max_downsample=2)
        assert {m.merge_ratio for m in unet.modules() if hasattr(m, "merge_ratio")} == {0.5}
        with pytest.raises(ValueError, match=r"at least 0 and below 1 \(0.5 is usual; 0 = off\), got 1.0"):
            unet.set_token_merging(1.0)
    finally:
        unet.set_token_merging(0.0)
