"""LoRA files in the kohya / A1111 format: names, merge = diffusers' fuse, prompt tags, weight 0, errors."""

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from plainsd import lora
from plainsd.pipeline import txt2img
from plainsd.weights import CheckpointError
from tests.reference import diffusers_from_our_file, max_diff, perturb


def random_lora(sd, rank=2, text=True, seed=0, alpha=1.0) -> dict:
    """A LoRA on every transformer-block layer (and text layer), with kohya's diffusers-style names."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (net, name) in lora.name_table(sd).items():
        if net == "unet" and not (key.startswith(("lora_unet_down_", "lora_unet_mid_", "lora_unet_up_"))
                                  and "_attentions_" in key):
            continue
        if net == "text_encoder" and (not text or not key.startswith("lora_te_text_model_encoder")):
            continue
        w = getattr(sd, net).get_submodule(name).weight
        state[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    sd = plainsd.build("tiny", seed=3)
    for m in (sd.unet, sd.text_encoder):
        perturb(m, 5, 0.02)
    folder = tmp_path_factory.mktemp("lora")
    plainsd.save(sd, folder / "base.safetensors")
    (folder / "loras").mkdir()
    save_file(random_lora(sd), str(folder / "loras" / "style.safetensors"))
    return folder


def test_kohya_names_cover_the_attention_layers():
    sd = plainsd.build("tiny")
    table = lora.name_table(sd)
    assert table["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (
        "unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert table["lora_unet_mid_block_attentions_0_proj_in"] == ("unet", "middle_block.1.proj_in")
    assert table["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"][1].startswith("output_blocks.")
    assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (
        "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
    assert table["lora_unet_input_blocks_1_1_proj_in"] == ("unet", "input_blocks.1.1.proj_in")  # LDM-style names too
    adapters = lora.attach(sd, rank=2, text_encoder=True)
    assert set(adapters) <= set(table)
    assert sum(k.startswith("lora_te_") for k in adapters) == 6 * sd.config.text.layers
    lora.detach(adapters)


@pytest.mark.parametrize("weight", [1.0, 0.7, -0.5])
def test_merge_equals_diffusers_fuse(base, record_parity, weight):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    sd = plainsd.load(base / "base.safetensors")
    unet, _, text = diffusers_from_our_file(base / "base.safetensors", sd.config)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(base / "loras" / "style.safetensors"))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=text, prefix="text_encoder")
    unet.fuse_lora(lora_scale=weight)
    fuse_text_encoder_lora(text, lora_scale=weight)

    lora.merge(sd, lora.read_lora(base / "loras" / "style.safetensors"), weight)
    ids = sd.tokenizer(["a red circle on the left"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = sd.text_encoder(ids)
        d_text = max_diff(ctx, text(ids).last_hidden_state)
        d_unet = max_diff(sd.unet(x, torch.tensor([500]), ctx), unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample)
        changed = max_diff(plainsd.load(base / "base.safetensors").text_encoder(ids), ctx)
    record_parity(f"LoRA merge vs diffusers fuse_lora, weight {weight}: text / unet", max(d_text, d_unet))
    assert changed > 0.01  # the LoRA did something
    assert d_text <= 1e-5 and d_unet <= 1e-5


def test_prompt_tag_equals_merge_and_weight_zero_is_the_base(base):
    sd = plainsd.load(base / "base.safetensors")
    kw = dict(steps=3, seed=1, width=32, height=32)
    plain = txt2img(sd, "a circle", **kw).images[0]
    zero = txt2img(sd, "a circle <lora:style:0>", lora_dir=base / "loras", **kw)
    assert zero.images[0].tobytes() == plain.tobytes()
    assert "<lora:style:0>" in zero.infotexts[0]  # the tag stays in the recorded prompt, as in A1111
    tagged = txt2img(sd, "a circle <lora:style:0.6>", lora_dir=base / "loras", **kw).images[0]
    assert txt2img(sd, "a circle", **kw).images[0].tobytes() == plain.tobytes()  # weights restored after the run
    merged = lora.merge(plainsd.load(base / "base.safetensors"), lora.read_lora(base / "loras" / "style.safetensors"), 0.6)
    assert txt2img(merged, "a circle", **kw).images[0].tobytes() == tagged.tobytes()
    assert tagged.tobytes() != plain.tobytes()


def test_a_lora_stays_on_until_a_prompt_asks_for_other_loras(base, tmp_path, monkeypatch):
    """As A1111's Lora extension does: the next run with the same tags changes no weight and reads no file; other
    tags, other weights or a file changed on disk put the right set on, starting from the model's own weights (a
    DoRA layer's change depends on them); a LoRA that does not fit leaves the model's own weights."""
    import shutil

    sd = plainsd.load(base / "base.safetensors")
    own = {k: v.clone() for k, v in sd.state_dict().items()}
    folder = tmp_path / "loras"
    shutil.copytree(base / "loras", folder)
    save_file(random_lora(sd, seed=7), str(folder / "other.safetensors"))
    dora = random_lora(sd, seed=9)
    for key in [k.removesuffix(".lora_up.weight") for k in dora if k.endswith(".lora_up.weight")]:
        rows = dora[key + ".lora_up.weight"].shape[0]
        dora[key + ".dora_scale"] = torch.rand(rows, 1, generator=torch.Generator().manual_seed(rows)) + 0.5
    save_file(dora, str(folder / "dora.safetensors"))
    reads, adds = [], []
    monkeypatch.setattr(lora, "read_lora", lambda p, read=lora.read_lora: reads.append(p.name) or read(p))
    monkeypatch.setattr(lora, "_add", lambda sd, changes, add=lora._add: adds.append(len(changes)) or add(sd, changes))
    kw = dict(steps=2, seed=1, width=32, height=32, lora_dir=folder)

    def merged(*loras):  # the weights of a fresh model with these (file, weight) merged
        fresh = plainsd.load(base / "base.safetensors")
        for name, w in loras:
            lora.merge(fresh, lora.read_lora(folder / f"{name}.safetensors"), w)
        return fresh.state_dict()

    def weights_are(expected, atol=0.0):  # (two LoRAs' changes are summed before they are added: rounding)
        return all(torch.allclose(v, expected[k], rtol=0, atol=atol) for k, v in sd.state_dict().items())

    first = txt2img(sd, "a circle <lora:style:0.6>", **kw).images[0]
    again = txt2img(sd, "a circle <lora:style:0.6>", **kw).images[0]
    assert again.tobytes() == first.tobytes() and reads == ["style.safetensors"] and len(adds) == 1
    txt2img(sd, "a circle <lora:style:0.6> <lora:other:-0.5>", **kw)
    assert len(adds) == 2 and weights_are(merged(("style", 0.6), ("other", -0.5)), atol=1e-6)
    txt2img(sd, "a circle <lora:other:-0.5>", **kw)
    assert weights_are(merged(("other", -0.5)))
    txt2img(sd, "a circle <lora:dora:0.8>", **kw)  # (DoRA's change is computed from the model's own weights)
    assert weights_are(merged(("dora", 0.8)))
    txt2img(sd, "a circle <lora:other:-0.5>", **kw)
    save_file(random_lora(sd, seed=8), str(folder / "other.safetensors"))  # (a new file under the same name)
    txt2img(sd, "a circle <lora:other:-0.5>", **kw)
    assert reads[-1] == "other.safetensors" and weights_are(merged(("other", -0.5)))
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 7),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 2)}, str(folder / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="have no match here"):
        txt2img(sd, "a circle <lora:other:-0.5> <lora:foreign:1>", **kw)
    assert weights_are(own)
    txt2img(sd, "a circle <lora:other:-0.5>", **kw)
    txt2img(sd, "a circle <lora:other:0>", **kw)  # (weight 0: none)
    assert weights_are(own)


def test_infotext_carries_a1111s_lora_hashes(base, tmp_path):
    """"Lora hashes" as A1111's Lora extension writes it: per tag name (':' and ',' removed), the first 12 hex digits
    of the SHA-256 of a .safetensors file's bytes after its header, or of the whole of a .pt file, or the
    sshs_model_hash recorded in the header."""
    import hashlib
    import shutil

    sd = plainsd.load(base / "base.safetensors")
    folder = tmp_path / "loras"
    shutil.copytree(base / "loras", folder)
    data = (folder / "style.safetensors").read_bytes()
    kohya = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    state = random_lora(sd, seed=5)
    torch.save(state, folder / "old.pt")
    whole = hashlib.sha256((folder / "old.pt").read_bytes()).hexdigest()[:12]
    save_file(state, str(folder / "trained.safetensors"), metadata={"sshs_model_hash": "ab" * 32})
    kw = dict(steps=1, seed=1, width=32, height=32, lora_dir=folder)
    text = txt2img(sd, "a circle <lora:style:0.6> <lora:old:0.3> <lora:trained:0>", **kw).infotexts[0]
    assert f'Lora hashes: "style: {kohya}, old: {whole}, trained: {"ab" * 6}"' in text
    assert "Lora hashes" not in txt2img(sd, "a circle", **kw).infotexts[0]


def test_lora_errors_are_one_sentence(base, tmp_path):
    sd = plainsd.load(base / "base.safetensors")
    with pytest.raises(ValueError, match="no LoRA named 'nope'.*available: .*style"):
        txt2img(sd, "x <lora:nope:1>", lora_dir=base / "loras", steps=1, width=8, height=8)
    with pytest.raises(ValueError, match="no LoRA folder"):
        txt2img(sd, "x <lora:style:1>", steps=1, width=8, height=8)
    key = "lora_te2_text_model_encoder_layers_0_mlp_fc1"  # an SDXL LoRA: read, but it fits no SD 1 layer
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 4), f"{key}.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match=f"does not fit this SD1 model: 1 of its layers .*{key}"):
        lora.deltas(sd, lora.read_lora(tmp_path / "xl.safetensors"))
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 4)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(CheckpointError, match="LoHa layer lora_unet_x lacks some of its hada_"):
        lora.read_lora(tmp_path / "loha.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="lacks its lora_down or lora_up"):
        lora.read_lora(tmp_path / "half.safetensors")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 7), f"{key}.lora_up.weight": torch.zeros(32, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit a weight"):
        lora.merge(sd, lora.read_lora(tmp_path / "other.safetensors"))
    save_file({f"{key}.hada_w1_a": torch.zeros(32, 2), f"{key}.hada_w1_b": torch.zeros(2, 7),
               f"{key}.hada_w2_a": torch.zeros(32, 2), f"{key}.hada_w2_b": torch.zeros(2, 7)},
              str(tmp_path / "loha-other.safetensors"))
    with pytest.raises(CheckpointError, match="Hadamard factors of \\[32, 7\\] and \\[32, 7\\] do not fit a weight"):
        lora.merge(sd, lora.read_lora(tmp_path / "loha-other.safetensors"))
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 7),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="have no match here"):
        lora.merge(sd, lora.read_lora(tmp_path / "foreign.safetensors"))


def test_trained_adapters_save_in_the_format_they_load_from(tmp_path):
    sd = plainsd.build("tiny", seed=1)
    adapters = lora.attach(sd, rank=4, alpha=2.0, text_encoder=True)
    g = torch.Generator().manual_seed(0)
    for a in adapters.values():
        a.up.weight.data = torch.randn(a.up.weight.shape, generator=g) * 0.05
    ids = sd.tokenizer(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        hooked = sd.unet(x, torch.tensor([300]), sd.text_encoder(ids))
    save_file(lora.adapters_state(adapters, torch.float32), str(tmp_path / "mine.safetensors"))
    lora.detach(adapters)
    merged = lora.merge(sd, lora.read_lora(tmp_path / "mine.safetensors"))
    with torch.no_grad():
        assert max_diff(merged.unet(x, torch.tensor([300]), merged.text_encoder(ids)), hooked) <= 1e-5


def test_locon_conv_layers_merge_as_their_low_rank_convolution(tmp_path):
    import torch.nn.functional as F

    sd = plainsd.build("tiny", seed=4)
    key, name = "lora_unet_down_blocks_0_resnets_0_conv1", "input_blocks.1.0.in_layers.2"
    assert lora.name_table(sd)[key] == ("unet", name)
    conv = sd.unet.get_submodule(name)
    g = torch.Generator().manual_seed(1)
    down = torch.randn(3, conv.in_channels, 3, 3, generator=g) * 0.1
    up = torch.randn(conv.out_channels, 3, 1, 1, generator=g) * 0.1
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(6.0)},
              str(tmp_path / "locon.safetensors"))
    x = torch.randn(1, conv.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        expected = conv(x) + 0.5 * (6.0 / 3) * F.conv2d(F.conv2d(x, down, padding=1), up)
        lora.merge(sd, lora.read_lora(tmp_path / "locon.safetensors"), 0.5)
        assert max_diff(sd.unet.get_submodule(name)(x), expected) <= 1e-5


def test_shipped_loras_are_found_without_a_folder(base, monkeypatch):
    shipped = base / "loras" / "style.safetensors"
    monkeypatch.setattr(lora, "SHIPPED", (shipped, base / "absent.safetensors"))
    assert lora.find_loras(None) == {"style": shipped}
    assert list(lora.find_loras(base / "loras")) == ["style"]  # the shipped name first, the folder's same stem not twice
    sd = plainsd.load(base / "base.safetensors")
    kw = dict(steps=2, width=16, height=16, seed=1)
    tagged = txt2img(sd, "a circle <lora:style:1>", **kw).images[0]
    assert tagged.tobytes() == txt2img(sd, "a circle <lora:style:1>", lora_dir=base / "loras", **kw).images[0].tobytes()
    assert tagged.tobytes() != txt2img(sd, "a circle", **kw).images[0].tobytes()
    with pytest.raises(ValueError, match="shipped LoRAs.*available: style"):
        txt2img(sd, "a circle <lora:nope:1>", **kw)
