"""Prints a workbook's sheets as JSON, for tests/it/python_export.rs to check cell by cell.

Opened read-only, as a user's check would: {"sheets": [names], "rows": [[cell values of
the first sheet], ...]}, numbers as numbers and empty cells as null.
"""

import json
import sys

from openpyxl import load_workbook


def main(path: str) -> None:
    """Prints the workbook at ``path`` as one JSON object."""
    workbook = load_workbook(path, read_only=True)
    sheet = workbook.worksheets[0]
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    # Cells left empty at a row's end are not stored: pad to the header's width, as Excel shows.
    width = len(rows[0]) if rows else 0
    rows = [row + [None] * (width - len(row)) for row in rows]
    print(json.dumps({"sheets": workbook.sheetnames, "rows": rows}))
    workbook.close()


if __name__ == "__main__":
    main(sys.argv[1])
