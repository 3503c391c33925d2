"""The wheel holds every subpackage of the tree and the shipped configs; shipped configs resolve by name."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lit_dalle.cli import shipped_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_wheel_holds_every_subpackage_and_config(wheel):
    names = set(wheel.namelist())
    for init in (ROOT / "lit_dalle").rglob("__init__.py"):
        assert str(init.relative_to(ROOT)) in names, f"{init} missing from the wheel: add it to pyproject `packages`"
    for config in (ROOT / "configs").rglob("*.yaml"):
        assert f"lit_dalle/configs/{config.relative_to(ROOT / 'configs')}" in names


def test_shipped_configs_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(shipped_config("configs/prior.yaml")).read_text() == (ROOT / "configs" / "prior.yaml").read_text()
    assert Path(shipped_config("paper/dvae.yaml")).is_file()
    assert shipped_config("nope.yaml") == "nope.yaml"  # not ours: left for the CLI to report
