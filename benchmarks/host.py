"""Running the bundled model inside a real ComfyUI: its Flux class, its
sampler, the pack's nodes as ComfyUI loads them, and core's EasyCache node.

Used by the benchmark (with COMFYUI_PATH) and by the host tests.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .methods import Method, SampleResult, seeded_noise
from .tiny_flux import BUNDLED_WEIGHTS, LABEL_POOLED_KEY, LABEL_TOKENS_KEY, bundled_metadata, load_bundled

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER = "ComfyUI-RFC"
# Packs users install next to this one whose interplay the host tests check
# (GGUF weights), loaded too when the ComfyUI tree has them in custom_nodes.
COMPANION_PACKS = ("ComfyUI-GGUF",)


def boot_comfyui(comfyui_path: str):
    """Import ComfyUI on the CPU and load this pack (and COMPANION_PACKS the
    tree has) from a custom_nodes folder through ComfyUI's own loader.
    Returns ComfyUI's `nodes` module."""
    if comfyui_path not in sys.path:
        sys.path.insert(0, comfyui_path)
    # As ComfyUI's main.py does, before `nodes` puts comfy/ first on the
    # path: otherwise `utils` resolves to comfy/utils.py and the core nodes
    # that import utils.install_util (SaveAnimatedWEBP among them) fail.
    import utils.extra_config  # noqa: F401
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths
    import nodes

    if "RFCCache" in nodes.NODE_CLASS_MAPPINGS:
        return nodes
    custom_nodes = Path(tempfile.mkdtemp(prefix="rfc-custom-nodes-"))
    (custom_nodes / PACK_FOLDER).symlink_to(PACK_ROOT, target_is_directory=True)
    for name in COMPANION_PACKS:
        installed = Path(comfyui_path) / "custom_nodes" / name
        if installed.is_dir():
            (custom_nodes / name).symlink_to(installed.resolve(), target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if "RFCCache" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("ComfyUI did not load the pack; see the log above")
    return nodes


class BlockCounter:
    """Counts forward calls of transformer blocks with torch hooks, so the
    count does not depend on anything the pack reports."""

    def __init__(self, blocks):
        self.calls = 0
        self.handles = [block.register_forward_hook(self._count) for block in blocks]

    def _count(self, module, inputs, output):
        self.calls += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


# Fields ComfyUI added to a family's params dataclass after the family first
# shipped, each with the value that builds the model as it was before the
# field existed. Tiny test models name only the fields they need; the rest
# is read from the dataclass of the ComfyUI at hand, so a new required field
# fails here, by name, instead of deep inside a model constructor.
NEUTRAL_PARAMS = {
    "txt_ids_dims": [],  # FLUX.1 and Chroma: text ids stay zero
    "vec_in_dim": None,  # Chroma: no pooled vector (it never had one)
    "use_cond_type_embedding": False,  # HunyuanVideo: 1.0 and HunyuanImage 2.1 have none
    "vision_in_dim": None,
    "meanflow_sum": False,
}

# unet_config["image_model"] -> the dataclass its diffusion model reads its params from.
PARAMS_DATACLASSES = {
    "flux": ("comfy.ldm.flux.model", "FluxParams"),
    "flux2": ("comfy.ldm.flux.model", "FluxParams"),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams"),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams"),
}


def complete_params(unet_config: dict) -> dict:
    """`unet_config` with every required field of its family's params
    dataclass that it leaves out filled with the neutral value."""
    completed = dict(unet_config)
    location = PARAMS_DATACLASSES.get(unet_config.get("image_model"))
    if location is None:
        return completed
    module_name, class_name = location
    params = getattr(importlib.import_module(module_name), class_name)
    for field in dataclasses.fields(params):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if not required or field.name in completed:
            continue
        if field.name not in NEUTRAL_PARAMS:
            raise RuntimeError(f"this ComfyUI's {class_name} has a required field {field.name!r} the tiny models "
                               f"do not know; add its neutral value to NEUTRAL_PARAMS in benchmarks/host.py")
        completed[field.name] = copy.deepcopy(NEUTRAL_PARAMS[field.name])
    return completed


def load_as_checkpoint(model, state_dict: dict, unused: tuple[str, ...] = ()) -> None:
    """Load diffusion model weights through the model config's own key
    conversion, as ComfyUI loads a checkpoint (Flux's QK-norm `.scale` keys
    are `.weight` parameters in newer ComfyUI), but strictly: a key the
    model does not take fails here instead of being logged and dropped.
    unused: parameters the class builds but its forward never reads, which
    a checkpoint may lack."""
    converted = model.model_config.process_unet_state_dict(dict(state_dict))
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if key not in unused]
    if missing or unexpected:
        raise RuntimeError(f"the weights do not fit this ComfyUI's {type(model.diffusion_model).__name__}: "
                           f"missing {missing}, unexpected {unexpected}")


# NextDiT constructor keys older ComfyUI does not take, each with the value
# that ComfyUI then builds in: a config at that value still loads there.
NEXTDIT_BUILT_IN = {"rope_theta": 10000.0, "z_image_modulation": False, "time_scale": 1.0}
# v0.3.64's NextDiT builds a final RMSNorm that its forward never applies.
NEXTDIT_UNUSED = ("norm_final.weight",)


def comfy_nextdit(config: dict, state_dict: dict):
    """A TinyNextDiT config and state dict in ComfyUI's own NextDiT (its
    Lumina 2 model config), loaded as a checkpoint; None when this ComfyUI's
    NextDiT cannot build that config (Z-Image's modulation before v0.3.7x)."""
    model = comfy_lumina2_model(config, state_dict)
    return None if model is None else model.diffusion_model


def comfy_nextdit_from_bundled():
    """The bundled NextDiT in ComfyUI's own Lumina 2 model, as a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    from safetensors.torch import load_file

    from .tiny_nextdit import BUNDLED_NEXTDIT_WEIGHTS, load_bundled_nextdit

    ours, _, _ = load_bundled_nextdit()
    state = {k: v.float() for k, v in load_file(str(BUNDLED_NEXTDIT_WEIGHTS)).items() if k != LABEL_TOKENS_KEY}
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(comfy_lumina2_model(ours.config, state), load_device=device,
                                            offload_device=device)


def comfy_lumina2_model(config: dict, state_dict: dict):
    """comfy_nextdit's BaseModel (the diffusion model with its sampling)."""
    import inspect

    import comfy.ldm.lumina.model
    import comfy.supported_models

    accepted = inspect.signature(comfy.ldm.lumina.model.NextDiT.__init__).parameters
    unet_config = {"image_model": "lumina2"}
    for key, value in config.items():
        if key in accepted:
            unet_config[key] = value
        elif NEXTDIT_BUILT_IN.get(key, object()) != value:
            return None

    def build():
        model_config = comfy.supported_models.Lumina2(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        return model_config.get_model({})

    model = build()
    built = model.diffusion_model.layers[0].feed_forward.w1.out_features
    wanted = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    if built != wanted:
        # v0.3.64 applies ffn_dim_multiplier to 4 * dim, later versions to
        # dim: scale it so this ComfyUI builds the feed-forward the weights have.
        unet_config["ffn_dim_multiplier"] = config["ffn_dim_multiplier"] * wanted / built
        model = build()
    load_as_checkpoint(model, state_dict, unused=NEXTDIT_UNUSED)
    return model


def comfy_flux_from_bundled(path: Path = BUNDLED_WEIGHTS):
    """The bundled weights in ComfyUI's own Flux class, as a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    unet_config = complete_params({"image_model": "flux", **json.loads(bundled_metadata(path)["flux_config"])})
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    load_as_checkpoint(model, {k: v.float() for k, v in load_file(str(path)).items()
                               if k not in (LABEL_TOKENS_KEY, LABEL_POOLED_KEY)})
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def host_methods(methods):
    """Core's EasyCache node stands in for the whole-model rule; Spectrum,
    which has no node in ComfyUI itself, runs standalone only."""
    return [Method("EasyCache node (core)", None, "easycache") if m.scheduler == "easycache" else m
            for m in methods if m.scheduler != "spectrum"]


class HostSampler:
    """The benchmark's sample set through ComfyUI: euler, simple schedule, real CFG."""

    def __init__(self, comfyui_path: str, labels: torch.Tensor, seeds: list[int], steps: int, cfg: float):
        self.nodes = boot_comfyui(comfyui_path)
        import comfyui_version

        self.version = f"ComfyUI {comfyui_version.__version__}"
        self.model = comfy_flux_from_bundled()
        _, encoder, _ = load_bundled()
        self.steps, self.cfg = steps, cfg
        channels = self.model.model.diffusion_model.params.in_channels
        self.noise = seeded_noise(seeds, channels)
        tokens, pooled = encoder(labels)
        empty_tokens, empty_pooled = encoder(torch.full_like(labels, encoder.empty))
        self.positive = [[tokens, {"pooled_output": pooled}]]
        self.negative = [[empty_tokens, {"pooled_output": empty_pooled}]]
        self.latent_format = self.model.model.latent_format

    def patched(self, method: Method | None, setting, max_skip: int):
        if method is None:
            return self.model
        if method.scheduler == "easycache":
            node = self.nodes.NODE_CLASS_MAPPINGS["EasyCache"]
            return node.execute(model=self.model, reuse_threshold=float(setting), start_percent=0.0,
                                end_percent=1.0, verbose=False).result[0]
        # The node's widgets are the config's fields: the node gets exactly
        # what the standalone benchmark runs.
        widgets = dataclasses.asdict(method.config(setting, max_skip))
        return self.nodes.NODE_CLASS_MAPPINGS["RFCCacheAdvanced"]().apply(self.model, **widgets)[0]

    @torch.no_grad()
    def run(self, method: Method | None = None, setting=None, max_skip: int = 50) -> SampleResult:
        import comfy.sample

        model = self.patched(method, setting, max_skip)
        diffusion_model = model.model.diffusion_model
        first = BlockCounter([diffusion_model.double_blocks[0]])
        every = BlockCounter(list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks))
        start = time.perf_counter()
        try:
            latent = comfy.sample.sample(model, self.noise, self.steps, self.cfg, "euler", "simple", self.positive,
                                         self.negative, torch.zeros_like(self.noise), seed=0, disable_pbar=True)
        finally:
            first.close()
            every.close()
        seconds = time.perf_counter() - start
        # Back to the model's own space, where the bundled "VAE" decodes.
        return SampleResult(self.latent_format.process_in(latent), first.calls, every.calls, None, seconds)
