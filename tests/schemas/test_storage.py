import pytest

from schemas.storage import replace_file, replace_folder


def test_replace_folder_swaps_the_whole_folder_in_and_leaves_no_staging(tmp_path):
    final = tmp_path / "day"
    replace_folder(final, lambda staging: (staging / "old.txt").write_text("old"))
    assert replace_folder(final, lambda staging: (staging / "new.txt").write_text("new")) == final
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["day"]


def test_a_failed_write_keeps_the_old_folder_and_removes_the_staging(tmp_path):
    final = tmp_path / "day"
    replace_folder(final, lambda staging: (staging / "old.txt").write_text("old"))

    def failing(staging):
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder(final, failing)
    assert (final / "old.txt").read_text() == "old" and not (final / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["day"]


def test_replace_file_swaps_the_file_in_or_keeps_the_old_one(tmp_path):
    final = tmp_path / "manifest.json"
    replace_file(final, lambda staging: staging.write_text("old"))
    assert replace_file(final, lambda staging: staging.write_text("new")) == final and final.read_text() == "new"

    def failing(staging):
        staging.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_file(final, failing)
    assert final.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
