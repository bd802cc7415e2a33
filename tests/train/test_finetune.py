"""DreamBooth, textual inversion and LoRA on a tiny model: what each trains, what it writes, resume."""

import dataclasses

import pytest
import torch

import plainsd
from plainsd import lora
from plainsd.cli import main
from plainsd.embeddings import read_embedding
from plainsd.pipeline import txt2img
from plainsd.train.finetune import finetune
from plainsd.train.loop import TrainConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "base.safetensors"
    plainsd.save(plainsd.build("tiny", seed=0), path)
    return path


def config(base, out, method, steps=4, **extra):
    return TrainConfig(network=method, steps=steps, batch_size=2, lr=1e-2, checkpoint_every=2, out=str(out),
                       data={"kind": "shapes", "shapes": ["star"]},
                       extra={"model": str(base), "num_instance_images": 3, **extra})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_textual_inversion_learns_only_its_vectors(base, tmp_path):
    r = finetune(config(base, tmp_path, "textual-inversion", instance_prompt="a sks-star", token="sks-star",
                        init_word="circle", vectors=2), progress=False)
    emb = read_embedding(tmp_path / "sks-star.safetensors")
    sd = plainsd.load(base)
    start = sd.text_encoder.text_model.embeddings.token_embedding.weight[sd.tokenizer.encode("circle")[0]]
    assert emb.vectors.shape == (2, sd.config.text.width) and emb.step == 4
    assert not torch.allclose(emb.vectors[0], start)  # it moved from its initial word
    for a, b in zip(r["model"].state_dict().values(), sd.state_dict().values()):
        assert torch.equal(a, b)  # the model itself is untouched
    kw = dict(steps=2, seed=0, width=32, height=32)
    with_token = txt2img(sd, "a sks-star", embeddings_dir=tmp_path, **kw).images[0]
    assert with_token.tobytes() != txt2img(sd, "a sks-star", **kw).images[0].tobytes()
    with pytest.raises(ValueError, match="never mention the token"):
        finetune(config(base, tmp_path / "x", "textual-inversion", instance_prompt="a star", token="zz-thing"),
                 progress=False)


def test_lora_trains_adapters_in_kohya_format(base, tmp_path):
    r = finetune(config(base, tmp_path, "lora", instance_prompt="a sks star", rank=2, alpha=1.0,
                        train_text_encoder=True), progress=False)
    state = lora.read_lora(tmp_path / "lora.safetensors")
    assert any(k.startswith("lora_te_") for k in state.layers) and any(k.startswith("lora_unet_") for k in state.layers)
    assert all(layer.rank == 2 and layer.alpha == 1.0 for layer in state.layers.values())
    sd = plainsd.load(base)
    lora.merge(sd, state)  # the file fits the model it was trained on
    trained = r["model"]  # adapters still hooked: merged weights must act the same
    ids = sd.tokenizer(["a sks star"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = trained.unet(x, torch.tensor([400]), trained.text_encoder(ids))
        b = sd.unet(x, torch.tensor([400]), sd.text_encoder(ids))
    assert (a - b).abs().max() < 1e-2  # the file holds fp16 weights


def test_dreambooth_prior_preservation_and_exact_resume(base, tmp_path):
    extra = dict(instance_prompt="a sks star", class_prompts=["a red circle"], num_class_images=2, prior_weight=1.0)
    straight = finetune(config(base, tmp_path / "a", "dreambooth", **extra), progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "class_images").iterdir()) == ["0000.png", "0001.png"]
    finetune(config(base, tmp_path / "b", "dreambooth", steps=2, **extra), progress=False)
    resumed = finetune(config(base, tmp_path / "b", "dreambooth", **extra), resume=True, progress=False)
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    for a, b in zip(straight["model"].unet.parameters(), resumed["model"].unet.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    without = finetune(config(base, tmp_path / "c", "dreambooth", steps=1, instance_prompt="a sks star"), progress=False)
    assert without["losses"][0] < straight["losses"][0]  # the prior term adds its own loss
    model = plainsd.load(tmp_path / "a" / "model.safetensors")
    changed = max(float((p - q).abs().max()) for p, q in zip(model.unet.parameters(), plainsd.load(base).unet.parameters()))
    assert changed > 1e-3


def test_finetune_command(base, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 40 * i, 0)).save(data / f"{i}.png")
    (data / "0.txt").write_text("an orange thing")
    args = ["finetune", "lora", "--model", str(base), "--data", str(data), "--max-train-steps", "2", "--out",
            str(tmp_path / "run"), "--quiet", "--rank", "2", "--sample-every", "0"]
    assert main(args) == 2
    assert "no caption" in capsys.readouterr().err
    assert main(args + ["--instance-prompt", "a zwx thing"]) == 0
    assert f"wrote {tmp_path / 'run' / 'lora.safetensors'}" in capsys.readouterr().out
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    (tmp_path / "bad.json").write_text('{"network": "lora", "extra": {"rnak": 4}}')
    assert main(["finetune", "lora", "--config", str(tmp_path / "bad.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the lora recipe has no setting 'rnak' in extra (did you mean rank?); allowed: model," in err


@pytest.mark.parametrize("method", ["dreambooth", "textual-inversion", "lora"])
def test_shipped_recipes_teach_large_hearts(method):
    from pathlib import Path

    from plainsd.eval.judge import detect
    from plainsd.train.finetune import instance_data, settings

    recipe = Path(plainsd.__file__).parent / "data" / "recipes" / f"finetune-{method}.json"
    cfg = TrainConfig.from_file(recipe)
    s = settings(cfg)
    items = instance_data(cfg, s, 64)
    assert len(items) == s.num_instance_images
    for image, caption, _ in items:  # the judge reads every instance image as one large heart
        found = detect(image)[1]
        assert len(found) == 1 and (found[0].shape, found[0].size) == ("heart", "large")
        assert "heart" in caption
    assert cfg.network == method


def test_object_weight_marks_the_latent_pixels_an_object_touches():
    from plainsd.eval.metrics import held_out_scenes
    from plainsd.train.data import Crop, render
    from plainsd.train.finetune import _latents

    sd = plainsd.build("tiny", seed=0)
    scenes = held_out_scenes(3, 1)
    items = [(render(s, 64), s.caption, Crop(64, 64)) for s in scenes]
    mean, std, captions, weights, numbers = _latents(sd, items, 5.0)
    assert weights.shape == (3, 1, 8, 8) and set(weights.unique().tolist()) == {1.0, 5.0}
    for s, w in zip(scenes, weights):  # the object's centre (its position word) is a weighted latent pixel
        x, y = {"left": (2, 4), "right": (6, 4), "top": (4, 2), "bottom": (4, 6), "centre": (4, 4)}[s.objects[0].position]
        assert w[0, y, x] == 5.0 and w[0, 0, 0] == 1.0
    assert _latents(sd, items)[3] is None and captions == [s.caption for s in scenes] and numbers is None


def test_textual_inversion_recipe_for_a_concept_the_model_draws(base, tmp_path):
    """The shipped recipe renders one concept (a small orange diamond at the top on black) under one new token; the
    command trains it from the recipe's name; the file is A1111's; only prompts naming the token change."""
    from pathlib import Path

    from safetensors.torch import load_file

    from plainsd.eval.judge import detect
    from plainsd.train.finetune import instance_data, settings

    recipe = Path(plainsd.__file__).parent / "data" / "recipes" / "finetune-textual-inversion-thing.json"
    cfg = TrainConfig.from_file(recipe)
    s = settings(cfg)
    for image, caption, _ in instance_data(cfg, s, 64):
        background, found = detect(image)
        assert background == "black" and len(found) == 1
        assert (found[0].shape, found[0].colour, found[0].size, found[0].position) == ("diamond", "orange", "small", "top")
        assert caption == "a sks-thing"
    run = tmp_path / "run"
    args = ["finetune", "textual-inversion", "--config", "finetune-textual-inversion-thing", "--model", str(base),
            "--max-train-steps", "3", "--sample-every", "0", "--out", str(run), "--quiet"]
    assert main(args) == 0
    # A1111 reads a .safetensors embedding holding one tensor as that tensor's [n, width] vectors
    tensors = load_file(str(run / "sks-thing.safetensors"))
    sd = plainsd.load(base)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (s.vectors, sd.config.text.width)
    assert tensors["emb_params"].dtype == torch.float32
    kw = dict(steps=2, seed=0, width=32, height=32)
    for prompt in ("a red circle on the left", "sks thing"):  # not the token: bit-identical
        assert txt2img(sd, prompt, embeddings_dir=run, **kw).images[0].tobytes() == \
            txt2img(sd, prompt, **kw).images[0].tobytes(), prompt
    assert txt2img(sd, "a sks-thing", embeddings_dir=run, **kw).images[0].tobytes() != \
        txt2img(sd, "a sks-thing", **kw).images[0].tobytes()
    bad = dataclasses.replace(config(base, tmp_path / "x", "textual-inversion", instance_prompt="a sks-star",
                                     token="sks-star"), data={"kind": "shapes", "colors": ["red"]})
    with pytest.raises(ValueError, match="data.colors is not a setting of shapes data; allowed: seed, shapes, sizes, "
                                         "colours, positions, backgrounds"):
        finetune(bad, progress=False)
