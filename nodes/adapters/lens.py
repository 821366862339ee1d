"""Lens (`LensTransformer2DModel`). Its double blocks are laid out as
Qwen-Image's: an `img_mod` of six chunks (shift and scale of the attention
first) and an `img_norm1` (an RMS norm here, a layer norm there) whose
modulated output feeds the image query/key/value, so Qwen-Image's module
input applies as it is. Its joint sequence is [image, text], which only the
attention sees."""

from __future__ import annotations

from .qwen_image import QwenImageAdapter


class LensAdapter(QwenImageAdapter):
    family = "lens"
    model_classes = ("comfy.ldm.lens.model.LensTransformer2DModel",)


ADAPTERS = (LensAdapter(),)
