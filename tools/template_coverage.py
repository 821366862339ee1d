"""How much of the official workflow templates' use the pack caches at block
level, as whole model calls, or on no class it has tested.

Reads the templates index of the PyPI package comfyui-workflow-templates-json
(`templates/index.json`, with each template's `usage`) and the local
templates' workflow files, takes the diffusion model files each one loads
(the `models` its loader nodes list, and what its UNETLoader and checkpoint
loaders name), and maps every file to a family through MODEL_FILES below: a
file name pattern, the family, and how the pack runs it. A template counts at
the granularity of its diffusion model; with several, at the coarsest of them.
Preprocessor models (a depth model ahead of the sampler) count only where a
template has nothing else. Templates that load no diffusion model (language
models, segmentation, depth estimation, frame interpolation) are left out;
API templates (`openSource` false) too.

Standard library only; it needs neither ComfyUI nor torch.

    python tools/template_coverage.py                       # the package installed in this Python
    python tools/template_coverage.py --templates DIR       # a folder holding index.json and the templates
    python tools/template_coverage.py --top 30 --templates-per-family
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "comfyui_workflow_templates_json"
BLOCKS, MODEL, NONE = "blocks", "model", "none"
LABELS = {BLOCKS: "block level", MODEL: "whole model", NONE: "no tested class"}
# The coarsest granularity wins where a template runs several models.
COARSENESS = {BLOCKS: 0, MODEL: 1, NONE: 2}
# Loader nodes whose first widget names a diffusion model file.
MODEL_LOADERS = {"UNETLoader", "UnetLoaderGGUF", "CheckpointLoaderSimple", "ImageOnlyCheckpointLoader"}
MODEL_FOLDERS = {"diffusion_models", "checkpoints", "unet"}


@dataclass(frozen=True)
class ModelFile:
    pattern: str  # regular expression, matched at the start of the lower-case file name
    family: str
    granularity: str | None  # None: not a diffusion model, the file is ignored
    basis: str  # why: the class and its test, or what is missing
    adapter: str | None = None  # the pack's adapter family, for block level
    preprocessor: bool = False


# Granularity is what the pack does with the ComfyUI class the file loads into:
# "blocks" where that class has an adapter (named) whose host tests pass,
# "model" where the class is cached as whole model calls with a host test
# (U-Nets through SD1.5 and SDXL), "none" where the class is in no tree
# tested here, or is left uncached.
MODEL_FILES = (
    ModelFile(r"minimax_h3_|fastvideo_fasth3_|fasth3_", "MiniMax H3", BLOCKS,
              "MiniMaxH3Model (test_family_minimax_h3)", "minimax_h3"),
    ModelFile(r"ltx-2\.5-", "LTX-2.5", BLOCKS, "LTXAVModel with ff_bias off and the keyframe marker "
                                              "(test_family_ltx25, ComfyUI after v0.31)", "ltx2"),
    ModelFile(r"ltx-2(\.3)?-", "LTX-2 / 2.3", BLOCKS, "LTXAVModel (test_family_ltx2)", "ltx2"),
    ModelFile(r"ltx-video-", "LTXV", BLOCKS, "LTXVModel", "ltxv"),
    ModelFile(r"qwen_image_2\.1", "Qwen-Image 2.1", BLOCKS, "QwenImage21Transformer2DModel (on the overlay)",
              "qwen_image21"),
    ModelFile(r"qwen_image", "Qwen-Image and Edit", BLOCKS, "QwenImageTransformer2DModel", "qwen_image"),
    ModelFile(r"firered-image-edit", "Qwen-Image and Edit", BLOCKS, "FireRed Image Edit, a Qwen-Image-Edit fine-tune",
              "qwen_image"),
    ModelFile(r"z_image", "Z-Image", BLOCKS, "NextDiT", "lumina2"),
    ModelFile(r"netayume|newbie-image", "Lumina 2 (NetaYume, NewBie)", BLOCKS, "NextDiT", "lumina2"),
    ModelFile(r"ming_image", "Ming image", NONE, "a NextDiT variant of ComfyUI after v0.31, in no tree tested here"),
    ModelFile(r"wan_animate_2", "Wan Animate 2", BLOCKS, "a WanModel subclass", "wan"),
    ModelFile(r"causal_forcing", "Wan CausalAR (ar_video sampler)", NONE,
              "left uncached: the ar_video sampler keeps its own K/V cache across calls"),
    ModelFile(r"wan2\.2_bernini_r", "Wan 2.2 (Bernini-R)", BLOCKS, "Wan 2.2 weights", "wan"),
    ModelFile(r"wan2\.1_14b_scail", "Wan SCAIL-2", BLOCKS, "WAN21_SCAIL2, a WanModel subclass", "wan"),
    ModelFile(r"wan2\.2_|wan2\.1_|wan2_1-|wan21-", "Wan 2.1 / 2.2", BLOCKS, "WanModel and its variants", "wan"),
    ModelFile(r"chrono_edit", "Wan 2.1 (ChronoEdit)", BLOCKS, "Wan 2.1 I2V weights", "wan"),
    ModelFile(r"humo_", "Wan HuMo", BLOCKS, "HumoWanModel", "wan"),
    ModelFile(r"krea2", "Krea 2", BLOCKS, "SingleStreamDiT", "krea2"),
    ModelFile(r"flux3", "FLUX 3", NONE, "a class of ComfyUI v0.41, of which no file is to be had here"),
    ModelFile(r"flux2|flux-2-", "FLUX.2", BLOCKS, "Flux with global modulation", "flux"),
    ModelFile(r"flux1|flux\.1", "FLUX.1", BLOCKS, "Flux", "flux"),
    ModelFile(r"chroma-radiance", "Chroma Radiance", BLOCKS, "ChromaRadiance, a Chroma", "chroma"),
    ModelFile(r"chroma", "Chroma", BLOCKS, "Chroma", "chroma"),
    ModelFile(r"longcat_image", "LongCat-Image", BLOCKS, "Flux", "flux"),
    ModelFile(r"ovis_image", "Ovis-Image", BLOCKS, "Flux (with its MLP variant)", "flux"),
    ModelFile(r"sd3\.5", "SD3.5", BLOCKS, "MMDiT", "sd3"),
    ModelFile(r"sd_xl", "SDXL", MODEL, "a U-Net, no transformer blocks to cache one by one "
                                       "(test_family_unet_fallback)"),
    ModelFile(r"svd", "SVD", MODEL, "a U-Net"),
    ModelFile(r"lotus-depth", "Lotus depth", MODEL, "an SD2 U-Net depth model", preprocessor=True),
    ModelFile(r"hidream_o1", "HiDream-O1", MODEL, "any block patch turns off its prefix K/V cache"),
    ModelFile(r"hidream_", "HiDream", BLOCKS, "HiDreamImageTransformer2DModel", "hidream"),
    ModelFile(r"anima-", "Anima", BLOCKS, "MiniTrainDIT", "cosmos_predict2"),
    ModelFile(r"hunyuanvideo1\.5|hunyuan_video", "HunyuanVideo / 1.5", BLOCKS, "HunyuanVideo", "hunyuan_video"),
    ModelFile(r"kandinsky5", "Kandinsky 5", BLOCKS, "Kandinsky5", "kandinsky5"),
    ModelFile(r"mage_flow", "Mage-Flow", BLOCKS, "MageFlowTransformer2DModel", "mage_flow"),
    ModelFile(r"lens_", "Lens", BLOCKS, "LensTransformer2DModel", "lens"),
    ModelFile(r"ernie-image", "ERNIE-Image", BLOCKS, "ErnieImageModel", "ernie_image"),
    ModelFile(r"ideogram4", "Ideogram 4", BLOCKS, "Ideogram4Transformer2DModel", "ideogram4"),
    ModelFile(r"joyai_image", "JoyImage", BLOCKS, "JoyImageTransformer3DModel", "joyimage"),
    ModelFile(r"omnigen2", "OmniGen2", BLOCKS, "OmniGen2Transformer2DModel", "omnigen2"),
    ModelFile(r"seedvr2", "SeedVR2", MODEL, "NaViT-packed rows, no DIFFUSION_MODEL wrapper; its templates sample "
                                           "one step, where nothing is skipped"),
    ModelFile(r"stable_audio_3|stable-audio-open", "Stable Audio", MODEL,
              "its block patch point drops local_add_cond, a pass-through patch changes the output; its templates "
              "sample 8 steps at cfg 1"),
    ModelFile(r"acestep_v1\.5|ace_step_1\.5", "ACE-Step 1.5", MODEL, "no block patch point"),
    ModelFile(r"ace_step_v1_", "ACE-Step 1", NONE, "ACEStepTransformer, not tested"),
    ModelFile(r"boogu", "Boogu", MODEL, "no block patch point"),
    ModelFile(r"pixeldit", "PixelDiT", MODEL, "two block stacks in pixel space"),
    ModelFile(r"pid_", "PiD", MODEL, "two block stacks in pixel space"),
    ModelFile(r"moss_image", "MOSS-Image", NONE, "no ComfyUI file of it is to be had here"),
    ModelFile(r"pixal3d", "Pixal3D", NONE, "no ComfyUI file of it is to be had here"),
    ModelFile(r"trellis_2", "TRELLIS.2", NONE, "sparse voxels (comfy/ldm/trellis2 after v0.31), not tested"),
    ModelFile(r"triposplat", "TripoSplat", NONE, "not tested"),
    ModelFile(r"hunyuan3d|hunyuan_3d", "Hunyuan3D", NONE, "not tested"),
    ModelFile(r"capybara", "Capybara", NONE, "no ComfyUI file of it is to be had here"),
    ModelFile(r"fibo2", "Fibo 2.0", NONE, "no ComfyUI file of it is to be had here"),
    ModelFile(r"void_pass", "VOID", NONE, "no ComfyUI file of it is to be had here"),
    ModelFile(r"minimax_music", "MiniMax Music 3", NONE,
              "after v0.31 (the v0.39.0 file): no block patch point, no transformer options reach its blocks, which "
              "run once per 100-frame window, several windows per model call; not tested"),
    ModelFile(r"sdpose", "SDPose", NONE, "a one-pass pose model, not tested", preprocessor=True),
    # Not diffusion models.
    ModelFile(r"yue2", "YuE2", None, "an autoregressive music language model"),
    ModelFile(r"sam3", "SAM 3", None, "segmentation"),
    ModelFile(r"rt_detr", "RT-DETR", None, "detection"),
)


def model_file(name: str) -> ModelFile | None:
    lowered = Path(name).name.lower()
    for entry in MODEL_FILES:
        if re.match(entry.pattern, lowered):
            return entry
    return None


def template_files(workflow: dict) -> set[str]:
    """The diffusion model files a workflow loads, in its subgraphs too."""
    nodes = list(workflow.get("nodes") or [])
    for subgraph in (workflow.get("definitions") or {}).get("subgraphs") or []:
        nodes += subgraph.get("nodes") or []
    files = set()
    for node in nodes:
        for entry in (node.get("properties") or {}).get("models") or []:
            if entry.get("directory") in MODEL_FOLDERS and entry.get("name"):
                files.add(entry["name"])
        values = node.get("widgets_values")
        if node.get("type") in MODEL_LOADERS and isinstance(values, list) and values and isinstance(values[0], str):
            files.add(values[0])
    return files


@dataclass
class Template:
    name: str
    usage: int
    files: tuple[str, ...]
    family: str
    granularity: str


def classify(name: str, usage: int, files) -> Template | None:
    """The template as the pack runs it, or None where it loads no diffusion
    model. Raises on a model file MODEL_FILES does not know."""
    known = []
    for file in sorted(files):
        entry = model_file(file)
        if entry is None:
            raise KeyError(f"{name}: no entry in MODEL_FILES for {file!r}")
        if entry.granularity is not None:
            known.append(entry)
    main = [entry for entry in known if not entry.preprocessor] or known
    if not main:
        return None
    coarsest = max(main, key=lambda entry: COARSENESS[entry.granularity])
    return Template(name, usage, tuple(sorted(files)), coarsest.family, coarsest.granularity)


def templates_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed in this Python ({sys.executable}): install "
                         f"comfyui-workflow-templates-json, run a Python that has it, or pass --templates")
    return Path(list(spec.submodule_search_locations)[0]) / "templates"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("comfyui-workflow-templates-json")
    except Exception:
        return "unknown version"


def load(folder: Path) -> tuple[list[Template], int]:
    """The local templates that run a diffusion model, and how many local templates there are."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    found, local = [], 0
    for category in index:
        for entry in category.get("templates") or []:
            path = folder / f"{entry['name']}.json"
            if entry.get("openSource") is False or not path.exists():
                continue
            local += 1
            workflow = json.loads(path.read_text(encoding="utf-8"))
            template = classify(entry["name"], int(entry.get("usage") or 0), template_files(workflow))
            if template is not None:
                found.append(template)
    return found, local


def shares(templates: list[Template]) -> dict[str, float]:
    total = sum(template.usage for template in templates) or 1
    return {granularity: sum(t.usage for t in templates if t.granularity == granularity) / total
            for granularity in LABELS}


def by_family(templates: list[Template]) -> list[tuple[str, str, int, int]]:
    """(family, granularity, uses, templates), most used first."""
    families: dict[tuple[str, str], list[int]] = {}
    for template in templates:
        counts = families.setdefault((template.family, template.granularity), [0, 0])
        counts[0] += template.usage
        counts[1] += 1
    return sorted(((family, granularity, uses, count) for (family, granularity), (uses, count) in families.items()),
                  key=lambda row: -row[2])


def coverage_line(templates: list[Template], version: str) -> str:
    share = shares(templates)
    return (f"Official templates (comfyui-workflow-templates-json {version}, local templates weighted by use): "
            f"{share[BLOCKS]:.1%} of the diffusion templates' use runs at block level, {share[MODEL]:.1%} as whole "
            f"model calls, {share[NONE]:.1%} on no tested class (tools/template_coverage.py).")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", help="folder with index.json and the template files (default: the package's)")
    parser.add_argument("--top", type=int, default=20, help="families to list, most used first")
    parser.add_argument("--templates-per-family", action="store_true", help="list each family's templates")
    args = parser.parse_args(argv)
    templates, local = load(templates_folder(args.templates))
    total = sum(template.usage for template in templates)
    print(f"{local} local templates; {len(templates)} run a diffusion model, {total} uses")
    for granularity, share in shares(templates).items():
        uses = sum(t.usage for t in templates if t.granularity == granularity)
        print(f"  {LABELS[granularity]:<16} {share:6.1%}  {uses:>7} uses")
    print(f"\nthe {args.top} most used families")
    for rank, (family, granularity, uses, count) in enumerate(by_family(templates)[:args.top], 1):
        entry = next(entry for entry in MODEL_FILES if entry.family == family)
        basis = f"{entry.basis}, {entry.adapter} adapter" if entry.adapter else entry.basis
        print(f"{rank:>3}. {family:<32} {LABELS[granularity]:<16} {uses / total:6.1%} {uses:>7} uses, "
              f"{count} templates: {basis}")
        if args.templates_per_family:
            for template in sorted((t for t in templates if t.family == family), key=lambda t: -t.usage):
                print(f"       {template.usage:>7}  {template.name}  {', '.join(template.files)}")
    print()
    print(coverage_line(templates, package_version()))


if __name__ == "__main__":
    main()
