"""Mage-Flow (`MageFlowTransformer2DModel`): Qwen-Image's blocks in a model of
its own, reached through `patches_replace["dit"]["double_block"]` with the
same arguments, so the module input is Qwen-Image's."""

from __future__ import annotations

from .qwen_image import QwenImageAdapter


class MageFlowAdapter(QwenImageAdapter):
    family = "mage_flow"
    model_classes = ("comfy.ldm.mage_flow.model.MageFlowTransformer2DModel",)


ADAPTERS = (MageFlowAdapter(),)
