"""Configs for the three networks and named presets.

Each network takes its config whole. Field names follow the original latent-diffusion configs
(model_channels, channel_mult, num_res_blocks, ...) so that the numbers can be checked against them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class TextConfig:
    vocab_size: int = 49408          # CLIP BPE vocabulary
    context_length: int = 77         # tokens per prompt, start and end tokens included
    width: int = 768                 # hidden size
    layers: int = 12                 # transformer layers stored in the checkpoint
    heads: int = 12                  # attention heads
    mlp_ratio: float = 4.0           # feed-forward width / width
    act: str = "quick_gelu"          # "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2)
    clip_skip: int = 1               # default output layer counted from the last: 1 = last, 2 = penultimate
    layout: str = "openai"           # checkpoint key layout: "openai" (transformers names) or "openclip"
    pad: str = "eot"                 # tokenizer padding: "eot" (SD1) or "zero" (SD2)
    projection_dim: int = 0          # text_projection to CLIP's joint space (0 = none; SD1 files have none)
    final_norm: bool = True          # the final layer norm on the states the UNet reads (SD1/SD2); SDXL reads them raw


@dataclass
class VisionConfig:
    """CLIP's image tower (a ViT), used to train the text tower contrastively and for evaluation."""
    image_size: int = 64             # input side in pixels
    patch_size: int = 8              # side of each patch token
    width: int = 128
    layers: int = 4
    heads: int = 2
    mlp_ratio: float = 4.0
    projection_dim: int = 64         # the joint text-image space


@dataclass
class UNetConfig:
    in_channels: int = 4             # 4 latent channels; 9 for inpainting (latent + masked latent + mask)
    out_channels: int = 4
    model_channels: int = 320        # channels of the first level
    channel_mult: tuple = (1, 2, 4, 4)   # channels per level, as multiples of model_channels
    num_res_blocks: int = 2          # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (0, 1, 2)  # levels (0 = full resolution) that have a SpatialTransformer
    num_heads: int = 8               # heads per attention layer (SD1) ...
    head_dim: int = -1               # ... or a fixed head size (SD2: 64); exactly one of them is > 0
    context_dim: int = 768           # width of the text states read by cross-attention
    transformer_depth: int | tuple = 1   # BasicTransformerBlocks per SpatialTransformer: one for all, or one per
                                         # level (SDXL: 0, 2, 10); the middle block's is the last level's
    use_linear_proj: bool = False    # SD2: proj_in / proj_out are Linear instead of 1x1 Conv
    norm_groups: int = 32            # GroupNorm groups
    time_cond_proj_dim: int = 0      # LCM-distilled UNets: width of the guidance-scale embedding (256); 0 = none
    adm_in_channels: int = 0         # SDXL: width of the vector y (pooled text + embedded sizes) added through label_emb

    def heads_for(self, channels: int) -> int:
        return self.num_heads if self.num_heads > 0 else max(1, channels // self.head_dim)

    def depth_at(self, level: int) -> int:
        """The transformer depth at this level (the middle block: the last level's)."""
        depth = self.transformer_depth
        return depth[level] if isinstance(depth, tuple) else depth


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128                    # channels of the first level
    ch_mult: tuple = (1, 2, 4, 4)    # len(ch_mult) - 1 downsamplings: factor 8
    num_res_blocks: int = 2
    z_channels: int = 4              # latent channels
    norm_groups: int = 32

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class AdapterConfig:
    """A T2I-Adapter (models/t2i_adapter.py): the hint picture to one feature map per UNet level."""
    channels: tuple = (320, 640, 1280, 1280)  # the features of each level: the UNet's channels there
    num_res_blocks: int = 2          # ResnetBlocks per level (TencentARC's nums_rb)
    hint_channels: int = 3           # the hint picture's channels: 3, or 1 for the grey sketch models
    ksize: int = 1                   # kernel size of each block's second convolution and of in_conv
    use_conv: bool = False           # halve the size with a strided convolution instead of average pooling
    xl: bool = False                 # SDXL's layout: the hint folded by 16, only the third level halving


@dataclass
class UpscalerConfig:
    """A super-resolution network in Real-ESRGAN's compact architecture (models/upscaler.py, SRVGGNetCompact)."""
    in_channels: int = 3             # RGB in [0, 1]
    out_channels: int = 3
    num_feat: int = 64               # channels of every convolution but the last
    num_conv: int = 16               # convolutions (each followed by a PReLU) between the first and the last
    scale: int = 4                   # the last convolution makes out_channels * scale**2 channels, pixel-shuffled


@dataclass
class BlipConfig:
    """BLIP's captioning model (Li et al. 2022; models/blip.py): a ViT reads the picture, a BERT decoder with
    cross-attention to the ViT's tokens writes the caption. Defaults are Salesforce/blip-image-captioning-base;
    -large differs only in the ViT (width 1024, 24 layers, 16 heads, hidden 4096)."""
    image_size: int = 384            # the ViT's input side in pixels (the picture is resized to it)
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_hidden: int = 3072        # the ViT's MLP width
    vision_eps: float = 1e-5         # its LayerNorms' epsilon
    vocab_size: int = 30524          # BERT's 30522 WordPieces + [DEC] (the start token) + [ENC]
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_hidden: int = 3072
    text_eps: float = 1e-12
    max_positions: int = 512         # learned positions of the decoder: the longest caption, start token included
    bos_token_id: int = 30522        # [DEC]: every caption starts from it
    sep_token_id: int = 102          # [SEP]: ends a caption
    pad_token_id: int = 0


@dataclass
class CaptionerConfig:
    """plainsd's captioner for the shapes world (models/captioner.py): a small convolutional image encoder and a
    small transformer decoder that writes a caption word by word from a closed vocabulary."""
    words: tuple[str, ...] = ()      # the vocabulary; ids 0, 1, 2 are padding, start and end, words[i] is id i + 3
    image_size: int = 64             # pictures are resized to this side before encoding
    channels: tuple[int, ...] = (32, 64, 128)  # the encoder's stages, each halving the side (64 -> 8 with three)
    width: int = 128                 # the decoder's width (and the image tokens')
    layers: int = 2                  # decoder blocks: causal self-attention, cross-attention to the image, MLP
    heads: int = 4
    max_length: int = 32             # longest caption in tokens, with the start and end tokens


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)  # the text tower (SDXL: the first, CLIP ViT-L; the refiner's bigG)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prediction: str = "eps"          # what the UNet predicts: "eps" (noise), "v" (velocity) or "x0" (the clean
                                     # sample: SDXL-Lightning's 1-step model; diffusers' "sample")
    scale_factor: float = 0.18215    # latents are multiplied by this before the UNet sees them
    resolution: int = 512            # native image size in pixels
    text2: TextConfig | None = None  # SDXL: the second text tower (OpenCLIP ViT-bigG), its states after the first's
    sdxl: str = ""                   # SDXL's conditioning: "base" (pooled text, original size, crop top-left, target
                                     # size) or "refiner" (pooled text, original size, crop, aesthetic score); "" for SD1/2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def make(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**values)

        d = dict(d)
        text2 = make(TextConfig, d["text2"]) if d.get("text2") is not None else None
        return make(cls, {**d, "text": make(TextConfig, d.get("text", {})), "unet": make(UNetConfig, d.get("unet", {})),
                          "vae": make(VAEConfig, d.get("vae", {})), "text2": text2})


def _sd1() -> ModelConfig:
    return ModelConfig()


def _sd2(prediction: str = "eps", resolution: int = 512) -> ModelConfig:
    return ModelConfig(
        text=TextConfig(width=1024, layers=24, heads=16, act="gelu", clip_skip=2, layout="openclip", pad="zero",
                        projection_dim=1024),
        unet=UNetConfig(num_heads=-1, head_dim=64, context_dim=1024, use_linear_proj=True),
        prediction=prediction,
        resolution=resolution,
    )


def _tiny(sd2: bool = False, in_channels: int = 4, prediction: str = "eps") -> ModelConfig:
    """Small enough for tests in seconds; same classes, same key layout.

    The text towers keep CLIP's head size (64), so their head count can be read off a file's shapes.
    """
    if sd2:
        text = TextConfig(width=128, layers=3, heads=2, act="gelu", clip_skip=2, layout="openclip", pad="zero", projection_dim=128)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          num_heads=-1, head_dim=16, context_dim=128, use_linear_proj=True)
    else:
        text = TextConfig(width=128, layers=3, heads=2)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          num_heads=4, context_dim=128)
    unet.in_channels = in_channels
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    return ModelConfig(text=text, unet=unet, vae=vae, prediction=prediction, resolution=64)


# SDXL's text towers: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, both read at their penultimate layer without the
# final layer norm; bigG's pooled output (last layer, final norm, projection) goes to the UNet's vector.
_CLIP_L = TextConfig(clip_skip=2, final_norm=False)
_BIG_G = TextConfig(width=1280, layers=32, heads=20, act="gelu", clip_skip=2, layout="openclip", pad="zero",
                    projection_dim=1280, final_norm=False)


def _sdxl(refiner: bool = False) -> ModelConfig:
    """SDXL base 1.0 and its refiner (stabilityai/generative-models configs/inference/sd_xl_*.yaml)."""
    if refiner:
        unet = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), num_heads=-1,
                          head_dim=64, context_dim=1280, transformer_depth=4, use_linear_proj=True,
                          adm_in_channels=1280 + 5 * 256)
        return ModelConfig(text=dataclasses.replace(_BIG_G), unet=unet, scale_factor=0.13025, resolution=1024,
                           sdxl="refiner")
    unet = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=-1, head_dim=64, context_dim=2048,
                      transformer_depth=(0, 2, 10), use_linear_proj=True, adm_in_channels=1280 + 6 * 256)
    return ModelConfig(text=dataclasses.replace(_CLIP_L), unet=unet, scale_factor=0.13025, resolution=1024,
                       text2=dataclasses.replace(_BIG_G), sdxl="base")


def _tiny_sdxl(refiner: bool = False) -> ModelConfig:
    """SDXL's layout at test size: per-level depth, no attention on the first level, two text towers of different
    widths (so that their order shows), the vector of pooled text and sizes. The UNet keeps SDXL's head size (64)
    and the towers CLIP's, so that a file's shapes give the heads."""
    text_l = TextConfig(width=64, layers=2, heads=1, clip_skip=2, final_norm=False)
    text_g = TextConfig(width=128, layers=3, heads=2, act="gelu", clip_skip=2, layout="openclip", pad="zero",
                        projection_dim=96, final_norm=False)
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    if refiner:
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
                          num_heads=-1, head_dim=64, context_dim=128, transformer_depth=2, use_linear_proj=True,
                          adm_in_channels=96 + 5 * 256)
        return ModelConfig(text=text_g, unet=unet, vae=vae, scale_factor=0.13025, resolution=64, sdxl="refiner")
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
                      num_heads=-1, head_dim=64, context_dim=192, transformer_depth=(0, 1, 2), use_linear_proj=True,
                      adm_in_channels=96 + 6 * 256)
    return ModelConfig(text=text_l, unet=unet, vae=vae, scale_factor=0.13025, resolution=64, text2=text_g, sdxl="base")


PRESETS = {
    "sd15": _sd1,
    "sd15-inpaint": lambda: dataclasses.replace(_sd1(), unet=UNetConfig(in_channels=9)),
    "sd21": _sd2,
    "sd21-v": lambda: _sd2(prediction="v", resolution=768),
    "sd2-inpaint": lambda: dataclasses.replace(_sd2(), unet=dataclasses.replace(_sd2().unet, in_channels=9)),
    "tiny": _tiny,
    "tiny-sd2": lambda: _tiny(sd2=True),
    "tiny-v": lambda: _tiny(sd2=True, prediction="v"),
    "tiny-inpaint": lambda: _tiny(in_channels=9),
    "sdxl": _sdxl,
    "sdxl-refiner": lambda: _sdxl(refiner=True),
    "tiny-sdxl": _tiny_sdxl,
    "tiny-sdxl-refiner": lambda: _tiny_sdxl(refiner=True),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
