"""The examples in the README, in the documentation site's pages (docs/) and in the docstrings run and print
what they say."""

from __future__ import annotations

import doctest
import importlib
import linecache
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "mi_crow.store.store",
    "mi_crow.store._layout.appends",
    "mi_crow.store._layout.models",
    "mi_crow.store._layout.check",
    "mi_crow.store._open",
    "mi_crow.store._copy",
    "mi_crow.store.local_store",
    "mi_crow.store.memory_store",
    "mi_crow.store.activation_dataset",
    "mi_crow.store.store_dataloader",
    "mi_crow.store.capture",
    "mi_crow.store.corpus",
    "mi_crow.store.sae_lens",
]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text("utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(ROOT / "README.md"))))
def test_readme_python_blocks_run(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    code = python_blocks(ROOT / "README.md")[index]
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(code, f"README.md block {index}", "exec"), namespace)
    out = capsys.readouterr().out
    if 'print([m["step"]' in code:
        assert "[0, 1, 2]" in out and "['gpt2-wiki'] ['sae-h3']" in out and "list 2" in out
    if "checksums=False" in code:
        assert out.strip() == "torch.Size([4, 8]) []"
    if 'ActivationCapture(model, store, "toy-run"' in code:
        assert out.strip() == "[0, 1, 2] 384"
    if "SeaweedFS()" in code:
        assert out.strip() == "[0, 1, 2, 3]\n['sae-toy'] []"
    if "run_with_cache" in code:
        assert out.strip() == "True"
    if "SAETrainer" in code:
        assert out.strip() == "StandardTrainingSAE 8 32"


DOC_PAGES = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md") if python_blocks(p))


def expected_prints(code: str) -> list[str] | None:
    """What the page says each top-level print prints (its trailing comment), or None if one has none."""
    expected = []
    for line in code.splitlines():
        if line.startswith("print("):
            if "  # " not in line:
                return None
            expected.append(line.rsplit("  # ", 1)[1].strip())
    return expected


def test_the_site_has_tutorial_code() -> None:
    pages = {"getting-started.md", "tutorials/capture-and-train.md", "tutorials/processes-and-ranks.md"}
    assert {*pages, "how-to/verify-and-gc.md"} <= set(DOC_PAGES)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_page_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Every python block of a page runs, in order, in one namespace, in a fresh folder; what each
    print prints is what its comment says."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_page"}
    for index, code in enumerate(python_blocks(ROOT / "docs" / page)):
        filename = f"docs/{page} block {index}"
        # In linecache, so code that reads its own source back (nnsight's trace blocks) finds it.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        exec(compile(code, filename, "exec"), namespace)
        out = capsys.readouterr().out.splitlines()
        expected = expected_prints(code)
        if expected is not None:
            assert out == expected, f"docs/{page} block {index}"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
