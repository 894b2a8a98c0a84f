"""ruff over the package and the tests, at ament_flake8's line length (99)."""

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
    result = subprocess.run(
        [ruff, "check", "--line-length", "99", "clip_perception", "test", "scripts/lib"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
