"""Print the N-th (1-based) command of the README's ```bash blocks, exactly as written: CI runs the
README's own commands so that they cannot silently break."""

import re
import sys
from pathlib import Path

readme = Path(__file__).resolve().parent.parent / "README.md"
blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S)
print(blocks[int(sys.argv[1]) - 1].strip())
