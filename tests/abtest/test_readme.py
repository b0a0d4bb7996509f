"""The notebook example in abtest/README.md runs as a doctest."""

import doctest
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "abtest" / "README.md"


def test_readme_example_runs():
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8
    assert result.failed == 0
