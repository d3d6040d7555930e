"""Whole-manifest checks fail fast, naming the file and the column."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ORDINAL, ManifestError, open_manifest, output_names, read_file_rows
from pipeline.plan import make_plan
from tests.conftest import write_manifest


def test_directory_glob_and_file_forms_list_the_same_rows(tmp_path):
    for i in range(3):
        write_manifest(str(tmp_path / "m" / f"part-{i}.parquet"), {"id": [f"r{i}a", f"r{i}b"], "prompt": ["p", "q"]})
    (tmp_path / "m" / "_SUCCESS").write_text("")
    by_dir = open_manifest(str(tmp_path / "m"))
    by_glob = open_manifest(str(tmp_path / "m" / "part-*.parquet"))
    one = open_manifest(str(tmp_path / "m" / "part-1.parquet"))
    assert [f.path for f in by_dir.files] == [f.path for f in by_glob.files]
    assert by_dir.num_rows == 6 and one.num_rows == 2
    ordinals = [o for f in by_dir.files for t in read_file_rows(by_dir.url_of(f), f) for o in t.column(ORDINAL).to_pylist()]
    assert ordinals == list(range(6))


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"prompt": ["a"]}, "required column 'id' is missing"),
        ({"id": [1], "prompt": ["a"]}, "column 'id' has type int64, expected string"),
        ({"id": ["a"], "seed": ["7"]}, "column 'seed' has type string, expected int64"),
        ({"id": ["a"], "image": [3.5]}, "column 'image' has type double"),
        ({"id": ["a"], "params": [1]}, "column 'params' has type int64"),
        ({"id": ["a"], "images": [b"x"]}, "column 'images' has type binary, expected list of binary"),
        ({"id": ["a"], "__genfleet_ordinal": [1]}, "column '__genfleet_ordinal' uses the runner's reserved prefix"),
    ],
)
def test_bad_columns_name_file_and_column(tmp_path, columns, message):
    path = write_manifest(str(tmp_path / "bad.parquet"), columns)
    with pytest.raises(ManifestError) as e:
        open_manifest(path, {"image": False, "images": True})
    assert message in str(e.value) and "bad.parquet" in str(e.value)


def test_unreadable_empty_and_missing(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="junk.parquet: unreadable as Parquet"):
        open_manifest(str(tmp_path / "junk.parquet"))
    empty = write_manifest(str(tmp_path / "empty.parquet"), {"id": pa.array([], pa.string())})
    with pytest.raises(ManifestError, match="is empty"):
        open_manifest(empty)
    with pytest.raises(ManifestError, match="no such file"):
        open_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ManifestError, match="no Parquet files"):
        open_manifest(str(tmp_path / "emptydir"))


def test_files_that_disagree_on_types_are_refused(tmp_path):
    write_manifest(str(tmp_path / "m" / "a.parquet"), {"id": ["a"], "extra": ["x"]})
    write_manifest(str(tmp_path / "m" / "b.parquet"), {"id": ["b"], "extra": [1.5]})
    with pytest.raises(ManifestError, match="disagree"):
        open_manifest(str(tmp_path / "m"))


def test_plan_finds_duplicates_in_manifest_order_and_counts_pairs(tmp_path):
    write_manifest(str(tmp_path / "m" / "a.parquet"), {"id": ["x", "y", "x"], "num_samples": [2, 3, 5]}, row_group_size=2)
    write_manifest(str(tmp_path / "m" / "b.parquet"), {"id": ["x", "z", "y"], "num_samples": [1, 1, 4]})
    plan = make_plan(open_manifest(str(tmp_path / "m")))
    assert plan.duplicates == {2: 1, 3: 2, 5: 1}
    # x:2 + y:3 + z:1 + one error record per duplicate occurrence
    assert plan.expected_pairs == 2 + 3 + 1 + 3


def test_input_columns_are_the_familys(tmp_path):
    path = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "image": [3.5], "images": [[b"x", "s3://b/y.png"]]})
    assert open_manifest(path).extra_columns == ["image", "images"]  # a family without inputs carries them through
    assert open_manifest(path, {"images": True}).extra_columns == ["image"]


def test_extras_that_collide_with_output_columns_are_renamed():
    assert output_names(["model", "shot", "sample_index"], {"model", "sample_index"}) == {
        "model": "extra_model", "shot": "shot", "sample_index": "extra_sample_index"}
    with pytest.raises(ManifestError, match="'model'"):
        output_names(["model", "extra_model"], {"model"})


def test_an_id_that_is_not_utf8_fails_the_plan_naming_file_and_column(tmp_path):
    ids = pa.array([b"ok", b"bad \xff"], pa.binary()).view(pa.string())
    path = write_manifest(str(tmp_path / "ids.parquet"), {"id": ids})
    with pytest.raises(ManifestError, match=r"ids.parquet: column 'id' is not valid UTF-8"):
        make_plan(open_manifest(path))


def test_infinite_num_samples_counts_as_one_error_in_the_plan(tmp_path):
    path = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a", "b"], "num_samples": [float("inf"), 2.0]})
    assert make_plan(open_manifest(path)).expected_pairs == 3


def test_spark_and_hidden_files_are_not_data(tmp_path):
    d = tmp_path / "m"
    write_manifest(str(d / "part-0.parquet"), {"id": ["a"], "prompt": ["p"]})
    write_manifest(str(d / "_temporary" / "0" / "part-9.parquet"), {"id": ["tmp"], "prompt": ["p"]})
    write_manifest(str(d / ".hidden.parquet"), {"id": ["h"], "prompt": ["p"]})
    (d / "_SUCCESS").write_text("")
    (d / ".part-0.parquet.crc").write_text("crc")
    for url in (str(d), str(d / "*")):
        m = open_manifest(url)
        assert [f.path.rsplit("/", 1)[-1] for f in m.files] == ["part-0.parquet"] and m.num_rows == 1


def test_an_unreadable_row_group_names_the_file_and_group(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(str(path), {"id": [f"r{i}" for i in range(40)], "prompt": ["x" * 50] * 40}, row_group_size=10)
    m = open_manifest(str(path))  # the footer is fine
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(2).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start: start + 64] = b"\xff" * 64  # a corrupt page inside the third row group
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"m.parquet: row group 2 is unreadable"):
        for _ in read_file_rows(m.url_of(m.files[0]), m.files[0]):
            pass
