"""Every ```python block of the README runs as a user would run it: a fresh interpreter, CPU,
TRITON_INTERPRET unset (so the torch implementations), in the order the README shows them.
The documentation pages' blocks run the same way in tests/test_docs.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_links_resolve():
    """Every relative link of the README (into docs/, mostly) names a file that exists; the
    pages' own links and anchors are checked by `mkdocs build --strict`."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    relative = [t for t in targets if "://" not in t]
    assert relative, "the README links into the documentation"
    missing = [t for t in relative if not (README.parent / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_has_examples():
    # one short example per layer: kernels, policies, aligners, the transformers pipeline
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_example_runs(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], check=False, cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{result.stderr}"
