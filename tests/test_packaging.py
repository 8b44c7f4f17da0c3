"""What a fresh machine needs: the package's own requirements, and CI running the README."""

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _core_requirements() -> set[str]:
    """The installed package's requirements outside any extra."""
    return {re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower()
            for requirement in requires("proxykv") if "extra ==" not in requirement}


def test_core_requirements_cover_the_main_command():
    # The README's first command installs no extra; Triton's interpreter imports numpy, which the
    # CPU torch wheel does not bring.
    assert {"torch", "triton", "numpy", "safetensors"} <= _core_requirements()


def test_ci_runs_the_readme_commands_as_written():
    script = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py 1" in script and "readme_command.py 2" in script
    first, second = (subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), n],
                                    capture_output=True, text=True, check=True).stdout.strip()
                     for n in ("1", "2"))
    readme = (ROOT / "README.md").read_text()
    assert readme.index(first) < readme.index(second)
    assert "pip install -e" in first and "[test]" not in first and "proxykv demo" in first
    assert "pytest" in second
