"""A virtual environment for the pack's own commands, made on first use in
`.venv` at the repository root and reused afterwards. Standard library only:
this runs before anything else is installed.

It sees the Python's own site-packages, so a torch already installed there
(ComfyUI's, say) is used as it is instead of downloading another."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
# The CPU build this project's CI image ships; where there is no such wheel
# any torch from 2.1 on works, and pip is asked for that instead.
PREFERRED_TORCH = "torch==2.13.0"
ANY_TORCH = "torch>=2.1"


def python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*command) -> None:
    print("$", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def _has(module: str) -> bool:
    return subprocess.run([str(python()), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure(purpose: str, packages: list[str]) -> Path:
    """The environment's Python, with torch and `packages` installed. A stamp
    per purpose records what was installed, so a second run installs nothing."""
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    if not python().exists():
        print(f"Creating {VENV} (once)", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(VENV)
    stamp = VENV / f"rfc-{purpose}.txt"
    wanted = "\n".join(packages)
    if stamp.exists() and stamp.read_text() == wanted and _has("torch"):
        return python()
    pip = [python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not _has("torch"):
        try:
            _run(*pip, PREFERRED_TORCH)
        except subprocess.CalledProcessError:
            _run(*pip, ANY_TORCH)
    _run(*pip, *packages)
    stamp.write_text(wanted)
    return python()


def replace_with(environment_python: Path, *arguments: str) -> None:
    """Run the command in the environment, from the repository root, and exit with its status."""
    os.chdir(ROOT)
    sys.exit(subprocess.run([str(environment_python), *arguments]).returncode)
