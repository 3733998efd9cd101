"""bench/RESULTS.md sections: each bench replaces its own, stamped, and leaves the others."""

from pathlib import Path

import pytest

from bench.results import write_section


def test_a_section_is_replaced_in_place_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section("alpha", "Alpha", "| a | 1 |", path=path, command="python bench/alpha.py")
    write_section("beta", "Beta", "beta body", path=path, command="python bench/beta.py")
    write_section("alpha", "Alpha", "| a | 2 |", path=path, command="python bench/alpha.py --seeds 3")
    text = path.read_text()
    assert text.count("## Alpha") == 1 and text.count("## Beta") == 1
    assert "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.index("## Alpha") < text.index("## Beta")  # replaced where it stood
    assert "`python bench/alpha.py --seeds 3`" in text and "cores" in text


def test_a_section_name_must_be_a_plain_word(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="section name"):
        write_section("Not OK!", "x", "y", path=tmp_path / "R.md")
