import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.storage import (
    PART_FILE,
    SchemaMismatchError,
    check_file_schema,
    clear_stale_staging,
    read_table,
    replace_file,
    replace_folder,
)
from schemas.tables import CATALOG, SEARCH_IMPRESSIONS


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


def _folder_with(path, name):
    path.mkdir()
    (path / name).write_text(name)
    return path


def test_stale_copies_of_a_killed_swap_are_removed_and_only_the_targets(tmp_path):
    final = _folder_with(tmp_path / "ds=2024-05-01", "current")
    _folder_with(tmp_path / ".staging-ds=2024-05-01-0123abcd", "half")
    _folder_with(tmp_path / ".retired-ds=2024-05-01-0123abcd", "previous")
    others = [_folder_with(tmp_path / name, "other") for name in
              (".staging-ds=2024-05-012-0123abcd", ".staging-ds=2024-05-02-0123abcd", ".staging-ds=2024-05-01-keep")]
    lines = clear_stale_staging(final)
    assert lines == [f"{final}: removed .retired-ds=2024-05-01-0123abcd, left by a run that was killed",
                     f"{final}: removed .staging-ds=2024-05-01-0123abcd, left by a run that was killed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds=2024-05-01", *(p.name for p in others)])
    assert [p.name for p in final.iterdir()] == ["current"]


def test_a_copy_retired_between_the_two_renames_is_restored(tmp_path):
    final = tmp_path / "ds=2024-05-01"
    _folder_with(tmp_path / ".retired-ds=2024-05-01-0123abcd", "previous")
    _folder_with(tmp_path / ".staging-ds=2024-05-01-0123abcd", "unchecked")
    assert clear_stale_staging(final)[0] == f"{final}: restored from .retired-ds=2024-05-01-0123abcd, left by a run killed while swapping it in"
    assert [p.name for p in tmp_path.iterdir()] == ["ds=2024-05-01"]
    assert [p.name for p in final.iterdir()] == ["previous"]
    assert clear_stale_staging(tmp_path / "absent" / "ds=2024-05-01") == []


# --- the reader contract: a file whose columns are not the table's is refused -------------------------

CATALOG_ROW = dict(product_id="p1", title="oak table", description=None, product_type="table", category_path=None,
                   brand="acme", attributes=[("material", "oak")], price=12.5, source="own")


def _catalog_file(root, data: pa.Table):
    folder = root / CATALOG.name
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, folder / PART_FILE)
    return folder / PART_FILE


def _catalog() -> pa.Table:
    return pa.Table.from_pylist([CATALOG_ROW], schema=CATALOG.arrow_schema())


def test_a_catalog_without_brand_is_refused_naming_the_file_and_column(tmp_path):
    file = _catalog_file(tmp_path, _catalog().drop_columns(["brand"]))
    with pytest.raises(SchemaMismatchError, match=rf"{file}: columns do not match table 'catalog': missing \['brand'\];"):
        read_table(CATALOG, tmp_path)


def test_a_renamed_column_is_refused_naming_both_names_and_the_expected_schema(tmp_path):
    data = _catalog()
    _catalog_file(tmp_path, data.rename_columns(["pric" if name == "price" else name for name in data.column_names]))
    with pytest.raises(SchemaMismatchError, match=r"missing \['price'\], unexpected \['pric'\]; expected schema: .*price double"):
        read_table(CATALOG, tmp_path, columns=["product_id"])


def test_extra_columns_and_other_types_are_refused(tmp_path):
    _catalog_file(tmp_path, _catalog().append_column("colour", pa.array(["red"])))
    with pytest.raises(SchemaMismatchError, match=r"unexpected \['colour'\]"):
        read_table(CATALOG, tmp_path)
    numeric_string = _catalog().set_column(7, "price", pa.array(["12.5"]))
    _catalog_file(tmp_path, numeric_string)
    with pytest.raises(SchemaMismatchError, match=r"wrong types \['price: string \(expected double\)'\]"):
        read_table(CATALOG, tmp_path)


def test_what_does_not_change_the_values_read_is_accepted(tmp_path):
    # an outside producer: every field nullable, large strings, a partition column in the file too
    loose = pa.schema([field.with_nullable(True) for field in CATALOG.arrow_schema()])
    data = pa.Table.from_pylist([CATALOG_ROW], schema=loose)
    _catalog_file(tmp_path, data.set_column(1, "title", data["title"].cast(pa.large_string())))
    assert read_table(CATALOG, tmp_path).to_pylist() == [CATALOG_ROW]


def test_a_partition_column_may_be_in_the_file_or_only_in_the_path():
    without_ds = SEARCH_IMPRESSIONS.arrow_schema(without=("ds",))
    check_file_schema(SEARCH_IMPRESSIONS, without_ds, "ds in the path")
    check_file_schema(SEARCH_IMPRESSIONS, SEARCH_IMPRESSIONS.arrow_schema(), "ds in the file too")
    with pytest.raises(SchemaMismatchError, match=r"wrong types \['ds: string \(expected date32\[day\]\)'\]"):
        check_file_schema(SEARCH_IMPRESSIONS, without_ds.append(pa.field("ds", pa.string())), "ds as text")
    nanoseconds = without_ds.set(without_ds.get_field_index("ts"), pa.field("ts", pa.timestamp("ns", tz="UTC")))
    with pytest.raises(SchemaMismatchError, match=r"ts: timestamp\[ns, tz=UTC\]"):
        check_file_schema(SEARCH_IMPRESSIONS, nanoseconds, "ns")


def test_a_reader_checks_the_files_of_the_days_it_reads_only(tmp_path, drifted_impressions):
    good, drifted = drifted_impressions
    assert read_table(SEARCH_IMPRESSIONS, tmp_path, days=[good]).num_rows == 0
    for days in ([drifted], None):
        with pytest.raises(SchemaMismatchError, match=rf"ds={drifted.isoformat()}/{PART_FILE}: .*missing \['price'\]"):
            read_table(SEARCH_IMPRESSIONS, tmp_path, days=days)
