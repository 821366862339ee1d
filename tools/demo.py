"""The demo: the benchmark on the bundled model, with everything it needs
installed first into .venv (once). Arguments go to `benchmarks.run`."""

import sys

import environment

environment.replace_with(environment.ensure("demo", ["numpy", "safetensors", "pillow", "matplotlib"]),
                         "-m", "benchmarks.run", *sys.argv[1:])
