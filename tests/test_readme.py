"""Every ```python block of README.md and docs/*.md runs as written, in a fresh interpreter.

Each block is run on its own (``python -c``), from an empty scratch folder, so a block
that leans on a name from another block, on a file of the repository or on the current
directory fails here. Blocks that import torchvision are skipped where torchvision
cannot be imported (it is not a dependency of the package). Besides: the README's set-up
commands are the ones CI runs, and every relative link of the README, the docs and the
benchmark reports points at a file that exists (results move between folders).
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
# The pages whose python blocks run: the README first, then docs/ in name order.
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
# The README's set-up, exactly: a newcomer's first two commands, and CI (.ci/run) runs the
# second one as written.
SETUP = ('pip install torch "setuptools>=70.1" wheel && pip install --no-build-isolation -e ".[demo,test]"'
         " && branchynet demo\n"
         "python -m pytest -q tests\n")
TEST_COMMAND = "python -m pytest -q tests"

# A fence opening "```python" at the start of a line, up to the next closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Optional packages a block may import; the block is skipped when they are missing.
OPTIONAL = ("torchvision", "fastapi", "ray", "transformers")


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


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# (page, line of the opening fence, code) of every python block of every page.
BLOCKS = [(_name(page), line, code) for page in PAGES
          for line, code in python_blocks(page.read_text(encoding="utf-8"))]


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
    by_page = {name: sum(1 for p, _, _ in BLOCKS if p == name) for name in map(_name, PAGES)}
    assert by_page["README.md"] >= 1, "README.md lost its example (or the fence pattern broke)"
    # The README's examples moved to docs/ (usage, calibration): none may be lost on the way.
    assert sum(by_page.values()) >= 7, f"python examples lost from the README and docs/: {by_page}"


@pytest.mark.parametrize("page,line,code", BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BLOCKS])
def test_readme_block_runs(page, line, code, tmp_path):
    for module in OPTIONAL:
        if _imports(code, module) and not _has(module):
            pytest.skip(f"the block at {page}:{line} needs {module}, which is not importable here")
    r = run_block(code, tmp_path)
    if r.returncode != 0:
        pytest.fail(f"the python block at {page}:{line} fails in a fresh interpreter "
                    f"(exit {r.returncode}):\n{r.stderr[-3000:]}", pytrace=False)


# The first ```bash block of a text, and markdown links [text](target).
_BASH = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def test_readme_setup_is_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    setup = text[text.index("## Set-up"):]
    assert _BASH.search(setup).group(1) == SETUP, "the README's set-up commands changed"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci, ".ci/run no longer runs the README's test command as written"


def broken_links(page: Path, text: str) -> list[str]:
    """Relative link targets of ``text`` (a page at ``page``) that name no existing path."""
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the page itself
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            out.append(target)
    return out


LINKED = PAGES + [ROOT / "benchmarks" / "README.md"] + sorted((ROOT / "benchmarks" / "results").rglob("*.md"))


@pytest.mark.parametrize("page", LINKED, ids=[_name(p) for p in LINKED])
def test_relative_links_resolve(page):
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


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
    # ... and a link to a moved file must show.
    links = "[a](https://x.org/y) [b](#set-up) [c](README.md#set-up) [d](results/gone/report.md)"
    assert broken_links(README, links) == ["results/gone/report.md"]
