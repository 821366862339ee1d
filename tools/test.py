"""The tests, with everything they need installed first into .venv (once).
Host tests skip, saying why, unless COMFYUI_PATH names a ComfyUI checkout
whose own requirements this Python has. Arguments go to pytest."""

import sys

import environment

environment.replace_with(environment.ensure("test", ["numpy", "safetensors", "pytest"]),
                         "-m", "pytest", "tests", "-q", "-rs", *sys.argv[1:])
