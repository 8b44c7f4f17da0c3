"""Every ```python block of every documentation page (docs/**/*.md) runs as a user would run it:
a fresh interpreter, CPU, TRITON_INTERPRET unset, from an empty folder (tests/test_readme.py does
the same for the README). Each takes seconds, except the Gemma 3 270M example on the pipeline
page, which loads the real model (about 15 s once `proxykv fetch gemma3-270m` has cached it).

Also: the README and the pages together keep at least the examples the README held before the
pages existed, and every README section a page includes (pymdownx.snippets' `--8<--`) exists."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [(page.relative_to(DOCS).as_posix(), index, code)
          for page in PAGES for index, code in enumerate(FENCE.findall(page.read_text()))]

#: the README's 9 examples moved to the pages when the site was made, plus train_aligner's and
#: the zoo's; the README's own short examples are counted by tests/test_readme.py
MIN_DOC_BLOCKS = 11


def test_docs_keep_their_examples():
    assert len(BLOCKS) >= MIN_DOC_BLOCKS, [f"{page} #{index}" for page, index, _ in BLOCKS]


def test_included_readme_sections_exist():
    readme = (ROOT / "README.md").read_text()
    included = {name for page in PAGES
                for name in re.findall(r'--8<-- "README\.md:([\w-]+)"', page.read_text())}
    assert included, "the pages include README sections (the overview, the families table)"
    for name in included:
        start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
        assert start in readme and end in readme, f"README.md lacks the section {name!r}"
        assert readme.index(start) < readme.index(end)


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{p}#{i}" for p, i, _ in BLOCKS])
def test_docs_example_runs(page, index, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{page} block {index} failed:\n{code}\n{result.stderr}"
