"""tools/tables.py: the markdown/JSON writer the benchmark tools share."""

import json

import pytest

from ptqpasses_tools.tables import error_line, markdown_table, write_json


def test_markdown_table_aligns_and_checks_its_rows(tmp_path):
    lines = markdown_table(["model", "ms"], [["a", "1.50"], ["b", None]], right=["ms"])
    assert lines == ["| model | ms |", "|---|---:|", "| a | 1.50 |", "| b |  |"]
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["model", "ms"], [["a"]])
    with pytest.raises(ValueError, match="not in the header"):
        markdown_table(["model"], [], right=["ms"])
    write_json(tmp_path / "r.json", {"rows": [1]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1]}
    write_json(None, {"rows": [1]})  # no path: nothing written, no error


def test_error_line_is_one_short_line():
    line = error_line(ValueError("bad\n  input " + "x" * 400))
    assert line.startswith("ValueError: bad input x") and "\n" not in line
    assert len(line) == len("ValueError: ") + 300
