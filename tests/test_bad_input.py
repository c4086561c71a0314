"""The bad-grid corpus: every malformed file gives one clear line naming it, exit 2, nothing written."""
from pathlib import Path

import pytest

from harness.cli import run_main

CORPUS = Path(__file__).parent / "data" / "bad_grids"
# Files that cannot carry their expectation in a comment line.
NO_COMMENT = {
    "empty_file.yaml": "the file is empty; a grid needs at least a 'sweep'",
    "not_text.yaml": "not a text file (grid files are UTF-8 YAML)",
}


def expected_error(path: Path) -> str:
    if path.name in NO_COMMENT:
        return NO_COMMENT[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must start with '# error: <expected text>'"
    return first.removeprefix("# error: ")


def test_the_corpus_is_large_enough():
    assert len(list(CORPUS.glob("*.yaml"))) >= 20


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_grid(path, tmp_path, capsys):
    out = tmp_path / "results"
    code = run_main([str(path), "--results", str(out), "--backend", "serial", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"harness run: error: {path}"), lines[0]
    assert expected_error(path) in lines[0]
    assert not out.exists()
    assert not Path("/tmp/harness-pwned").exists()


def test_large_grid_runs_with_yes_only_as_far_as_the_plan(tmp_path, capsys):
    code = run_main([str(CORPUS / "too_large.yaml"), "--yes", "--dry-run", "--results", str(tmp_path / "r")])
    assert code == 0 and "12000 trials" in capsys.readouterr().out.replace(",", "")
