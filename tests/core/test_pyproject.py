"""pyproject.toml as the Comfy Registry reads it."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and newer")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_node_id_is_registry_valid_and_leaves_comfyui_out(pyproject):
    name = pyproject["project"]["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()


def test_required_project_fields(pyproject):
    project = pyproject["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["description"]
    assert "Repository" in project["urls"], "the registry needs [project.urls] Repository"
    repository = project["urls"]["Repository"]
    assert repository == "" or repository.startswith("https://"), repository
    assert project["classifiers"]
    requirements = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()}
    assert set(project["dependencies"]) == requirements


def test_tool_comfy_fields(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "ComfyUI-RFC"
    assert (ROOT / comfy["Icon"]).is_file()
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
