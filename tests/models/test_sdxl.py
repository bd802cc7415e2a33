"""SDXL's networks against diffusers / transformers on identical random weights: the UNet with its vector of pooled
text and sizes (diffusers' added_cond_kwargs), the two text towers (penultimate states, bigG's pooled projection)."""

import pytest
import torch

import plainsd
from plainsd.config import preset
from plainsd.models.sdxl import SIZE_EMBED_DIM, repad, size_numbers, vector
from plainsd.models.tokenizer import Tokenizer
from tests.reference import max_diff, sdxl_text_reference, unet_pair


def _ids(prompts=("a red circle", "a blue square on the left of a green triangle")):
    """Token ids as diffusers' two tokenizers give them: CLIP-L's padded with the end token, bigG's with 0."""
    return Tokenizer("sd1")(list(prompts)), Tokenizer("sd2")(list(prompts))


def _compare_unet(cfg, kind, record_parity, label, size=8, shared=False, scale=0.05, dtype=torch.float32,
                  adapters=None):
    """The UNets' largest difference and the size of diffusers' output; adapters: a function giving (diffusers'
    T2IAdapter, plainsd's), whose features both UNets then take too (recorded apart)."""
    theirs, ours = unet_pair(cfg, seed=3, shared=shared, scale=scale)
    theirs.to(dtype)
    ours.to(dtype)
    pooled_width = cfg.adm_in_channels - (6 if kind == "base" else 5) * SIZE_EMBED_DIM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g).to(dtype)
    context = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    pooled = torch.randn(2, pooled_width, generator=g)  # (float32 values, so that both get the same vector)
    numbers = torch.tensor([size_numbers(kind, 1024, 768), size_numbers(kind, 832, 1216, 64, 32, 2.5)])
    t = torch.tensor([981.0, 3.5])
    added, y = {"text_embeds": pooled.to(dtype), "time_ids": numbers}, vector(pooled, numbers).to(dtype)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        got = ours(x, t, context, y=y)
    d = max_diff(got, want)
    record_parity(label, d)
    if adapters is not None:
        their_adapter, our_adapter = adapters()
        hint = torch.rand(2, 3, 8 * size, 8 * size, generator=g)
        with torch.no_grad():
            want = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                          down_intrablock_additional_residuals=their_adapter(hint)).sample
            plain, got = got, ours(x, t, context, y=y, adapter=our_adapter(hint))
        assert max_diff(got, plain) > 1e3 * max_diff(got, want)  # the features change the output
        d = max(d, max_diff(got, want))
        record_parity(f"{label}, with a T2I-Adapter", max_diff(got, want))
    return d, float(want.abs().mean())


@pytest.mark.parametrize("name, kind", [("tiny-sdxl", "base"), ("tiny-sdxl-refiner", "refiner")])
def test_tiny_unet_matches_diffusers(record_parity, name, kind):
    d, scale = _compare_unet(preset(name).unet, kind, record_parity, f"UNet {name} vs diffusers (text_time)")
    assert scale > 0.1 and d <= 1e-5, d


def test_tiny_unet_equals_diffusers_in_float64(record_parity):
    """In float64 the two compute the same numbers: what differences remain in float32 are round-off (which a deep
    random network amplifies: at SDXL's width, with weights perturbed by 0.05, both diffusers and plainsd land
    about 2e-3 from the float64 result)."""
    d, scale = _compare_unet(preset("tiny-sdxl").unet, "base", record_parity, "UNet tiny-sdxl vs diffusers, float64",
                             dtype=torch.float64)
    assert scale > 0.1 and d <= 1e-12, d


def test_the_vector_is_what_the_unet_reads():
    """A wrong size or aesthetic score changes the prediction; a UNet without label_emb refuses y and an SDXL UNet
    needs it."""
    sd = plainsd.build("tiny-sdxl", seed=0)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 192)
    pooled = torch.randn(1, 96)
    with torch.no_grad():
        a = sd.unet(x, t, ctx, y=vector(pooled, torch.tensor([size_numbers("base", 64, 64)])))
        b = sd.unet(x, t, ctx, y=vector(pooled, torch.tensor([size_numbers("base", 64, 128)])))
    assert max_diff(a, b) > 1e-3
    with pytest.raises(ValueError, match=r"needs the vector y \[B, 1632\]"):
        sd.unet(x, t, ctx)
    with pytest.raises(ValueError, match=r"must be \[1, 1632\], got \[1, 100\]"):
        sd.unet(x, t, ctx, y=torch.zeros(1, 100))
    with pytest.raises(ValueError, match="takes no vector y"):
        plainsd.build("tiny").unet(x, t, torch.randn(1, 77, 128), y=torch.zeros(1, 4))


def test_size_numbers_follow_sgm_and_diffusers_order():
    # diffusers' _get_add_time_ids: original_size + crops_coords_top_left + target_size, (height, width) each;
    # the refiner's: original_size + crops_coords_top_left + (aesthetic_score,)
    assert size_numbers("base", width=1216, height=832, crop_top=16, crop_left=8) == [832, 1216, 16, 8, 832, 1216]
    assert size_numbers("refiner", 1024, 768, aesthetic_score=2.5) == [768, 1024, 0, 0, 2.5]
    with pytest.raises(ValueError, match="'base' or 'refiner'"):
        size_numbers("xl", 64, 64)


def test_repad_changes_only_what_follows_the_end_token():
    ids_l, ids_g = _ids()
    assert torch.equal(repad(ids_l, "zero"), ids_g) and torch.equal(repad(ids_g, "eot"), ids_l)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_tiny_text_towers_match_transformers(sdxl_reference, record_parity, name):
    """Our conditioner on CLIP-L's token ids against diffusers' encode_prompt recipe on each tokenizer's ids."""
    _, _, _, text, text2, sd = sdxl_reference(name)
    ids_l, ids_g = _ids()
    with torch.no_grad():
        want_states, want_pooled = sdxl_text_reference(text, text2, ids_l, ids_g)
        states, pooled = sd.text_encoder.encode(sd.tokenizer(["a red circle", "a blue square on the left of a green triangle"]))
        only_states = sd.text_encoder(ids_l)
    d = max(max_diff(states, want_states), max_diff(pooled, want_pooled))
    record_parity(f"text towers {name} vs transformers (states, pooled)", d)
    assert d <= 1e-5 and torch.equal(only_states, states)
    assert states.shape[-1] == sd.config.unet.context_dim


def test_extra_vectors_go_to_their_towers():
    """Textual-inversion vectors [n, CLIP-L width + bigG width]: each tower takes its own columns, so vectors made of
    each tower's own token embeddings of a word act as that word."""
    sd = plainsd.build("tiny-sdxl", seed=0)
    word = Tokenizer("sd1").encode("star")[0]
    extra = torch.cat([t.text_model.embeddings.token_embedding.weight[word][None] for t in sd.text_encoder.towers], dim=1)
    ids_l = _ids(["a red star"])[0]
    vocab = sd.config.text.vocab_size
    with torch.no_grad():
        assert torch.equal(sd.text_encoder(ids_l.masked_fill(ids_l == word, vocab), extra=extra), sd.text_encoder(ids_l))
        assert not torch.equal(sd.text_encoder(ids_l.masked_fill(ids_l == word, vocab), extra=extra.flip(1)),
                               sd.text_encoder(ids_l))


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("sdxl", "base"), ("sdxl-refiner", "refiner")])
def test_full_unet_matches_diffusers(record_parity, tmp_path, name, kind):
    """Full size (2.6B parameters, 10.3 GB in float32): plainsd's UNet holds diffusers' own weight tensors, so one
    UNet's worth of memory is in use, never two. The weights are perturbed by 0.005, not 0.05: more would make
    this deep random network amplify float32 round-off to ~1e-2 in either implementation. The base UNet also takes
    a full-size SDXL T2I-Adapter's features (diffusers' full_adapter_xl, read back by plainsd)."""
    from tests.models.test_t2i_adapter import _adapters

    adapters = (lambda: _adapters(tmp_path / "adapter", preset(name).unet)) if kind == "base" else None
    d, scale = _compare_unet(preset(name).unet, kind, record_parity, f"UNet {name} vs diffusers, full size", size=16,
                             shared=True, scale=0.005, adapters=adapters)
    assert scale > 0.1 and d <= 1e-4, d


@pytest.mark.slow
def test_full_text_towers_match_transformers(record_parity):
    """CLIP ViT-L and OpenCLIP ViT-bigG at full size, plainsd's conditioner holding transformers' own tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from plainsd.models.sdxl import SDXLTextEncoder
    from tests.reference import hf_text_kwargs, perturb

    config = preset("sdxl")
    torch.manual_seed(0)
    text = perturb(CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text))), 1, scale=0.02)
    text2 = perturb(CLIPTextModelWithProjection(CLIPTextConfig(**hf_text_kwargs(config.text2))), 2, scale=0.02)
    with torch.device("meta"):
        ours = SDXLTextEncoder(config)
    state = {**{"embedders.0.transformer." + k: v for k, v in text.state_dict().items()},
             **{"embedders.1.model." + k: v for k, v in text2.state_dict().items()}}
    ours.load_state_dict({k: v for k, v in state.items() if "position_ids" not in k}, strict=True, assign=True)
    ids_l, ids_g = _ids()
    with torch.no_grad():
        want_states, want_pooled = sdxl_text_reference(text, text2, ids_l, ids_g)
        states, pooled = ours.encode(ids_l)
    d = max(max_diff(states, want_states), max_diff(pooled, want_pooled))
    record_parity("text towers sdxl (ViT-L + ViT-bigG) vs transformers, full size", d)
    assert d <= 1e-4, d
