"""ControlNet files (weights.load_controlnet / save_controlnet): the layouts people have, the config read from
the shapes, other tools reading what plainsd writes, one clear sentence for everything else."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import plainsd
from plainsd import runtime
from plainsd.config import UNetConfig, preset
from plainsd.models.controlnet import ControlNet
from plainsd.weights import CheckpointError, _unet_config, load_controlnet, save_controlnet
from tests.reference import diffusers_controlnet_kwargs, max_diff, perturb

# Configs the shapes of a file give back exactly (heads are not in a file: 8 for SD1, 64 channels each for SD2)
SD1_SHAPED = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=8,
                        context_dim=768)
SD2_SHAPED = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=-1,
                        head_dim=64, context_dim=1024, use_linear_proj=True)


def _controlnet(cfg, seed=0, hint_channels=3):
    torch.manual_seed(seed)
    return perturb(ControlNet(cfg, hint_channels), seed)  # no zero convolution hides a wrong mapping


def _residuals(cn, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, cn.hint_channels, 64, 64, generator=g)
    with torch.no_grad():
        return cn(x, hint, torch.tensor([10, 900]), torch.randn(2, 77, cn.config.context_dim, generator=g))


def _same(a, b, tol=0.0):
    return all(max_diff(x, y) <= tol for x, y in zip(_residuals(a), _residuals(b)))


def _state(cn):
    return {k: v.contiguous() for k, v in cn.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_save_load_round_trip(tmp_path, name):
    cn = _controlnet(preset(name).unet)
    path = save_controlnet(cn, tmp_path / "cn.safetensors")
    back = load_controlnet(path)
    assert back.config == cn.config and back.name == "cn" and _same(cn, back)
    keys = set(safe_open(str(path), "pt").keys())
    assert {"input_hint_block.0.weight", "input_hint_block.14.weight", "zero_convs.0.0.weight", "middle_block_out.0.bias",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias"} <= keys  # the original layout
    assert not [k for k in keys if k.startswith("control_model.")] and os.listdir(tmp_path) == ["cn.safetensors"]
    save_controlnet(cn, tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_file(str(tmp_path / "half.safetensors"))["middle_block_out.0.weight"].dtype == torch.float16
    half = load_controlnet(tmp_path / "half.safetensors", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.middle_block_out[0].weight,
                                                         cn.middle_block_out[0].weight.half().bfloat16())
    with pytest.raises(ValueError, match="saves .safetensors files only"):
        save_controlnet(cn, tmp_path / "cn.pth")


def _diffusers_keys(cn):
    """The ControlNet's tensors under diffusers' names, converted by diffusers' own single-file converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    theirs = ControlNetModel(**diffusers_controlnet_kwargs(cn.config))
    theirs.load_state_dict(convert_controlnet_checkpoint(_state(cn), dict(theirs.config)), strict=True)
    return {k: v.contiguous() for k, v in theirs.state_dict().items()}


def _write(layout, cn, path):
    """The ControlNet in one of the layouts people have, without plainsd's metadata."""
    state = _state(cn)
    if layout == "1.0 .pth":  # a whole SD model beside the ControlNet under control_model., as a state_dict
        whole = {"control_model." + k: v for k, v in state.items()}
        whole.update({"model.diffusion_model.out.2.bias": torch.zeros(4), "first_stage_model.quant_conv.bias": torch.zeros(8)})
        torch.save({"state_dict": whole, "global_step": 1}, path.with_suffix(".pth"))
    elif layout == "1.1 .pth":
        torch.save({"control_model." + k: v for k, v in state.items()}, path.with_suffix(".pth"))
    elif layout == "unprefixed .safetensors":
        save_file(state, str(path.with_suffix(".safetensors")))
    else:  # one .safetensors file in diffusers' names
        save_file(_diffusers_keys(cn), str(path.with_suffix(".safetensors")))
    return next(path.parent.glob(path.name + ".*"))


@pytest.mark.parametrize("layout", ["1.0 .pth", "1.1 .pth", "unprefixed .safetensors", "diffusers-named .safetensors"])
@pytest.mark.parametrize("cfg", [SD1_SHAPED, SD2_SHAPED], ids=["sd1", "sd2"])
def test_layouts_people_have_load_with_the_config_from_the_shapes(tmp_path, layout, cfg):
    cn = _controlnet(cfg, seed=1)
    back = load_controlnet(_write(layout, cn, tmp_path / "control"))
    assert back.config == cn.config and back.hint_channels == 3 and not back.global_pool
    assert _same(cn, back)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_configs_are_recognised_from_shapes(name):
    with torch.device("meta"):
        cn = ControlNet(preset(name).unet)
    assert _unet_config({k: tuple(v.shape) for k, v in cn.state_dict().items()}, prefix="") == preset(name).unet


def test_diffusers_reads_what_plainsd_writes(tmp_path, record_parity):
    """diffusers' own converter (convert_controlnet_checkpoint) reads a saved file into its ControlNetModel."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    cn = _controlnet(preset("tiny").unet, seed=2)
    save_controlnet(cn, tmp_path / "cn.safetensors")
    theirs = ControlNetModel(**diffusers_controlnet_kwargs(cn.config))
    theirs.load_state_dict(convert_controlnet_checkpoint(load_file(str(tmp_path / "cn.safetensors")), dict(theirs.config)),
                           strict=True)
    g = torch.Generator().manual_seed(0)
    x, hint, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 77, 128)
    with torch.no_grad():
        down, mid = theirs(x, torch.tensor([10, 900]), ctx, hint, return_dict=False)
        ours = cn(x, hint, torch.tensor([10, 900]), ctx)
    d = max(max_diff(a, b) for a, b in zip(ours, [*down, mid]))
    record_parity("ControlNet tiny file read by diffusers' converter", d)
    assert d <= 1e-4 and max(float(r.abs().max()) for r in ours) > 0.01


def test_shuffle_models_pool_globally(tmp_path):
    """A file cannot say that it is a shuffle model: "shuffle" in its name does (the A1111 extension's rule);
    plainsd's own files keep the setting."""
    cn = _controlnet(SD1_SHAPED)
    save_file(_state(cn), str(tmp_path / "control_v11e_sd15_shuffle.safetensors"))
    shuffle = load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert shuffle.global_pool and all(r.shape[-2:] == (1, 1) for r in _residuals(shuffle))
    pooled = [r.mean(dim=(2, 3), keepdim=True) for r in _residuals(cn)]
    assert all(max_diff(a, b) <= 1e-6 for a, b in zip(_residuals(shuffle), pooled))
    back = load_controlnet(save_controlnet(shuffle, tmp_path / "mine.safetensors"))
    assert back.global_pool


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/plainsd_pwned_controlnet", "w"))


def test_what_is_not_a_controlnet_gets_one_sentence(tmp_path):
    state = _state(_controlnet(SD1_SHAPED))
    cases = {
        "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
                             "not a ControlNet.*looks like a LoRA file"),
        "adapter.safetensors": ({"adapter.body.0.resnets.0.block1.weight": torch.zeros(4, 4, 3, 3)}, "T2I-Adapter"),
        "sdxl.safetensors": ({**state, "label_emb.0.0.weight": torch.zeros(4, 4)}, "does not fit the SDXL ControlNet"),
        "control-lora.safetensors": ({**state, "lora_controlnet": torch.zeros(1)}, "is a Control-LoRA"),
        "diff.safetensors": ({**state, "difference": torch.zeros(1)}, "difference from a base UNet"),
        "missing.safetensors": ({k: v for k, v in state.items() if k != "zero_convs.1.0.weight"},
                                r"1 tensors missing \(zero_convs\.1\.0\.weight\)"),
        "extra.safetensors": ({**state, "zero_convs.9.0.weight": torch.zeros(2)}, r"1 unexpected tensors \(zero_convs\.9"),
        "shape.safetensors": ({**state, "middle_block_out.0.bias": torch.zeros(3)},
                              r"wrong shape \(middle_block_out\.0\.bias: file \[3\], model \[64\]\)"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
    plainsd.save(plainsd.build("tiny"), tmp_path / "sd.safetensors")
    cases["sd.safetensors"] = (None, "not a ControlNet.*a Stable Diffusion checkpoint")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    cases["noise.pth"] = (None, "not a checkpoint")
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1), "callback": _Evil()}, tmp_path / "evil.pth")
    cases["evil.pth"] = (None, "never runs pickled code")
    cases["nothing.pth"] = (None, "no such ControlNet file")
    for name, (_, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_controlnet(tmp_path / name)
        assert "\n" not in str(e.value), name
    assert not os.path.exists("/tmp/plainsd_pwned_controlnet")


@pytest.mark.parametrize("setting, message", [
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"conditioning_embedding_out_channels": [16, 32, 96, 128]}, "conditioning_embedding_out_channels"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type='UNetMidBlock2D'"),
    ({"controlnet_conditioning_channel_order": "rgba"}, "unknown controlnet_conditioning_channel_order"),
    ({"_class_name": "UNet2DConditionModel"}, "not a ControlNetModel"),
])
def test_diffusers_features_plainsd_lacks_are_refused(tmp_path, setting, message):
    from diffusers import ControlNetModel

    folder = tmp_path / "cn"
    ControlNetModel(**diffusers_controlnet_kwargs(preset("tiny").unet)).save_pretrained(folder)
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **setting}))
    with pytest.raises(CheckpointError, match=message):
        load_controlnet(folder)
    config.unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_controlnet(folder)


# --- Control-LoRA ------------------------------------------------------------------------------------------------

def _control_lora(unet, rank=2, seed=0) -> dict:
    """A Control-LoRA's tensors as Stability's files hold them, for this UNet: low-rank pairs (X.up [out, rank, 1,
    1 for a convolution], X.down [rank, in, kh, kw]) for the way down's convolutions and attention projections,
    the hint encoder, zero convolutions and middle block's output whole, one ResBlock norm replaced whole, the
    marker tensor; the rest of the way down left to the UNet."""
    g = torch.Generator().manual_seed(seed)
    cn = _controlnet(unet.config, seed)
    tensors = {k: v for k, v in cn.state_dict().items()
               if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    tensors["input_blocks.1.0.in_layers.0.weight"] = torch.rand(cn.input_blocks[1][0].in_layers[0].weight.shape,
                                                                generator=g)
    for name, module in cn.named_modules():
        layer = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
        if name.startswith(("input_blocks.", "middle_block.")) and layer:
            w = module.weight
            tensors[name + ".up"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
            tensors[name + ".down"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
    tensors["lora_controlnet"] = torch.tensor([])
    return tensors


def test_a_control_lora_is_built_on_the_unet_it_steers(tmp_path):
    """Each up / down pair adds up @ down to the UNet's weight, whole tensors stand as they are, and what the file
    leaves out is the UNet's own (ComfyUI's reading of Stability's files): the ControlNet built by hand from the
    UNet's state dict, bit for bit in float32; the unit loader routes the file there; alone it is one sentence."""
    from plainsd.weights import load_control_lora, load_control_model

    unet = perturb(plainsd.build("tiny-sdxl", seed=0).unet, 1)
    tensors = _control_lora(unet)
    save_file(tensors, str(tmp_path / "control-lora-canny-rank2.safetensors"))
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    want = {}
    for name, value in ControlNet(unet.config).state_dict().items():
        layer = name.rsplit(".", 1)[0]
        value = tensors.get(name, base.get(name))
        if layer + ".up" in tensors and name.endswith(".weight"):
            up, down = tensors[layer + ".up"], tensors[layer + ".down"]
            value = value + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
        want[name] = value
    built = load_control_lora(tmp_path / "control-lora-canny-rank2.safetensors", unet)
    assert built.config == unet.config and built.name == "control-lora-canny-rank2"
    assert all(torch.equal(built.state_dict()[k], v) for k, v in want.items())
    assert built.state_dict().keys() == want.keys()
    routed = load_control_model(tmp_path / "control-lora-canny-rank2.safetensors", unet=unet)
    assert routed.control_lora and torch.equal(routed.input_blocks[3][0].in_layers[2].weight,
                                               want["input_blocks.3.0.in_layers.2.weight"])
    with torch.no_grad():  # its own tensors: a LoRA merged into the UNet later does not reach it
        unet.input_blocks[1][0].in_layers[2].bias.add_(1.0)  # (a tensor the ControlNet takes from the UNet)
    assert torch.equal(built.input_blocks[1][0].in_layers[2].bias, want["input_blocks.1.0.in_layers.2.bias"])
    packed = runtime.prepare(plainsd.build("tiny-sdxl", seed=0)).sd.unet  # packed layers: the same numbers
    packed.load_state_dict(base)
    on_packed = load_control_lora(tmp_path / "control-lora-canny-rank2.safetensors", packed)
    assert all(torch.equal(on_packed.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(CheckpointError, match="is a Control-LoRA .*built on a model's UNet"):
        load_controlnet(tmp_path / "control-lora-canny-rank2.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model's UNet as a Control-LoRA"):
        load_control_lora(tmp_path / "control-lora-canny-rank2.safetensors", plainsd.build("tiny", seed=0).unet)
    stray = {"output_blocks.0.0.in_layers.2.up": torch.zeros(4, 2, 1, 1), "output_blocks.0.0.in_layers.2.down":
             torch.zeros(2, 4, 3, 3)}  # (a pair for a layer the ControlNet has not)
    stray["zero_convs.0.0.up"], stray["zero_convs.0.0.down"] = torch.zeros(32, 2, 1, 1), torch.zeros(2, 32, 1, 1)
    save_file({**{k: v for k, v in tensors.items() if k != "zero_convs.0.0.weight"}, **stray},
              str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(zero_convs\.0\.0\.weight\); 2 unexpected "
                                              r"tensors \(output_blocks\.0\.0\.in_layers\.2\.down"):
        load_control_lora(tmp_path / "stray.safetensors", unet)
    save_file({**tensors, "input_blocks.3.0.in_layers.2.down": torch.zeros(2, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"low-rank pair input_blocks\.3\.0\.in_layers\.2\.up"):
        load_control_lora(tmp_path / "bad.safetensors", unet)
