"""The test order of `make test` (tests/file_order.py): longest files first, unknown files before them, files whole."""

from file_order import longest_files_first


def test_files_run_longest_first_whole_and_unknown_ones_before_every_known_one():
    nodeids = ["tests/a.py::one", "tests/b.py::one", "tests/a.py::two", "tests/new.py::one", "tests/c.py::one", "tests/b.py::two"]
    seconds = {"tests/a.py": 5.0, "tests/b.py": 40.0, "tests/c.py": 12.5}
    assert longest_files_first(nodeids, seconds) == ["tests/new.py::one", "tests/b.py::one", "tests/b.py::two", "tests/c.py::one",
                                                      "tests/a.py::one", "tests/a.py::two"]
    assert longest_files_first(nodeids, {}) == nodeids
