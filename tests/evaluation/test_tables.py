"""The one results-table builder: arm names left, numbers right, undefined metrics as n/a."""

from __future__ import annotations

from medseg.evaluation.tables import number, results_table


def test_number_formats_digits_and_undefined_metrics():
    assert (number(0.81234), number(4.25, 1), number(200.4, 0), number(None)) == ("0.812", "4.2", "200", "n/a")


def test_name_columns_left_and_numbers_right():
    table = results_table("Test cases", ["init", "protocol", "AUROC"], [("scratch", "knn", number(0.5))], 2)
    assert [c.justify for c in table.columns] == ["left", "left", "right"]
    assert table.title == "Test cases" and table.row_count == 1
    assert list(table.columns[2].cells) == ["0.500"]
