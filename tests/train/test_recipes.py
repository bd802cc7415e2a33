"""Smoke training of all three networks on tiny configs: the loss goes down, resume continues, the result loads."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd.images import to_pil, to_tensor
from plainsd.train.data import BACKGROUNDS, SHAPES, ShapesDataset
from plainsd.pipeline import txt2img
from plainsd.train.loop import TrainConfig
from plainsd.weights import load_tiny_decoder
from plainsd.train.recipes import control_hint, controlnet_from_unet, train_controlnet
from plainsd.train.recipes import generated_latents, sample_posterior, object_weights, weighted_l1, load_clip, load_vae, train_clip, train_taesd, train_unet, train_vae, train_vae_decoder

TINY = {"text": {"width": 64, "layers": 2, "heads": 1, "projection_dim": 32},
        "vae": {"ch": 16, "ch_mult": [1, 1, 1, 2], "num_res_blocks": 1, "norm_groups": 8},
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_levels": [1], "num_heads": 2, "context_dim": 64,
                 "norm_groups": 8},
        "vision": {"width": 32, "layers": 1, "heads": 1, "projection_dim": 32}}
DATA = {"kind": "shapes", "seed": 0, "length": 8}  # a few images: the loss must fall quickly


def _cfg(tmp_path, network, steps, **kw):
    return TrainConfig(network=network, steps=steps, batch_size=8, lr=kw.pop("lr", 2e-3), checkpoint_every=10,
                       out=str(tmp_path / network), model=TINY, data=DATA, **kw)


def _falls(losses, k=5):
    return sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k


def test_three_trainings_and_a_resume(tmp_path):
    vae = train_vae(_cfg(tmp_path, "vae", 30), progress=False)
    assert _falls(vae["losses"]), vae["losses"]
    model, scale = load_vae(tmp_path / "vae" / "vae.safetensors")
    assert 0.01 < scale < 100

    # fast mode's tiny decoder, distilled from the VAE's latents back to the images
    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "width": 16, "latent_cache": 8}
    taesd = train_taesd(_cfg(tmp_path, "taesd", 30, extra=extra, lr=5e-3), progress=False)
    assert _falls(taesd["losses"]), taesd["losses"]
    assert load_tiny_decoder(tmp_path / "taesd" / "taesd.safetensors").width == 16

    # the decoder fine-tuned on the frozen encoder's latents: the encoder and the latent scale stay as they were
    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "latent_cache": 8}
    train_vae_decoder(_cfg(tmp_path, "vae-decoder", 40, extra=extra, lr=1e-3), progress=False)
    refined, refined_scale = load_vae(tmp_path / "vae-decoder" / "vae.safetensors")
    images = torch.cat([to_tensor(ShapesDataset(length=8, seed=0)[i][0]) for i in range(8)])  # DATA's images
    with torch.no_grad():  # (the loss per step is too noisy to compare: the young VAE's posteriors are wide)
        error = [float((v.decode(v.encode(images).mode()) - images).abs().mean()) for v in (model, refined)]
    assert error[1] < 0.9 * error[0], error
    assert refined_scale == scale
    assert all(torch.equal(a, b) for a, b in zip(refined.encoder.state_dict().values(), model.encoder.state_dict().values()))
    assert not torch.equal(refined.decoder.conv_out.weight, model.decoder.conv_out.weight)

    clip = train_clip(_cfg(tmp_path, "clip", 30), progress=False)
    assert _falls(clip["losses"]), clip["losses"]
    text, vision, temperature = load_clip(tmp_path / "clip" / "clip.safetensors")
    assert text.config.width == 64 and temperature > 1

    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "clip": str(tmp_path / "clip" / "clip.safetensors")}
    extra["latent_cache"] = 8
    first = train_unet(_cfg(tmp_path, "unet", 20, extra=extra, ema_decay=0.9), progress=False)
    resumed = train_unet(_cfg(tmp_path, "unet", 40, extra=extra, ema_decay=0.9), resume=True, progress=False)
    assert resumed["losses"][:20] == first["losses"] and len(resumed["losses"]) == 40
    assert _falls(resumed["losses"], 10), resumed["losses"]
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["steps"] == 40

    # going on from a whole checkpoint (extra.init) with the objects' latent pixels weighted: it starts from
    # that checkpoint's UNet (at lr 0 it stays there) and takes the weighted loss
    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "init": str(tmp_path / "unet" / "model.safetensors"),
             "latent_cache": 8, "object_weight": 5}
    still = train_unet(_cfg(tmp_path, "unet-objects", 2, extra=extra, lr=0.0, ema_decay=0.0), progress=False)
    assert len(still["losses"]) == 2
    a, b = (plainsd.load(tmp_path / d / "model.safetensors").unet.state_dict() for d in ("unet", "unet-objects"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # extra.snr_gamma reaches the loss: the same draws, the nearly clean timesteps weighted less (never more)
    snr = train_unet(_cfg(tmp_path, "unet-snr", 2, extra={**extra, "snr_gamma": 5}, lr=0.0, ema_decay=0.0), progress=False)
    assert all(w <= p for w, p in zip(snr["losses"], still["losses"])) and snr["losses"] != still["losses"]
    with pytest.raises(ValueError, match="extra.snr_gamma must be a positive number"):
        train_unet(_cfg(tmp_path, "unet-snr0", 2, extra={**extra, "snr_gamma": 0}), progress=False)

    sd = plainsd.load(tmp_path / "unet" / "model.safetensors")  # the exported model loads and draws
    assert sd.config.scale_factor == scale and sd.config.resolution == 64
    assert txt2img(sd, "a red circle", steps=2, seed=0).images[0].size == (64, 64)
    assert torch.equal(sd.text_encoder.text_model.final_layer_norm.weight, text.text_model.final_layer_norm.weight.half().float())

    # the sampler's latents, made many captions at a time, are the ones txt2img decodes for the same seed
    z = generated_latents(sd, ["a red circle", "a blue square"], seed=5, steps=4)
    for caption, seed, latent in (("a red circle", 5, z[:1]), ("a blue square", 6, z[1:])):
        drawn = txt2img(sd, caption, steps=4, seed=seed, sampler="DPM++ 2M", schedule="karras", cfg_scale=5).images[0]
        mine = to_pil(sd.vae.decode(latent / sd.config.scale_factor))[0]
        assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(mine, dtype=int)).max() <= 1
    # and a tiny decoder trained half on such latents, against the VAE decoder's pictures of them
    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "width": 16, "latent_cache": 8,
             "model": str(tmp_path / "unet" / "model.safetensors"), "generated": 8}
    taesd = train_taesd(_cfg(tmp_path, "taesd-generated", 30, extra=extra, lr=5e-3), progress=False)
    assert _falls(taesd["losses"]), taesd["losses"]

    # shipping: fp16 weights that carry their recommended settings, and a card written from the runs
    from plainsd.train import ship
    (tmp_path / "eval.json").write_text(json.dumps({"vae_psnr_db": 20.5, "single_object": {"colour_and_shape": 0.5},
                                                    "settings": {"steps": 20}}))
    ship.main(["--runs", str(tmp_path), "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "base.safetensors")])
    shipped = plainsd.load(tmp_path / "base.safetensors")
    assert shipped.defaults == ship.RECOMMENDED
    assert shipped.tiny_decoder_path == tmp_path / "base.taesd.safetensors"  # shipped beside it, found by load
    text = (tmp_path / "base.md").read_text()
    assert "| unet | 40 | 8 |" in text and "| VAE reconstruction PSNR (dB) | 20.5 |" in text
    assert "| vae-decoder | 40 | 8 |" in text and "| unet-objects | 2 | 8 |" in text and "the sum of the 5 runs" in text
    assert "The -objects runs go on from the run before them" in text
    assert torch.equal(shipped.vae.decoder.conv_out.weight, refined.decoder.conv_out.weight.half().float())
    assert torch.equal(shipped.vae.encoder.conv_in.weight, model.encoder.conv_in.weight.half().float())
    assert "| single object: colour and shape | 0.5 |" in text
    result = txt2img(shipped, "a red circle", seed=0)  # the plain call uses the model's own settings
    assert result.parameters.steps == 20 and result.parameters.cfg_scale == 5.0 and result.images[0].size == (64, 64)

    # shipping again with the VAE of that shipped model (only CLIP and the UNet retrained): its weights and its
    # card's rows carried over, the UNet the runs'
    (tmp_path / "vae-decoder" / "vae.safetensors").unlink()  # not read
    ship.main(["--runs", str(tmp_path), "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "again.safetensors"),
               "--vae-from", str(tmp_path / "base.safetensors")])
    again = plainsd.load(tmp_path / "again.safetensors")
    assert all(torch.equal(v, shipped.vae.state_dict()[k]) for k, v in again.vae.state_dict().items())
    assert all(torch.equal(v, shipped.unet.state_dict()[k]) for k, v in again.unet.state_dict().items())
    rows = [line for line in text.splitlines() if line.startswith("| vae")]
    assert rows and all(row in (tmp_path / "again.md").read_text() for row in rows)


def test_load_vae_reads_a_whole_checkpoint_and_load_clip_says_what_is_missing(tmp_path):
    sd = plainsd.build("tiny")
    path = plainsd.save(sd, tmp_path / "model.safetensors")
    vae, scale = load_vae(path)
    assert scale == sd.config.scale_factor
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x).mode()), sd.vae.decode(sd.vae.encode(x).mode()))
    with pytest.raises(ValueError, match="not a CLIP written by `plainsd train clip`"):
        load_clip(path)


def test_every_shipped_recipe_is_a_valid_config_of_a_known_training():
    from pathlib import Path

    from plainsd.train.recipes import RECIPES

    folder = Path(plainsd.__file__).parent / "data" / "recipes"
    for path in sorted(folder.glob("*.json")):
        cfg = TrainConfig.from_file(path)
        if not path.name.startswith("finetune-"):  # NETWORK.json, NETWORK-STAGE.json for a later stage, controlnet-HINT
            hint = f"{cfg.network}-{cfg.extra.get('hint')}"
            stems = (cfg.network, f"{cfg.network}-objects", hint, f"{hint}-shapeless", f"{hint}-contradicting",
                     f"{hint}-cubic", f"{cfg.network}-{cfg.extra.get('objective')}")
            assert cfg.network in RECIPES and path.stem in stems, path.name
    # `plainsd train NET` finds its recipe (`plainsd train controlnet`: the canny one)
    assert {p.stem for p in folder.glob("*.json")} >= set(RECIPES) - {"controlnet"} | {"controlnet-canny"}


def test_object_weights_mark_the_objects_pixels():
    from plainsd.eval.metrics import held_out_scenes
    from plainsd.train.data import render

    scenes = held_out_scenes(6, 1)
    images = torch.cat([to_tensor(render(s, 64)) for s in scenes])
    w = object_weights(images, 10.0)
    assert w.shape == (6, 1, 64, 64) and set(w.unique().tolist()) == {1.0, 10.0}
    for s, wi, im in zip(scenes, w, images):
        background = torch.tensor(BACKGROUNDS[s.background], dtype=torch.float32) / 127.5 - 1
        exact = (im - background[:, None, None]).abs().amax(0) > 0.1  # the render knows its own background colour
        assert torch.equal(wi[0] == 10, exact)
        share = float(exact.float().mean())
        assert (0.01 < share < 0.08) if s.objects[0].size == "small" else (0.05 < share < 0.3)
    pred, target = torch.zeros(6, 3, 64, 64), images
    assert torch.allclose(weighted_l1(pred, target), torch.nn.functional.l1_loss(pred, target))
    assert torch.allclose(weighted_l1(pred, target, torch.full_like(w, 3.0)), torch.nn.functional.l1_loss(pred, target))
    # all the weight on the objects: the loss is the error on the objects' pixels alone
    on = (w == 10).expand_as(target)
    assert torch.allclose(weighted_l1(pred, target, (w == 10).float()), (pred - target).abs()[on].mean())


def test_hard_negative_batches_group_scenes_that_differ_in_one_attribute_and_mark_every_fitting_pair():
    import random

    from plainsd.train.data import Obj, Scene
    from plainsd.train.data import clip_targets, fits, hard_negative_batch, hard_negative_scenes

    def scene(caption, stated, background="blue", **attrs):
        o = {"shape": "circle", "colour": "red", "size": "small", "position": "left", **attrs}
        return Scene([Obj(**o)], background, caption, [set(stated)])

    said = scene("a red circle on the left", {"shape", "colour", "position"})
    assert fits(said, scene("", {"shape"}, size="large"))  # the size is left out: either size fits
    assert not fits(said, scene("", {"shape"}, shape="square"))
    assert not fits(said, scene("", {"shape"}, position="right"))
    on_blue = scene("a red circle on the left on blue", {"shape", "colour", "position"})
    assert fits(said, scene("", {"shape"}, background="green"))
    assert not fits(on_blue, scene("", {"shape"}, background="green"))  # a named background must match
    # the loss's targets: each caption's own picture, and every other picture it fits (not the reverse here:
    # a picture of a large circle on green is not what "a red circle on the left on blue" asks for)
    large = scene("a large red circle on the left", {"shape", "colour", "size", "position"}, "green", size="large")
    assert clip_targets([said, large, on_blue]).tolist() == [[1, 1, 1], [0, 1, 0], [1, 0, 1]]

    ds = ShapesDataset(seed=0)
    scenes = hard_negative_scenes(ds, random.Random(0), groups=5, group=4)
    for g in range(0, 20, 4):
        base = scenes[g].objects[0]
        for v in scenes[g + 1:g + 4]:
            o = v.objects[0]
            changed = [k for k in ("shape", "colour", "size", "position") if getattr(o, k) != getattr(base, k)]
            assert len(changed) == 1 and changed[0] != "colour", changed
            assert v.background == scenes[g].background and v.stated == scenes[g].stated

    cfg = TrainConfig(network="clip", steps=1, batch_size=16, seed=3)
    images, captions, target = hard_negative_batch(ds, cfg, 0, 0, fraction=0.5, group=4)
    assert images.shape == (16, 3, 64, 64) and len(captions) == 16 and target.shape == (16, 16)
    assert torch.equal(target.diagonal(), torch.ones(16))
    again = hard_negative_batch(ds, cfg, 0, 0, fraction=0.5, group=4)
    assert again[1] == captions and torch.equal(again[0], images) and torch.equal(again[2], target)


def test_hard_negatives_are_checked(tmp_path):
    cfg = _cfg(tmp_path, "clip", 1, extra={"hard_negatives": 0.5, "vary": ["colour"]})
    with pytest.raises(ValueError, match="extra.vary a list of shape, size, position"):
        train_clip(cfg, progress=False)
    folder = tmp_path / "pics"
    folder.mkdir()
    to_pil(torch.zeros(1, 3, 64, 64))[0].save(folder / "a.png")
    (folder / "a.txt").write_text("a black picture")
    cfg = _cfg(tmp_path, "clip", 1, extra={"hard_negatives": 0.5})
    cfg.data = {"kind": "folder", "path": str(folder)}
    with pytest.raises(ValueError, match="needs the shapes data"):
        train_clip(cfg, progress=False)


def test_the_vae_recipe_weights_the_objects_pixels_when_asked(tmp_path):
    # lr 0, one step: the recorded loss is the object-weighted L1 (plus the KL) of the initial VAE, by hand
    from plainsd.models.vae import AutoencoderKL
    from plainsd.train.recipes import batch, dataset, model_config

    cfg = _cfg(tmp_path, "vae", 1, lr=0.0, extra={"object_weight": 10, "kl_weight": 0.0}, ema_decay=0.0)
    loss = train_vae(cfg, progress=False)["losses"][0]
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(model_config(cfg).vae)
    x, _ = batch(dataset(cfg, 64), cfg, 0, 0)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).sample(torch.Generator().manual_seed(0)))
    w = object_weights(x, 10.0)
    assert abs(loss - float(weighted_l1(recon, x, w))) < 1e-5
    assert abs(loss - float(weighted_l1(recon, x))) > 1e-3  # and that is not the plain L1


def test_posterior_samples_with_noise_draw_a_noise_level_per_sample():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.full((4000, 4, 8, 8), 0.5), torch.zeros(4000, 4, 8, 8)
    assert torch.equal(sample_posterior(mean, std, g), mean)  # no noise asked, no posterior spread: the mean
    added = sample_posterior(mean, std, g, 0.3) - mean
    per_sample = added.std(dim=(1, 2, 3))
    assert float(per_sample.max()) < 0.3 * 1.2 and float(per_sample.min()) < 0.02  # levels spread over [0, 0.3]
    # the uniform level's mean square is 0.3**2 / 3, so the added noise's overall std is 0.3 / sqrt(3)
    assert abs(float(added.std()) - 0.3 / 3 ** 0.5) < 0.005


def test_decoder_recipe_refuses_negative_latent_noise(tmp_path):
    train_vae(_cfg(tmp_path, "vae", 1), progress=False)
    extra = {"vae": str(tmp_path / "vae" / "vae.safetensors"), "latent_cache": 8, "latent_noise": -0.1}
    with pytest.raises(ValueError, match="latent_noise must be >= 0"):
        train_vae_decoder(_cfg(tmp_path, "vae-decoder", 2, extra=extra), progress=False)


def test_an_sdxl_controlnet_copies_the_vectors_embedding_too():
    from plainsd.models.controlnet import ControlNet

    unet = plainsd.build("tiny-sdxl", seed=0).unet
    controlnet = controlnet_from_unet(unet, ControlNet)
    assert torch.equal(controlnet.label_emb[0][0].weight, unet.label_emb[0][0].weight)


def test_controlnet_recipe_starts_from_the_base_model_and_exports_the_original_layout(tmp_path):
    from safetensors import safe_open

    from plainsd.models.controlnet import ControlNet
    from plainsd.weights import load_controlnet

    base = plainsd.build("tiny", seed=0)
    # the copy: the UNet's own tensors, and residuals of zero, so the first step trains from the base model exactly
    controlnet = controlnet_from_unet(base.unet, ControlNet)
    unet_state = base.unet.state_dict()
    for k, v in controlnet.state_dict().items():
        if k.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(v, unet_state[k]), k
        elif k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")):
            assert not v.any(), k
    assert controlnet.input_hint_block[0].weight.abs().sum() > 0
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 700])
    context = base.text_encoder(base.tokenizer(["a red circle", ""]))
    hint = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(base.unet(x, t, context, control=controlnet(x, hint, t, context)), base.unet(x, t, context))

    path = plainsd.save(base, tmp_path / "base.safetensors")
    cfg = TrainConfig(network="controlnet", steps=6, batch_size=4, lr=1e-3, checkpoint_every=3, out=str(tmp_path / "cn"),
                      data={"kind": "shapes", "seed": 0, "length": 8},
                      extra={"base": str(path), "latent_cache": 8, "colour_caption": 0.5})
    first = train_controlnet(cfg, progress=False)
    resumed = train_controlnet(dataclasses.replace(cfg, steps=8), resume=True, progress=False)
    assert resumed["losses"][:6] == first["losses"] and len(resumed["losses"]) == 8
    # the file: keys are the module names (lllyasviel's layout without a prefix), float16, with the recipe
    f = safe_open(str(tmp_path / "cn" / "controlnet.safetensors"), framework="pt")
    assert set(f.keys()) == set(controlnet.state_dict())
    assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert json.loads(f.metadata()["plainsd.recipe"])["extra"]["latent_cache"] == 8
    trained = load_controlnet(tmp_path / "cn" / "controlnet.safetensors")  # strict, its config the base UNet's
    assert trained.config == base.unet.config
    assert trained.zero_convs[0][0].weight.abs().sum() > 0  # it learnt something
    # the base model stayed as it was (frozen): the file it came from is untouched and nothing else was written
    assert sorted(p.name for p in (tmp_path / "cn").iterdir()) == ["checkpoint.safetensors", "config.json",
                                                                  "controlnet.safetensors"]
    # captions of colours alone need the shapes world's scenes, which a folder of pictures does not have
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    folder = dataclasses.replace(cfg, data={"kind": "folder", "path": str(tmp_path)}, out=str(tmp_path / "cn2"))
    with pytest.raises(ValueError, match="extra.colour_caption needs the shapes data"):
        train_controlnet(folder, progress=False)


def test_control_hints_are_canny_at_the_processor_resolution_brought_back_to_the_picture():
    from plainsd import detectors
    from plainsd.train.data import ShapesDataset

    picture = ShapesDataset(length=1, seed=3)[0][0]
    own = control_hint(picture, "canny", 64)
    assert own.shape == (1, 3, 64, 64)
    assert torch.equal(own, to_tensor(detectors.canny(picture)) * 0.5 + 0.5)  # at the picture's size: canny itself
    near = torch.nn.functional.max_pool2d(own[:, :1], 5, 1, 2) > 0  # within 2 pixels of canny's edges at 64
    for resolution in (128, 512):  # edges found on the picture grown to the processor resolution, shrunk back
        hint = control_hint(picture, "canny", resolution)
        assert hint.shape == (1, 3, 64, 64) and set(hint.unique().tolist()) == {0.0, 1.0}  # crisp, as fit keeps them
        assert not hint[0, 0][~near[0, 0]].any() and hint[0, 0].sum() > 0.3 * own[0, 0].sum()
        assert torch.equal(hint, to_tensor(detectors.fit(detectors.detect("canny", picture, resolution), 64, 64)) * 0.5 + 0.5)


def test_controlnet_captions_empty_shapeless_or_whole():
    import random

    from plainsd.train.recipes import ControlNetSettings, _control_caption

    shapeless = ControlNetSettings(empty_caption=0.0, shapeless_caption=1.0)
    assert _control_caption("a red circle on the left", random.Random(0), shapeless) == "a red on the left"
    assert _control_caption("red circle, left side, on blue", random.Random(0), shapeless) == "red, left side, on blue"
    assert _control_caption("a big red diamond and a blue cross", random.Random(0), shapeless) == "a big red and a blue"
    whole = ControlNetSettings(empty_caption=0.0, shapeless_caption=0.0)
    assert _control_caption("a red circle", random.Random(0), whole) == "a red circle"
    empty = ControlNetSettings(empty_caption=1.0, shapeless_caption=1.0)
    assert _control_caption("a red circle", random.Random(0), empty) == ""
    half = ControlNetSettings(empty_caption=0.5, shapeless_caption=0.5)
    rng = random.Random(1)
    kinds = [_control_caption("a red circle", rng, half) for _ in range(4000)]
    assert abs(kinds.count("") / 4000 - 0.5) < 0.03 and abs(kinds.count("a red") / 4000 - 0.25) < 0.03
    swapped = ControlNetSettings(empty_caption=0.0, contradicting_caption=1.0)
    for seed in range(20):
        caption = _control_caption("a big red diamond and a blue cross", random.Random(seed), swapped)
        first, second = re.fullmatch(r"a big red (\w+) and a blue (\w+)", caption).groups()
        assert first in SHAPES and second in SHAPES and first != "diamond" and second != "cross"
    with pytest.raises(ValueError, match="extra.shapeless_caption must be a fraction"):
        ControlNetSettings(shapeless_caption=1.5).check()


def test_controlnet_captions_naming_only_colours():
    import random

    from plainsd.train.data import ShapesDataset
    from plainsd.train.recipes import ControlNetSettings, _colours_only, _control_caption

    ds = ShapesDataset(seed=2)
    one, two = (next(ds.scene(i) for i in range(100) if len(ds.scene(i).objects) == n) for n in (1, 2))
    assert _colours_only(one) == f"a {one.objects[0].colour}"
    assert _colours_only(two) == f"a {two.objects[0].colour} and a {two.objects[1].colour}"
    colours = ControlNetSettings(empty_caption=0.5, colour_caption=0.5, shapeless_caption=1.0)
    rng = random.Random(3)
    kinds = [_control_caption("a red circle on the left", rng, colours, "a red") for _ in range(4000)]
    assert abs(kinds.count("") / 4000 - 0.5) < 0.03 and abs(kinds.count("a red") / 4000 - 0.25) < 0.03
    assert abs(kinds.count("a red on the left") / 4000 - 0.25) < 0.03
    # without colour captions the draws are those of the recipes trained before them
    before = ControlNetSettings(empty_caption=0.5, shapeless_caption=0.5)
    assert ([_control_caption("a red circle", random.Random(s), before) for s in range(50)]
            == [_control_caption("a red circle", random.Random(s), before, "a red") for s in range(50)])
