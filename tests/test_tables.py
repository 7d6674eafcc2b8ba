"""The one markdown table writer: padded (CLI, selftest) and compact (benchmark report)."""

from branchynet.tables import markdown_table


def test_padded_table_aligns_every_column_to_its_widest_cell():
    got = markdown_table(["batch", "ms"], [[1, 0.25], ["256", "x"]])
    assert got == ("| batch | ms   |\n"
                   "|-------|------|\n"
                   "| 1     | 0.25 |\n"
                   "| 256   | x    |")


def test_compact_table_writes_cells_as_they_are():
    got = markdown_table(["B", "naive"], [["7", "1.5 (3 %)"]], pad=False)
    assert got == "| B | naive |\n| --- | --- |\n| 7 | 1.5 (3 %) |"


def test_a_table_without_rows_is_its_header_and_rule():
    assert markdown_table(["a", "bcd"], []) == "| a | bcd |\n|---|-----|"
    assert markdown_table(["a"], [], pad=False) == "| a |\n| --- |"
