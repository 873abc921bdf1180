"""The README's "Three ways to use it" snippets run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(language: str) -> list[str]:
    text = README.read_text()
    section = text[text.index("## Three ways to use it"):]
    section = section[:section.index("\n## ", 3)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_readme_has_three_snippets():
    assert len(_section_blocks("python")) == 2
    assert len(_section_blocks("bash")) == 1


@pytest.mark.parametrize("index", [0, 1], ids=["neural-compressor", "python-fx"])
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    if index == 0:
        pytest.importorskip("neural_compressor.torch.quantization")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(_section_blocks("python")[index], f"README snippet {index}", "exec"), namespace)
    if index == 0:
        assert namespace["best"].lampq_allocation.budget.label in ("W3 avg", "W4 avg", "W5 avg")
    else:
        assert namespace["allocation"].budget.label == "W4 avg"


def test_readme_cli_snippet_runs(tmp_path, monkeypatch):
    from lampq_fx.cli import main
    monkeypatch.chdir(tmp_path)
    command = shlex.split(_section_blocks("bash")[0].replace("\\\n", " "))
    assert command[0] == "lampq"
    assert main(command[1:]) == 0
    assert (tmp_path / "runs" / "reference" / "w4-avg" / "allocation.json").is_file()
