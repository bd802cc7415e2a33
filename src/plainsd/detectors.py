"""ControlNet preprocessors ("modules" in A1111's ControlNet extension): a picture in, the hint image out.

Hints are RGB images, white (or coloured) lines and areas on black, as the ControlNet models were trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ValueError("the canny preprocessor needs OpenCV: pip install 'plainsd[controlnet]'") from None
    return cv2


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV's Canny edge detector on the RGB picture with the extension's thresholds: white edges on black."""
    edges = _cv2().Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")
