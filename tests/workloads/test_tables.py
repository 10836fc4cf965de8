"""A site's data file is checked before the site trains, and every problem names the file,
the column, the row and the value; what travels to the server leaves the value out."""

from __future__ import annotations

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from bouquet_workloads.tables import DataError, Table, class_names, read_table, read_task_table, split_rows, write_csv

BINARY = ["0", "1"]


def table(rows: int = 20) -> Table:
    rng = np.random.default_rng(0)
    return Table(rng.normal(size=(rows, 3)).astype(np.float32), (np.arange(rows) % 2).astype(np.int64))


def problem(path, features=("a",), label="y", classes=BINARY, named=False) -> DataError:
    with pytest.raises(DataError) as error:
        read_table(path, list(features), label, classes, named)
    return error.value


def test_csv_and_parquet_read_back_exactly(tmp_path):
    data = table()
    write_csv(tmp_path / "d.csv", data, ["a", "b", "c"], "y")
    back = read_table(tmp_path / "d.csv", ["c", "a"], "y", BINARY)
    assert np.array_equal(back.features, data.features[:, [2, 0]])  # float32 survives the text
    assert np.array_equal(back.labels, data.labels)
    assert read_table(tmp_path / "d.csv", None, "y", BINARY).features.shape == (20, 3)
    pyarrow.parquet.write_table(pyarrow.table({"a": data.features[:, 0], "y": data.labels}), tmp_path / "d.parquet")
    assert read_table(tmp_path / "d.parquet", ["a"], "y", BINARY).features.shape == (20, 1)


def test_string_labels_are_classes_by_name_in_index_order(tmp_path):
    (tmp_path / "d.csv").write_text("a,outcome\n1,readmitted\n2,home\n3,home\n")
    task = {"features": ["a"], "labelColumn": "outcome", "classNames": ["home", "readmitted"]}
    assert class_names(task) == ["home", "readmitted"]
    assert read_task_table(tmp_path / "d.csv", task).labels.tolist() == [1, 0, 0]
    # Names may be digits too: a label is compared by its text.
    (tmp_path / "e.csv").write_text("a,y\n1,1\n2,2\n")
    assert read_table(tmp_path / "e.csv", ["a"], "y", ["2", "1"], named=True).labels.tolist() == [1, 0]
    names = ["home", "readmitted"]
    write_csv(tmp_path / "f.csv", Table(np.zeros((2, 1), np.float32), np.array([1, 0])), ["a"], "outcome", names)
    assert (tmp_path / "f.csv").read_text().splitlines()[1:] == ['0,"readmitted"', '0,"home"']
    assert read_table(tmp_path / "f.csv", ["a"], "outcome", names, named=True).labels.tolist() == [1, 0]


def test_integer_classes_by_default(tmp_path):
    assert class_names({"labelColumn": "y"}) == ["0", "1"]
    assert class_names({"labelColumn": "y", "classes": 3}) == ["0", "1", "2"]
    (tmp_path / "d.csv").write_text("a,y\n1,2\n2,0\n3,1.0\n")
    assert read_table(tmp_path / "d.csv", ["a"], "y", ["0", "1", "2"]).labels.tolist() == [2, 0, 1]


def test_a_missing_file_or_column_is_named(tmp_path):
    assert str(problem(tmp_path / "missing.csv")) == f"{tmp_path / 'missing.csv'}: no such file"
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    error = problem(tmp_path / "d.csv", features=["a", "c"])
    assert str(error) == f"{tmp_path / 'd.csv'}: no column 'c', 'y' (the file has: a, b)"
    assert error.without_value() == str(error)  # column names are no patient's data


@pytest.mark.parametrize(
    ("cells", "row", "message"),
    [
        (["1", "abc", "3"], 2, "'abc' is not a number"),
        (["1", "2", ""], 3, "the cell is empty: impute missing values or drop their rows before training"),
        (["NA", "2", "3"], 1, "'NA' is not a number"),
        (["1", "nan", "3"], 2, "'nan' marks a missing value: impute missing values or drop their rows before training"),
        (["1", "2", "inf"], 3, "'inf' is not a finite number"),
    ],
)
def test_a_feature_cell_that_is_not_a_number_is_named_by_column_row_and_value(tmp_path, cells, row, message):
    (tmp_path / "d.csv").write_text("a,y\n" + "".join(f"{c},0\n" for c in cells))
    error = problem(tmp_path / "d.csv")
    assert str(error) == f"{tmp_path / 'd.csv'}: column 'a', row {row}: {message}"
    assert error.column == "a" and error.row == row


def test_parquet_nulls_and_nans_are_named_too(tmp_path):
    pyarrow.parquet.write_table(pyarrow.table({"a": [1.0, None, 3.0], "y": [0, 1, 0]}), tmp_path / "d.parquet")
    assert "column 'a', row 2: the cell is empty" in str(problem(tmp_path / "d.parquet"))
    pyarrow.parquet.write_table(pyarrow.table({"a": [1.0, 2.0, float("nan")], "y": [0, 1, 0]}), tmp_path / "e.parquet")
    assert "column 'a', row 3: nan marks a missing value" in str(problem(tmp_path / "e.parquet"))
    pyarrow.parquet.write_table(pyarrow.table({"a": ["1", "x"], "y": [0, 1]}), tmp_path / "f.parquet")
    assert "column 'a', row 2: 'x' is not a number" in str(problem(tmp_path / "f.parquet"))


@pytest.mark.parametrize(
    ("labels", "classes", "named", "row", "message"),
    [
        (["0", "1", "2"], BINARY, False, 3, "'2' is not a class of the task: labels are integers from 0 to 1 (task.classes is 2)"),
        (["0", "home", "1"], BINARY, False, 2, "'home' is not a class of the task"),
        (["1", "0.5"], BINARY, False, 2, "'0.5' is not a class of the task"),
        (
            ["home", "maybe"],
            ["home", "readmitted"],
            True,
            2,
            "'maybe' is not one of the task's classes (task.classNames: home, readmitted)",
        ),
        (["home", ""], ["home", "readmitted"], True, 2, "the cell is empty: every row needs a label"),
    ],
)
def test_a_label_that_is_not_a_class_is_named_by_row_and_value(tmp_path, labels, classes, named, row, message):
    (tmp_path / "d.csv").write_text("a,y\n" + "".join(f"1,{v}\n" for v in labels))
    error = problem(tmp_path / "d.csv", classes=classes, named=named)
    assert f"column 'y', row {row}: {message}" in str(error)


def test_what_travels_to_the_server_holds_no_value_from_the_data(tmp_path):
    (tmp_path / "d.csv").write_text("a,y\n1,0\nJane Roe,1\n")
    error = problem(tmp_path / "d.csv")
    assert "Jane Roe" in str(error)  # the site's own log says which value
    assert error.without_value() == f"{tmp_path / 'd.csv'}: column 'a', row 2: the value is not a number (the value is in the site's log)"
    (tmp_path / "e.csv").write_text("a,y\n1,0\n2,0,Jane Roe\n")
    error = problem(tmp_path / "e.csv")
    assert "cannot be read as CSV" in str(error) and "Jane Roe" in str(error)
    assert "Jane Roe" not in error.without_value() and "the parser's message is in the site's log" in error.without_value()


def test_a_file_without_rows_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("a,y\n")
    assert str(problem(tmp_path / "d.csv")).endswith("no data rows")


def test_split_rows_is_seeded_and_disjoint():
    kept, held = split_rows(100, 0.2, seed=1)
    assert len(held) == 20 and len(kept) == 80
    assert not set(kept) & set(held)
    assert np.array_equal(split_rows(100, 0.2, seed=1)[1], held)
    assert not np.array_equal(split_rows(100, 0.2, seed=2)[1], held)
