"""A site's data file, read and checked before the site trains: CSV or Parquet, the task's
feature columns holding numbers in every row, the label column holding one of the task's
classes in every row.

A problem is reported with the file, the column, the row (counted from 1, after the
header) and the value at fault. The value is a piece of the site's data, so it stays at the
site: `DataError.without_value()` is what may travel to the server.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.compute
import pyarrow.csv
import pyarrow.parquet

log = logging.getLogger(__name__)


class DataError(ValueError):
    """What is wrong with a data file, and where: the column, the row and the value."""

    def __init__(
        self,
        path: Path,
        problem: str,
        column: str | None = None,
        row: int | None = None,
        value: object = None,
        detail: str = "",
    ) -> None:
        self.path, self.problem, self.column, self.row, self.value = path, problem, column, row, value
        self.detail = detail  # a parser's own words, which may quote the file
        super().__init__(self._text(with_value=True))

    def _text(self, with_value: bool) -> str:
        where = [f"column {self.column!r}"] if self.column is not None else []
        where += [f"row {self.row}"] if self.row is not None else []
        if self.value is None:
            what = self.problem
        elif with_value:
            what = f"{self.value!r} {self.problem}"
        else:
            what = f"the value {self.problem} (the value is in the site's log)"
        if self.detail:
            what += f": {self.detail}" if with_value else " (the parser's message is in the site's log)"
        return f"{self.path}: {', '.join(where)}: {what}" if where else f"{self.path}: {what}"

    def without_value(self) -> str:
        """The problem without the value from the data: what a site tells the server."""
        return self._text(with_value=False)


@dataclass(frozen=True)
class Table:
    """Features and labels of one data set, as arrays."""

    features: np.ndarray  # float32, shape (rows, features)
    labels: np.ndarray  # int64 class indices, shape (rows,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> Table:
        return Table(self.features[rows], self.labels[rows])


def class_names(task: Mapping) -> list[str]:
    """The task's classes in index order: task.classNames, or the integers 0..classes-1."""
    return list(task["classNames"]) if "classNames" in task else [str(i) for i in range(task.get("classes", 2))]


def read_task_table(path: Path, task: Mapping, file_format: str | None = None) -> Table:
    """A site's file as the task reads it: task.features (default: every column but the
    label, in file order) and task.labelColumn, labels as class indices."""
    return read_table(path, task.get("features"), task["labelColumn"], class_names(task), "classNames" in task, file_format)


def read_table(
    path: Path,
    features: Sequence[str] | None,
    label: str | None,
    classes: Sequence[str],
    named: bool = False,
    file_format: str | None = None,
) -> Table:
    """Reads and checks the feature columns and the label column of a CSV or Parquet file.

    With named classes a label is one of the names (an integer label is compared by its
    decimal text); otherwise a label is an integer from 0 to len(classes) - 1. Without a
    label column (label None: data to predict) every label is -1. Raises DataError for the
    first problem found, column by column.
    """
    columns = _read_columns(path, _format(path, file_format))
    if features is None:
        features = [c for c in columns if c != label]
    wanted = [*features, *([label] if label is not None else [])]
    missing = [c for c in wanted if c not in columns]
    if missing:
        names = ", ".join(map(repr, missing))
        raise DataError(path, f"no column {names} (the file has: {', '.join(columns) or 'no columns'})")
    rows = len(next(iter(columns.values()))) if columns else 0
    if not rows:
        raise DataError(path, "no data rows")
    x = np.column_stack([_numbers(path, name, columns[name]) for name in features]) if features else np.zeros((rows, 0))
    y = _labels(path, label, columns[label], list(classes), named) if label is not None else np.full(rows, -1, dtype=np.int64)
    return Table(x.astype(np.float32), y)


def column_names(path: Path, file_format: str | None = None) -> list[str]:
    """The names of a file's columns."""
    return list(_read_columns(path, _format(path, file_format)))


def _format(path: Path, file_format: str | None) -> str:
    return file_format or ("Parquet" if path.suffix == ".parquet" else "CSV")


def _read_columns(path: Path, file_format: str) -> dict[str, pyarrow.ChunkedArray]:
    """Every column of the file; a CSV file's as text, so that a problem can quote the cell."""
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        # Opened here rather than by pyarrow so that Python's audit hooks see the read.
        with path.open("rb") as f:
            if file_format == "Parquet":
                table = pyarrow.parquet.read_table(f)
            else:
                header = next(csv.reader([f.readline().decode("utf-8-sig", errors="replace")]), [])
                f.seek(0)
                text = pyarrow.string()
                options = pyarrow.csv.ConvertOptions(
                    column_types=dict.fromkeys(header, text), strings_can_be_null=False, quoted_strings_can_be_null=False
                )
                table = pyarrow.csv.read_csv(f, convert_options=options)
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise DataError(path, f"cannot be read as {file_format}", detail=str(error)) from None
    return {name: table[name] for name in table.column_names}


def _numbers(path: Path, column: str, values: pyarrow.ChunkedArray) -> np.ndarray:
    """A feature column as float64; DataError at the first cell that is not a finite number."""
    if pyarrow.types.is_integer(values.type) or pyarrow.types.is_floating(values.type):
        if values.null_count == 0:
            numbers = values.to_numpy().astype(np.float64)
            if np.isfinite(numbers).all():
                return numbers
    elif pyarrow.types.is_string(values.type) or pyarrow.types.is_large_string(values.type):
        try:
            numbers = pyarrow.compute.cast(values, pyarrow.float64()).to_numpy(zero_copy_only=False)
        except pyarrow.ArrowInvalid:
            numbers = None  # a cell is no number: which one, the loop below finds
        if numbers is not None and np.isfinite(numbers).all():
            return numbers
    # The slow way, cell by cell, to name the first one at fault (or to accept what the fast
    # cast refused but Python reads as a number, such as " 1.5").
    numbers = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values.to_pylist(), start=1):
        if _empty(value):
            raise DataError(path, f"the cell is empty: {_IMPUTE}", column, row)
        problem = _number_problem(value)
        if problem:
            raise DataError(path, problem, column, row, value)
        numbers[row - 1] = float(value)
    return numbers


_IMPUTE = "impute missing values or drop their rows before training"


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number_problem(value: object) -> str:
    """Why a cell that is not empty is not a finite number ("" if it is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return "is not a number"
    try:
        number = float(value)
    except ValueError:
        return "is not a number"
    if math.isnan(number):
        return f"marks a missing value: {_IMPUTE}"
    return "" if math.isfinite(number) else "is not a finite number"


def _labels(path: Path, column: str, values: pyarrow.ChunkedArray, classes: list[str], named: bool) -> np.ndarray:
    """The label column as class indices; DataError at the first cell that is not a class."""
    index = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values.to_pylist(), start=1):
        found = _class_index(value, index, named)
        if found is None:
            if _empty(value):
                raise DataError(path, "the cell is empty: every row needs a label", column, row)
            if named:
                expected = f"is not one of the task's classes (task.classNames: {', '.join(classes)})"
            else:
                expected = (
                    f"is not a class of the task: labels are integers from 0 to {len(classes) - 1} "
                    f"(task.classes is {len(classes)}); name other labels in task.classNames"
                )
            raise DataError(path, expected, column, row, value)
        labels[row - 1] = found
    return labels


def _class_index(value: object, index: Mapping[str, int], named: bool) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    text = str(value).strip()
    if named:
        return index.get(text)
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or not 0 <= number < len(index):
        return None
    return int(number)


def write_csv(path: Path, table: Table, features: Sequence[str], label: str, classes: Sequence[str] | None = None) -> None:
    """Writes a table as CSV with a header (the inverse of read_table): labels as their class
    names when classes are given, else as indices."""
    columns = {name: table.features[:, i] for i, name in enumerate(features)}
    columns[label] = np.asarray(classes, dtype=object)[table.labels] if classes is not None else table.labels
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.csv.write_csv(pyarrow.table(columns), path)


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of row indices into (kept, held out), holding out `fraction`."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, round(n * fraction)) if n > 1 else 0
    return np.sort(order[held:]), np.sort(order[:held])
