#!/usr/bin/env python3
"""Export discounts to an Excel workbook through discount-proxy, in one streamed lookup.

The export job the proxy exists for, as its users write it: read contract SNs, ask the proxy
for all of them at once with ``Accept: application/x-ndjson``, and append a workbook row per
SN as its line arrives (cache hits first, then misses as the upstream answers them). The
workbook is written in openpyxl's write-only mode, so memory stays flat however many SNs
there are; it is complete on disk when the stream ends.

Columns, in this order: sn, status, source, ratio, currency, apportionment (``item=ratio``
pairs joined by ``;``), error (the error code of an SN that failed). Ratios are numbers.

Exit codes: 0 every SN answered (found or not found); 1 some SNs ended in error or were
invalid (the workbook is written all the same); 2 bad arguments or input; 3 the proxy is
down (connection refused or unreachable); 4 the proxy refused the lookup (its error code is
printed), or stayed overloaded after the retries, or the stream broke.
"""

from __future__ import annotations

import argparse
import csv
import email.utils
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
from openpyxl import Workbook
from tqdm import tqdm

TOKEN_VARIABLE = "DISCOUNT_PROXY_CLIENT_TOKEN"
COLUMNS = ("sn", "status", "source", "ratio", "currency", "apportionment", "error")
# Statuses that fail the run: the proxy could not answer for these SNs.
FAILED_STATUSES = frozenset({"error", "invalid"})

EXIT_SN_ERRORS = 1
EXIT_USAGE = 2
EXIT_PROXY_DOWN = 3
EXIT_REFUSED = 4


class ExportError(Exception):
    """A failure that ends the export with a one-line message and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Tally:
    """What one export wrote, for the closing line on stderr."""

    started: float = field(default_factory=time.monotonic)
    rows: int = 0
    failed: int = 0
    first_row: float | None = None

    def count(self, status: str) -> None:
        """Counts one written row of this status."""
        self.rows += 1
        if status in FAILED_STATUSES:
            self.failed += 1
        if self.first_row is None:
            self.first_row = time.monotonic() - self.started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` lists the exit codes."""
    parser = argparse.ArgumentParser(
        description="Look up every SN of FILE through discount-proxy in one streamed "
        "request and write an .xlsx row per SN as it resolves.",
        epilog=f"A bearer token for server.api_tokens is read from {TOKEN_VARIABLE}. "
        "Exit codes: 0 all SNs answered; 1 some SNs ended in error or were invalid "
        "(the workbook is still written); 2 bad arguments or input; 3 the proxy is down "
        "(connection refused); 4 the proxy refused the lookup, stayed overloaded, or "
        "the stream broke.",
    )
    parser.add_argument("file", type=Path, help="SNs one per line, or a CSV with --column")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .xlsx to write")
    parser.add_argument(
        "--proxy", default="http://127.0.0.1:8080", help="the proxy's base URL [%(default)s]"
    )
    parser.add_argument(
        "--column",
        metavar="NAME",
        help="read FILE as a CSV with a header row and take the SNs from this column",
    )
    parser.add_argument(
        "--tries",
        type=int,
        default=5,
        help="requests sent while the proxy answers 503 overloaded [%(default)s]",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the next line of the stream [%(default)s]",
    )
    args = parser.parse_args(argv)
    if args.tries < 1:
        parser.error("--tries must be at least 1")
    return args


def read_sns(path: Path, column: str | None) -> list[str]:
    """The distinct SNs of the file, in order: one per line, or from a CSV column."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        raw = read_column(handle, column) if column else (line.strip() for line in handle)
        # The proxy answers each distinct SN once; dict keeps the first occurrence's order.
        return list(dict.fromkeys(sn for sn in raw if sn))


def read_column(lines: Iterable[str], column: str) -> Iterator[str]:
    """The values of the named column of a CSV with a header row."""
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise ExportError(f"export: the CSV has no column {column!r}", EXIT_USAGE)
    for record in reader:
        yield (record.get(column) or "").strip()


def retry_delay(value: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP date.

    >>> retry_delay("3")
    3.0
    >>> retry_delay("Wed, 21 Oct 2015 07:28:00 GMT")  # a date gone by: at once
    0.0
    >>> retry_delay(None), retry_delay("soon")  # absent or unreadable: one second
    (1.0, 1.0)
    """
    if value is None:
        return 1.0
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 1.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def error_code(response: httpx.Response) -> str:
    """The proxy's error code from a refused request's body, or its HTTP status."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def number(value: Any) -> Decimal | None:
    """A ratio as a number Excel can sum, or nothing when it is not one."""
    try:
        return Decimal(str(value)) if value is not None else None
    except InvalidOperation:
        return None


def row_of(item: dict[str, Any]) -> list[Any]:
    """The workbook row of one streamed item, in the order of ``COLUMNS``.

    >>> row_of({"sn": "C1", "status": "ok", "source": "cache", "discount": {"ratio": "0.21",
    ...     "currency": "CNY", "apportionment": [{"item": "base", "ratio": "0.10"},
    ...     {"item": "promotion", "ratio": "0.11"}]}})
    ['C1', 'ok', 'cache', Decimal('0.21'), 'CNY', 'base=0.10;promotion=0.11', None]
    >>> row_of({"sn": "C 1", "status": "invalid", "error": {"code": "invalid_sn"}})
    ['C 1', 'invalid', None, None, None, None, 'invalid_sn']
    """
    discount = item.get("discount") or {}
    parts = discount.get("apportionment") or []
    apportionment = ";".join(f"{part.get('item')}={part.get('ratio')}" for part in parts)
    return [
        item.get("sn"),
        item.get("status"),
        item.get("source"),
        number(discount.get("ratio")),
        discount.get("currency"),
        apportionment or None,
        (item.get("error") or {}).get("code"),
    ]


def headers() -> dict[str, str]:
    """The lookup's headers, with the bearer token from the environment when set."""
    result = {"Accept": "application/x-ndjson"}
    token = os.environ.get(TOKEN_VARIABLE)
    if token:
        result["Authorization"] = f"Bearer {token}"
    return result


@contextmanager
def open_stream(
    client: httpx.Client, url: str, sns: list[str], tries: int
) -> Iterator[httpx.Response]:
    """The lookup's streamed ``200`` response, retrying while the proxy sheds with ``503``."""
    for attempt in range(1, tries + 1):
        with client.stream("POST", url, json={"sns": sns}, headers=headers()) as response:
            if response.status_code == 503 and attempt < tries:
                response.read()
                delay = retry_delay(response.headers.get("Retry-After"))
                print(
                    f"export: {error_code(response)}, trying again in {delay:.0f} s "
                    f"({attempt}/{tries})",
                    file=sys.stderr,
                )
                time.sleep(delay)
                continue
            if response.status_code != 200:
                response.read()
                raise ExportError(
                    f"export: the proxy answered {response.status_code} {error_code(response)}",
                    EXIT_REFUSED,
                )
            yield response
            return


def items(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The SN items of the stream as their lines arrive; the summary line is not one."""
    for line in response.iter_lines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "summary" not in item:
            yield item


def export(args: argparse.Namespace, sns: list[str]) -> Tally:
    """Streams the lookup into the workbook at ``args.output``; returns what it wrote."""
    url = f"{args.proxy.rstrip('/')}/v1/discounts/lookup"
    timeout = httpx.Timeout(10.0, read=args.timeout)
    tally = Tally()
    with httpx.Client(timeout=timeout) as client, open_stream(
        client, url, sns, args.tries
    ) as response:
        workbook = Workbook(write_only=True)
        sheet = workbook.create_sheet("discounts")
        sheet.append(list(COLUMNS))
        try:
            with tqdm(total=len(sns), unit="SN", file=sys.stderr, disable=None) as progress:
                for item in items(response):
                    sheet.append(row_of(item))
                    tally.count(str(item.get("status")))
                    progress.update()
        finally:
            # A stream that broke off still leaves the rows that came in a valid workbook.
            workbook.save(args.output)
    return tally


def run(argv: list[str] | None = None) -> int:
    """The export, its failures turned into one line on stderr and an exit code."""
    args = parse_args(argv)
    try:
        sns = read_sns(args.file, args.column)
        if not sns:
            raise ExportError(f"export: no SNs in {args.file}", EXIT_USAGE)
        tally = export(args, sns)
    except OSError as err:
        print(f"export: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeDecodeError:
        print(f"export: {args.file} is not UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    except httpx.ConnectError as err:
        print(f"export: the proxy at {args.proxy} is down: {err}", file=sys.stderr)
        return EXIT_PROXY_DOWN
    except httpx.HTTPError as err:
        print(f"export: the lookup broke off ({type(err).__name__}): {err}", file=sys.stderr)
        return EXIT_REFUSED
    except json.JSONDecodeError:
        print("export: the proxy sent a line that is not JSON", file=sys.stderr)
        return EXIT_REFUSED
    first = tally.first_row or 0.0
    print(
        f"export: {tally.rows} rows for {len(sns)} SNs in "
        f"{time.monotonic() - tally.started:.3f} s (first row after {first:.3f} s), "
        f"{tally.failed} failed; wrote {args.output}",
        file=sys.stderr,
    )
    return EXIT_SN_ERRORS if tally.failed else 0


if __name__ == "__main__":
    sys.exit(run())
