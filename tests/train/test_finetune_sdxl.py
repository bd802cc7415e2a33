"""Fine-tuning an SDXL model: the training step's conditioning is generation's, the LoRA file is kohya's SDXL one
(read back by plainsd and by diffusers' StableDiffusionXLPipeline.load_lora_weights with the trained adapters'
effect), textual inversion writes clip_l and clip_g, DreamBooth writes a whole SDXL model, and what cannot be done is
refused in one sentence."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import plainsd
from plainsd import lora
from plainsd.cli import main
from plainsd.diffusion.denoisers import training_loss
from plainsd.embeddings import load_embeddings
from plainsd.request import GenerationRequest
from plainsd.runtime import Engine
from plainsd import pipeline
from plainsd.train.data import Crop
from plainsd.train.finetune import (Trainable, _latents, _unet_net, finetune, instance_data, settings,
                                    size_conditions, text_conditioning, trainable)
from plainsd.train.loop import TrainConfig
from tests.reference import build_diffusers_sdxl, max_diff, perturb, write_diffusers_sdxl_folder
from tests.test_configs import test_config
from tests.test_lora_sdxl import _pipe, compare
from tests.test_pipeline_sdxl import Spy


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(diffusers folder of a tiny random SDXL base, the diffusers / transformers networks it was written from)."""
    nets = build_diffusers_sdxl(test_config("tiny-sdxl"), seed=3)
    return write_diffusers_sdxl_folder(tmp_path_factory.mktemp("xl"), *nets), nets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> a tiny random SDXL base / refiner saved as one file."""
    root = tmp_path_factory.mktemp("xlfiles")
    out = {}
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):
        out[name] = root / f"{name}.safetensors"
        plainsd.save(perturb(plainsd.build(name, seed=0), 0), out[name])
    return out


def config(base, out, method, steps=3, **extra):
    return TrainConfig(network=method, steps=steps, batch_size=2, lr=1e-2, checkpoint_every=2, out=str(out),
                       data={"kind": "shapes", "shapes": ["star"]},
                       extra={"model": str(base), "num_instance_images": 2, **extra})


def _spied_conditioning(sd, prompt, width, height, **kw):
    """(text states, vector) the txt2img pipeline gives the UNet for the prompt (the conditional half of CFG)."""
    spy = Spy(sd.unet)
    request = GenerationRequest(prompt=prompt, seed=1, steps=1, sampler="Euler", width=width, height=height, **kw)
    pipeline.generate(Engine(sd, unet=spy), request)
    context, y = spy.calls[0]
    return context[1:], y[1:]


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_training_conditioning_is_generations(files, name):
    """For the same prompt and picture size, the training step's conditioning (text states, pooled text, size
    numbers: the refiner's aesthetic score) is bit for bit what txt2img gives the UNet."""
    sd = plainsd.load(files[name])
    trained = Trainable({})
    cond = text_conditioning(sd, trained, ["a red circle"], size_conditions(sd, [Crop(64, 48)], 64, 48))
    context, y = _spied_conditioning(sd, "a red circle", 64, 48)
    assert max_diff(cond["crossattn"], context) == 0 and max_diff(cond["vector"], y) == 0
    other = text_conditioning(sd, trained, ["a red circle"], size_conditions(sd, [Crop(64, 64)], 64, 64))
    assert max_diff(other["vector"], y) > 0.1  # the size is in the vector


def test_rows_of_a_batch_give_the_whole_batchs_loss(files):
    """Data-parallel training's split: each process encodes its rows of SDXL's conditioning, and the rows' losses
    average to the whole batch's."""
    sd = plainsd.load(files["tiny-sdxl"])
    captions = ["a red circle", "a blue square on the left"]
    numbers = size_conditions(sd, [Crop(64, 64), Crop(80, 40, 0, 32)], 64, 64)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss(rows):
        cond = text_conditioning(sd, Trainable({}), captions, numbers, rows)
        with torch.no_grad():
            return float(training_loss(_unet_net(sd.unet), z, cond, generator=torch.Generator().manual_seed(2),
                                       rows=rows))
    first, second = loss(slice(0, 1)), loss(slice(1, 2))
    assert (first + second) / 2 == pytest.approx(loss(None), rel=1e-5) and abs(first - second) > 1e-3


def test_folder_pictures_give_their_source_size_and_crop(files, tmp_path):
    """An 80x40 picture trained at 64: scaled to 128x64, its centre kept from x = 32; the UNet is told original size
    (40, 80), crop (0, 32), target size (64, 64), as diffusers' SDXL trainer tells it."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (80, 40), (200, 40, 0)).save(data / "wide.png")
    Image.new("RGB", (30, 90), (0, 40, 200)).save(data / "tall.png")
    cfg = TrainConfig(network="lora", data={"kind": "folder", "path": str(data)}, extra={"instance_prompt": "a thing"})
    sd = plainsd.load(files["tiny-sdxl"])
    numbers = _latents(sd, instance_data(cfg, settings(cfg), 64))[4]
    assert numbers.tolist() == [[90, 30, 64, 0, 64, 64], [40, 80, 0, 32, 64, 64]]  # (files in name order)


def test_lora_file_is_kohyas_sdxl_and_diffusers_reads_it(xl, tmp_path):
    """LoRA on the UNet and both towers: the file holds exactly the adapters under the kohya SDXL names the reader
    maps to the very layers they were trained on; merged by plainsd it gives what the trained adapters gave; diffusers
    loads and fuses it to the same UNet output and text states."""
    folder, nets = xl
    r = finetune(config(folder, tmp_path, "lora", instance_prompt="a sks star", rank=2, alpha=1.0,
                        train_text_encoder=True), progress=False)
    trained, path = r["model"], tmp_path / "lora.safetensors"
    adapters = {}  # the adapters hooked onto the trained model, by (network, module path) as the reader's table
    for net in ("unet", "text_encoder"):
        for name, module in getattr(trained, net).named_modules():
            for hook in module._forward_hooks.values():
                adapters[(net, name)] = hook.__defaults__[0]
    table = lora.name_table(trained)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
        assert keys == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert len(names) == len(adapters) and {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
        for n in names:  # the reader's table sends each name to the layer whose adapter the name's tensors are
            a = adapters[table[n]]
            assert torch.equal(f.get_tensor(f"{n}.lora_down.weight"), a.down.weight.half()), n
            assert torch.equal(f.get_tensor(f"{n}.lora_up.weight"), a.up.weight.half()), n
            assert float(f.get_tensor(f"{n}.alpha")) == 1.0
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "2"

    with torch.no_grad():  # the file holds fp16: the adapters rounded so, merged, must act as they do hooked
        for a in adapters.values():
            a.down.weight.copy_(a.down.weight.half().float())
            a.up.weight.copy_(a.up.weight.half().float())
    merged, base = plainsd.load(folder), plainsd.load(folder)
    lora.merge(merged, lora.read_lora(path))
    outputs = [_unet_and_text(m) for m in (trained, merged, base)]
    for got, want, plain in zip(*outputs):
        assert max_diff(got, want) <= 1e-5 and max_diff(plain, want) > 1e-3

    pipe = _pipe(nets)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    d_text, d_unet = compare(merged, pipe)
    assert d_text <= 1e-5 and d_unet <= 1e-5, (d_text, d_unet)


def _unet_and_text(sd):
    """(UNet prediction, text states, pooled text) for fixed inputs."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        cond = text_conditioning(sd, Trainable({}), ["a sks star"], size_conditions(sd, [Crop(64, 64)], 64, 64))
        states, pooled = sd.text_encoder.encode(sd.tokenizer(["a sks star"]))
        return _unet_net(sd.unet)(x, t, cond), states, pooled


def test_textual_inversion_trains_both_towers_vectors(files, tmp_path):
    """The file holds clip_l and clip_g, each tower's width; both moved from the initial word's vectors; the model is
    untouched; loaded as an embedding, the token conditions txt2img exactly as it conditioned the last step."""
    base = files["tiny-sdxl"]
    cfg = config(base, tmp_path, "textual-inversion", instance_prompt="a sks-star", token="sks-star",
                 init_word="circle", vectors=2)
    r = finetune(cfg, progress=False)
    sd = plainsd.load(base)
    with safe_open(str(tmp_path / "sks-star.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (2, 64), "clip_g": (2, 128)}
    circle = sd.tokenizer.encode("circle")[0]
    for key, tower in zip(("clip_l", "clip_g"), sd.text_encoder.towers):
        start = tower.text_model.embeddings.token_embedding.weight[circle]
        assert (saved[key][0] - start).abs().max() > 1e-3, key
    assert all(torch.equal(a, b) for a, b in zip(r["model"].state_dict().values(), sd.state_dict().values()))

    trained = trainable(sd, settings(cfg), ["a sks-star"])  # what the training step encodes with
    with torch.no_grad():
        trained.vectors.copy_(torch.cat([saved["clip_l"], saved["clip_g"]], dim=1))
    cond = text_conditioning(sd, trained, ["a sks-star"], size_conditions(sd, [Crop(64, 64)], 64, 64))
    cond = {k: v.detach() for k, v in cond.items()}
    assert load_embeddings(tmp_path, sd).names == ["sks-star"]
    context, y = _spied_conditioning(sd, "a sks-star", 64, 64, embeddings_dir=tmp_path)
    assert max_diff(cond["crossattn"], context) == 0 and max_diff(cond["vector"], y) == 0
    plain, _ = _spied_conditioning(sd, "a sks-star", 64, 64)
    assert max_diff(plain, context) > 1e-2  # (the embedding is used)


def test_lora_overfits_one_picture(files, tmp_path):
    """On one picture and caption, the loss at fixed noise and timesteps falls well below the base model's (the
    adapters alone, on a random model whose first level has no attention, cannot take it much lower)."""
    base = files["tiny-sdxl"]
    cfg = config(base, tmp_path, "lora", steps=30, rank=4, num_instance_images=1, instance_prompt="a sks star")
    r = finetune(cfg, progress=False)
    items = instance_data(cfg, settings(cfg), 64)

    def fixed_loss(sd):
        mean, _, captions, _, numbers = _latents(sd, items)
        z = mean.repeat(16, 1, 1, 1) * sd.config.scale_factor
        cond = text_conditioning(sd, Trainable({}), captions * 16, numbers.repeat(16, 1))
        with torch.no_grad():
            return float(training_loss(_unet_net(sd.unet), z, cond, generator=torch.Generator().manual_seed(0)))
    before, after = fixed_loss(plainsd.load(base)), fixed_loss(r["model"])
    assert after < 0.85 * before, (before, after)  # (about 0.79 after 30 steps)


def test_dreambooth_writes_a_trained_sdxl_model(files, tmp_path):
    """DreamBooth with prior preservation (its class image drawn by the SDXL base) writes a whole SDXL model whose
    UNet moved and whose VAE did not."""
    base = files["tiny-sdxl"]
    finetune(config(base, tmp_path, "dreambooth", steps=2, instance_prompt="a sks star",
                    class_prompts=["a red circle"], num_class_images=1), progress=False)
    model, original = plainsd.load(tmp_path / "model.safetensors"), plainsd.load(base)
    assert model.config.sdxl == "base"
    changed = max(max_diff(p, q) for p, q in zip(model.unet.parameters(), original.unet.parameters()))
    assert changed > 1e-3
    vae = zip(model.vae.parameters(), original.vae.parameters())
    assert all(torch.equal(p.float(), q.half().float()) for p, q in vae)  # (the file holds fp16)


def test_textual_inversion_on_a_refiner_is_refused(files, tmp_path, capsys):
    args = ["finetune", "textual-inversion", "--model", str(files["tiny-sdxl-refiner"]), "--instance-prompt",
            "a sks-star", "--token", "sks-star", "--max-train-steps", "1", "--sample-every", "0", "--out",
            str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    assert "textual inversion on an SDXL refiner is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run" / "sks-star.safetensors").exists()
