"""Every ```python block of README.md runs as written, in a fresh interpreter.

Each block is run on its own (``python -c``), from an empty scratch folder, so a block
that leans on a name from another block, on a file of the repository or on the current
directory fails here. Blocks that import torchvision are skipped where torchvision
cannot be imported (it is not a dependency of the package).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A fence opening "```python" at the start of a line, up to the next closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Optional packages a README block may import; the block is skipped when they are missing.
OPTIONAL = ("torchvision",)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the opening fence, code)`` of every ```python block in ``text``."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _imports(code: str, module: str) -> bool:
    return re.search(rf"^\s*(import|from)\s+{module}\b", code, re.MULTILINE) is not None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None and __import__(module) is not None
    except Exception:  # installed but broken (e.g. built for another torch): not usable
        return False


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The package under test is this checkout's, whatever the scratch folder is.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("MPLBACKEND", "Agg")
    # One intra-op thread: on a machine whose other cores are busy (CI runners, shared
    # boxes) every OpenMP region of a 2-thread torch waits a scheduler slice for the
    # second worker; the training block took 95 s instead of 19 s (load 10, 2 cores).
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its python examples (or the fence pattern broke)"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path):
    for module in OPTIONAL:
        if _imports(code, module) and not _has(module):
            pytest.skip(f"the block at README.md:{line} needs {module}, which is not importable here")
    r = run_block(code, tmp_path)
    if r.returncode != 0:
        pytest.fail(f"the python block at README.md:{line} fails in a fresh interpreter "
                    f"(exit {r.returncode}):\n{r.stderr[-3000:]}", pytrace=False)


def test_a_failing_block_fails(tmp_path):
    # The harness itself: a block that raises must come back as a failure, and the
    # scratch folder must not see the repository (README blocks may not read its files).
    assert run_block("raise SystemExit(3)", tmp_path).returncode == 3
    assert run_block("import os; assert not os.path.exists('README.md')", tmp_path).returncode == 0
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\nundefined_name\n```\n"
    blocks = python_blocks(text)
    assert blocks == [(2, "print(1)\n"), (8, "undefined_name\n")]
    r = run_block(blocks[1][1], tmp_path)
    assert r.returncode != 0 and "NameError" in r.stderr
