"""A1111's /sdapi/v1/interrogate: a picture in (base64), its caption out ({"caption": ...}).

A1111 knows two models: "clip" (its interrogator: a BLIP caption, then phrases from lists of artists, mediums,
movements and flavours ranked by a CLIP's image-text similarity and appended) and "deepdanbooru" (anime tags).
Here "clip" is the server's captioner's caption (`plainsd serve --captioner`; the shipped captioner of the shapes
world when none is given), without the ranked phrases: ranking needs a CLIP with an image tower, and the shipped
checkpoint holds only its text tower (as every SD checkpoint does). "plainsd" always names the shipped captioner,
"blip" the server's captioner when that is a BLIP model. "deepdanbooru" is refused: plainsd has no tagger.
"""

from __future__ import annotations

import threading

from pydantic import BaseModel, ConfigDict, Field

from plainsd.captioning import CAPTIONER_PRECISIONS, ImageCaptioner, captioner_kind, load_captioner

from .api import BadRequest

MODELS = ("clip", "blip", "plainsd")


class InterrogateRequest(BaseModel):
    """A1111's InterrogateRequest."""
    model_config = ConfigDict(extra="forbid")

    image: str = Field("", description="the picture, base64 (a data: URL too)")
    model: str = Field("clip", description="clip: the server's captioner; plainsd: the shipped captioner; blip: the "
                                           "server's captioner if it is a BLIP model")


class InterrogateResponse(BaseModel):
    caption: str | None = None


class Captioners:
    """The server's captioner and the shipped one, each loaded at its first use and then kept."""

    def __init__(self, captioner: str | None = None, precision: str = "auto"):
        self.name = captioner
        # the server's --precision, as far as a captioner takes it (fp16, storage for SDXL weights, computes in fp32)
        self.precision = precision if precision in CAPTIONER_PRECISIONS else "fp32"
        self.kind = captioner_kind(captioner)  # a wrong --captioner is refused when the server starts
        self._loaded: dict[str, ImageCaptioner] = {}
        self._lock = threading.Lock()

    def _get(self, key: str | None) -> ImageCaptioner:
        with self._lock:
            if str(key) not in self._loaded:
                self._loaded[str(key)] = load_captioner(key, self.precision)
            return self._loaded[str(key)]

    def for_model(self, model: str) -> ImageCaptioner:
        """The captioner a request's model names (BadRequest with one sentence for the others)."""
        if model == "deepdanbooru":
            raise BadRequest("model deepdanbooru: plainsd has no DeepDanbooru tagger; allowed: " + ", ".join(MODELS))
        if model not in MODELS:
            raise BadRequest(f"unknown interrogate model {model!r}; allowed: {', '.join(MODELS)}")
        if model == "blip" and self.kind != "blip":
            raise BadRequest("model blip needs a BLIP captioning model, and this server has none; start it with "
                             "`plainsd serve --captioner FOLDER`, or ask for model clip or plainsd")
        return self._get(None if model == "plainsd" else self.name)
