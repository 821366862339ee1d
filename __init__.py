"""ComfyUI-RFC: Relational Feature Caching for diffusion transformers."""

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

# ComfyUI imports this file as a package named after the pack's folder. pytest
# imports it as a plain module when that folder's name is no Python name (as
# in custom_nodes/ComfyUI-RFC, where users clone it): there is no package to
# import the nodes from then, and no ComfyUI to register them with.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ += ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
