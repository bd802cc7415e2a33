"""LyCORIS files (LoHa, LoKr, (IA)^3, LoCon, DoRA) and PEFT's DoRA: plainsd's weight change equals the LyCORIS
library's and peft's own reconstruction on random weights, read back from a file; a file's picture is the same
applied for one run (<lyco:...>) and merged into the checkpoint."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import plainsd
from plainsd import lora
from plainsd.pipeline import txt2img
from tests.reference import max_diff

lycoris = pytest.importorskip("lycoris")  # the LyCORIS library (lycoris-lora, a test extra)
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

LAYERS = {"linear": lambda: nn.Linear(24, 16), "conv": lambda: nn.Conv2d(16, 24, 3, padding=1)}
CASES = [  # (module class, its settings), each on a Linear and a 3x3 convolution
    (LohaModule, dict(lora_dim=4, alpha=2)),
    (LohaModule, dict(lora_dim=4, alpha=3, use_tucker=True)),
    (LohaModule, dict(lora_dim=4, alpha=2, weight_decompose=True)),
    (LokrModule, dict(lora_dim=2, alpha=1, factor=4)),                 # w1 whole, w2 low-rank
    (LokrModule, dict(lora_dim=2, alpha=1, factor=4, decompose_both=True)),
    (LokrModule, dict(lora_dim=2, alpha=1, factor=4, use_tucker=True)),
    (LokrModule, dict(lora_dim=64, alpha=1, factor=4)),                # both whole: scale 1
    (LokrModule, dict(lora_dim=2, alpha=1, factor=4, weight_decompose=True, wd_on_out=False)),
    (IA3Module, dict()),
    (IA3Module, dict(train_on_input=True)),
    (LoConModule, dict(lora_dim=4, alpha=1)),
    (LoConModule, dict(lora_dim=4, alpha=2, use_tucker=True)),
    (LoConModule, dict(lora_dim=4, alpha=2, weight_decompose=True)),                    # LyCORIS' DoRA: per row
    (LoConModule, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),   # kohya's: per column
]


def _random(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_module"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "dora" not in name else 1.0) + ("dora" in name) * 2)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("cls,settings", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
def test_change_equals_lycoris_reconstruction(cls, settings, kind, tmp_path, record_parity):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    module = cls("lora_unet_layer", layer, multiplier=1.0, **settings)
    _random(module, 1)
    state = module.custom_state_dict() or {k: v for k, v in module.state_dict().items() if not k.startswith("org_")}
    save_file({f"lora_unet_layer.{k}": v.detach().float().contiguous() for k, v in state.items()},
              str(tmp_path / "x.safetensors"))
    ours = lora.read_lora(tmp_path / "x.safetensors").layers["lora_unet_layer"]
    weight = layer.weight.detach().clone()
    x = torch.randn((3, 24) if kind == "linear" else (2, 16, 8, 8), generator=torch.Generator().manual_seed(2))
    op = (lambda w: nn.functional.linear(x, w, layer.bias)) if kind == "linear" else \
        (lambda w: nn.functional.conv2d(x, w, layer.bias, padding=1))
    module.apply_to()  # the layer now runs LyCORIS' own forward (its merged-weight helpers scale alpha/dim twice)
    with torch.no_grad():
        theirs, plain, mine = layer(x), op(weight), op(weight + ours.change(weight))
    assert (theirs - plain).abs().max() > 1e-3  # the file changes the layer
    diff = max_diff(mine, theirs)
    record_parity(f"{cls.__name__} {kind} {sorted(settings)} vs LyCORIS forward", diff)
    assert diff < 1e-4 * max(1.0, float(theirs.abs().max()))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_dora_equals_peft_merge(kind, record_parity):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[kind]())
    base = model[0].weight.detach().clone()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(1.5)
    ours = lora.LoRALayer(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), 8.0,
                          dora_scale=magnitude.detach().flatten())  # (as read_lora takes PEFT's magnitudes: per row)
    merged = wrapped.merge_and_unload()[0].weight.detach()
    diff = max_diff(base + ours.change(base), merged)
    record_parity(f"DoRA {kind} vs peft merge_and_unload", diff)
    assert diff < 1e-5 and max_diff(merged, base) > 1e-2


def _loha_for(sd, seed: int) -> dict[str, torch.Tensor]:
    """A LoHa file's tensors for every attention projection and ResBlock conv of a tiny model (kohya names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (net, path) in lora.name_table(sd).items():
        if not (name.startswith("lora_unet_down_blocks") and name.endswith(("to_q", "to_v", "conv1"))):
            continue
        w = getattr(sd, net).get_submodule(path).weight
        rows, cols = w.shape[0], w[0].numel()
        for i in (1, 2):
            out[f"{name}.hada_w{i}_a"] = torch.randn(rows, 2, generator=g) * 0.3
            out[f"{name}.hada_w{i}_b"] = torch.randn(2, cols, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def test_loha_picture_applied_equals_merged(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    sd = plainsd.build("tiny", seed=0)
    save_file(_loha_for(sd, 3), str(folder / "hada.safetensors"))
    args = dict(steps=3, seed=2, width=64, height=64, lora_dir=folder)
    plain = txt2img(sd, "a red circle", **args).images[0]
    applied = txt2img(sd, "a red circle <lyco:hada:0.8>", **args).images[0]
    assert txt2img(sd, "a red circle", **args).images[0].tobytes() == plain.tobytes()  # put back after the run
    lora.merge(sd, lora.read_lora(folder / "hada.safetensors"), 0.8)
    merged = txt2img(sd, "a red circle", **args).images[0]
    assert applied.tobytes() == merged.tobytes() != plain.tobytes()
