"""The root command: `model-server --version`, `python -m model_server --version`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import model_server

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_version_is_the_project_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert model_server.__version__ == project["version"]


@pytest.mark.parametrize("how", ["module", "script"])
def test_version_prints_the_package_version_and_exits_0(how):
    if how == "module":
        argv = [sys.executable, "-m", "model_server", "--version"]
    else:
        script = shutil.which("model-server", path=str(Path(sys.executable).parent))
        if script is None:
            pytest.skip("the model-server console script is not installed next to this Python")
        argv = [script, "--version"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"model-server {model_server.__version__}\n"
    assert done.stderr == ""
