"""Fast mode: DeepCache, the guidance cut-off and the tiny (TAESD) decoder, each checked against what it must equal."""

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from tests.reference import perturb
from plainsd import fast, runtime
from plainsd.images import to_pil
from plainsd.models.taesd import TinyDecoder
from plainsd.pipeline import HiresFix, txt2img
from plainsd.weights import CheckpointError, load_tiny_decoder


def _model(seed=0):
    return perturb(plainsd.build("tiny", seed=seed), seed)  # no zero-initialised layer hides a difference


def test_deepcache_reuses_exactly_the_deep_features():
    sd = _model()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        reference = sd.unet(x, t, c)
        every = fast.DeepCacheUNet(sd.unet, interval=1)
        assert torch.equal(every(x, t, c), reference) and torch.equal(every(x, t, c), reference)
        cached = fast.DeepCacheUNet(sd.unet, interval=3, depth=1)
        assert torch.equal(cached(x, t, c), reference)
        # a cheap call on the same inputs: the kept deep features are the ones a full pass would compute
        assert torch.allclose(cached(x, t, c), reference, atol=1e-6)
        other = cached(torch.randn(2, 4, 8, 8), torch.tensor([400.0, 400.0]), c)  # cheap, and it is not the full answer
        assert not torch.allclose(other, reference, atol=1e-3)
        assert cached.full_calls == 1 and cached.calls == 3
        cached(x[:1], t[:1], c[:1])  # a new batch shape (guidance switched off): a full pass
        assert cached.full_calls == 2
    with pytest.raises(ValueError, match="DeepCache needs"):
        fast.DeepCacheUNet(sd.unet, interval=0)
    with pytest.raises(ValueError, match="DeepCache needs"):
        fast.DeepCacheUNet(sd.unet, warmup=-1)


def test_deepcache_runs_the_unets_own_steps():
    """Whole passes are UNetModel.forward to the bit; a cheap call is the UNet's first `depth` input blocks and
    last `depth` output blocks, run on the features a whole pass kept at the entry of the first of those."""
    unet = _model().unet
    c = torch.randn(2, 77, 128)
    x, x2 = torch.randn(2, 4, 9, 13), torch.randn(2, 4, 9, 13)  # 9x13: the upsampling follows the skips' sizes
    t, t2 = torch.tensor([700.0, 700.0]), torch.tensor([600.0, 600.0])
    n = len(unet.output_blocks)
    for depth in range(1, n):
        cached = fast.DeepCacheUNet(unet, interval=2, depth=depth)
        with torch.no_grad():
            assert torch.equal(cached(x, t, c), unet(x, t, c)) and cached.full_calls == 1
            cheap = cached(x2, t2, c)
            assert cached.full_calls == 1
            emb = unet.embed_timesteps(t, 2)
            skips = unet.run_input_blocks(x, emb, c)
            kept = unet.run_output_blocks(unet.middle_block(skips[-1], emb, c), skips, emb, c, stop=n - depth)
            emb2 = unet.embed_timesteps(t2, 2)
            outer = unet.run_input_blocks(x2, emb2, c, stop=depth)
            assert torch.equal(cheap, unet.out(unet.run_output_blocks(kept, outer, emb2, c, start=n - depth)))
            assert torch.equal(cached(x2, t2, c), unet(x2, t2, c)) and cached.full_calls == 2  # whole again


def _count_calls(sd):
    batches, full = [], []
    sd.unet.input_blocks[0].register_forward_hook(lambda m, i, o: batches.append(o.shape[0]))
    sd.unet.middle_block.register_forward_hook(lambda m, i, o: full.append(len(batches) - 1))  # which call
    return batches, full


def test_fast_generation_skips_what_it_says():
    sd = _model(1)
    batches, full = _count_calls(sd)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5)
    assert batches == [2] * 10 and len(full) == 10  # exact path: CFG on every step, every UNet pass whole
    batches.clear(), full.clear()
    settings = fast.FastSettings(deepcache_interval=3, guidance_until=0.6, tiny_decoder=False)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, fast=settings)
    assert batches == [2] * 6 + [1] * 4            # guidance for the first 60% of the steps
    assert len(full) == 4                          # whole passes at calls 0, 3, the batch change at 6, and 9
    batches.clear(), full.clear()
    settings = fast.FastSettings(deepcache_interval=3, deepcache_start=0.3, guidance_until=1.0, tiny_decoder=False)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, fast=settings)
    assert full == [0, 1, 2, 5, 8]                 # the first 30% whole, then every third call from the last of them
    batches.clear(), full.clear()
    settings = fast.FastSettings(deepcache_interval=3, deepcache_end=0.2, guidance_until=1.0, tiny_decoder=False)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, fast=settings)
    assert full == [0, 3, 6, 8, 9]                 # every third call, and the last 20% of the steps whole
    batches.clear(), full.clear()
    txt2img(sd, "a red circle", steps=5, sampler="Heun", seed=0, cfg_scale=5, fast=settings)
    assert len(batches) == 9 and full == [0, 3, 6, 7, 8]  # Heun: two calls a step (one on the last); the last step's whole
    # more blocks on the cheap calls of the first 40% of the steps: the switch to fewer refills the cache
    second = []
    sd.unet.input_blocks[1].register_forward_hook(lambda m, i, o: second.append(len(batches) - 1))
    batches.clear(), full.clear()
    settings = fast.FastSettings(deepcache_interval=3, deepcache_early=0.4, deepcache_early_depth=2,
                                 guidance_until=1.0, tiny_decoder=False)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, fast=settings)
    assert full == [0, 3, 4, 6, 9]                 # every third call, and call 4 where the depth changes
    assert second == [0, 1, 2, 3, 4, 6, 9]         # the second block: whole passes and the early cheap calls
    # the last 40% of the steps with their own interval, counted from the first of them
    batches.clear(), full.clear()
    settings = fast.FastSettings(deepcache_interval=2, deepcache_late=0.4, deepcache_late_interval=3,
                                 guidance_until=1.0, tiny_decoder=False)
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, fast=settings)
    assert full == [0, 2, 4, 6, 9]
    batches.clear(), full.clear()
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5, batch_size=2,
            fast=fast.FastSettings(deepcache_interval=3, deepcache_late=0.5, deepcache_late_interval=2, tiny_decoder=False))
    # the late part from call 5, and the batch change at 6 (guidance for 60%): counted from the last whole pass
    assert batches == [4] * 6 + [2] * 4 and full == [0, 3, 5, 6, 8]
    # the hires fix's second pass (5 steps) has its parts by its own steps, as its guidance cut-off does: the late
    # part is its last 2 calls (by the first pass's 10 steps it would have been its last 4)
    batches.clear(), full.clear()
    txt2img(sd, "a red circle", steps=10, sampler="DPM++ 2M", seed=0, cfg_scale=5,
            hires=HiresFix(scale=1.5, upscaler="Lanczos", steps=5, strength=0.5),
            fast=fast.FastSettings(deepcache_interval=2, deepcache_late=0.4, deepcache_late_interval=3, tiny_decoder=False))
    assert batches[10:] == [2, 2, 2, 1, 1] and [i - 10 for i in full if i >= 10] == [0, 2, 3]


def test_fast_and_tiny_decoder_switches_choose_the_parts():
    assert fast.choose(False) is None
    assert fast.choose(True) == fast.FAST == fast.FastSettings(deepcache_interval=2, deepcache_depth=1,
                                                            deepcache_early=0.4, deepcache_early_depth=2,
                                                            deepcache_late=0.4, deepcache_late_interval=4,
                                                            guidance_until=0.6, tiny_decoder=False)
    assert fast.choose(True, tiny_decoder=True) == fast.FastSettings(deepcache_early=0.4, deepcache_late=0.4,
                                                                     tiny_decoder=True)
    assert fast.choose(False, tiny_decoder=True) == fast.FastSettings(deepcache_interval=1, guidance_until=1.0,
                                                                      tiny_decoder=True)  # the decoder alone


def test_tiny_decoder_equals_diffusers_autoencoder_tiny(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    reference = AutoencoderTiny().eval()  # TAESD's configuration
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, diffusers_file)
    ours = load_tiny_decoder(diffusers_file)
    assert ours.width == 64
    latents = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        expected = reference.decode(latents).sample
        got = ours(latents) * 2 - 1
    assert (got - expected).abs().max() < 1e-5

    taesd_file = tmp_path / "taesd_decoder.safetensors"  # TAESD's own names: the nn.Sequential's indices
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, taesd_file)
    assert "1.weight" in ours.state_dict() and "3.conv.0.weight" in ours.state_dict()
    with torch.no_grad():
        assert torch.equal(load_tiny_decoder(taesd_file)(latents), ours(latents))

    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="is not a TAESD decoder"):
        load_tiny_decoder(tmp_path / "vae.safetensors")


def test_fast_mode_decodes_with_the_models_tiny_decoder(tmp_path):
    sd = _model(2)
    path = plainsd.save(sd, tmp_path / "m.safetensors")
    tiny = TinyDecoder(4, 16)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, tmp_path / "m.taesd.safetensors")
    loaded = plainsd.load(path)
    assert loaded.tiny_decoder_path == tmp_path / "m.taesd.safetensors"
    seen = []
    settings = fast.choose(False, tiny_decoder=True)  # --tiny-decoder without --fast
    engine = runtime.Engine(loaded)
    result = txt2img(engine, "a red circle", steps=3, sampler="DPM++ 2M", seed=0, fast=settings,
                     callback=lambda info: seen.append(info.denoised))
    assert engine.tiny_decoder.width == 16  # loaded from the file beside the checkpoint, kept by the engine
    assert "tiny_decoder" not in dict(loaded.named_children())  # not part of the model (not saved with it)
    with torch.no_grad():  # DPM++ 2M ends on its last estimate: the picture is the tiny decoder's view of it
        expected = to_pil(tiny.decode(seen[-1]))[0]
    assert result.images[0].tobytes() == expected.tobytes()
    exact = txt2img(loaded, "a red circle", steps=3, sampler="DPM++ 2M", seed=0)
    assert result.images[0].tobytes() != exact.images[0].tobytes()
    assert "Decoder: TAESD" in result.infotexts[0] and "Decoder" not in exact.infotexts[0]  # the parameters say so
