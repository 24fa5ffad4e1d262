"""The adapter's SHOW STATS totals: the same values as summing row by row."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from decimal import Decimal
from itertools import compress
from typing import Any

import pytest

from poolwatch.doctor.adapt import _stats_totals


class _Table(Sequence[Mapping[str, Any]]):
    """The part of the PgBouncer source's ``Table`` the doctor reads: named columns."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.columns = tuple(dict.fromkeys(k for row in rows for k in row))
        self.positions = {name: i for i, name in enumerate(self.columns)}
        self.rows = [tuple(row.get(c) for c in self.columns) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        return dict(zip(self.columns, self.rows[i], strict=True))

    def column(self, name: str) -> Sequence[Any] | None:
        at = self.positions.get(name)
        return None if at is None else tuple(row[at] for row in self.rows)


def _reference_totals(stats: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The row-by-row definition (the adapter before it summed integer columns in C)."""
    names = list(dict.fromkeys(key for row in stats for key in row))
    totals: dict[str, float] = {}
    for name in (n for n in names if n.startswith("total_")):
        keep = [row.get("database") != "pgbouncer" for row in stats]
        column = [v for v in compress([row.get(name) for row in stats], keep) if isinstance(v, int | float)]
        if column:
            totals[name.removeprefix("total_")] = sum(map(float, column), 0.0)
    return totals


def _stats(rng: random.Random, n: int, admin_at: list[int]) -> list[dict[str, Any]]:
    big = 2**53
    rows = []
    for i in range(n):
        rows.append(
            {
                "database": "pgbouncer" if i in admin_at else f"db{i}",
                "total_xact_count": rng.randrange(0, 10**9),
                "total_query_time": rng.randrange(0, 10**12),  # microseconds
                "total_near_limit": rng.randrange(big // (2 * n), big // n),  # sums around 2**53
                "total_huge": rng.randrange(big, 4 * big),  # every partial sum rounds
                "total_signed": rng.randrange(-(10**6), 10**6),
                "total_float": rng.random() * 1e6,
                "total_mixed": rng.choice([1, 2.5, True, None, "7", Decimal("1.5")]),
                "total_null": None,
                "avg_ignored": 1,
            }
        )
    return rows


@pytest.mark.parametrize(
    ("n", "admin_at"), [(1, []), (1, [0]), (3, [1]), (2000, [1999]), (2000, [0, 700]), (10000, [10000 - 1])]
)
def test_stats_totals_equal_row_by_row_float_sums(n: int, admin_at: list[int]) -> None:
    rows = _stats(random.Random(n * 7 + len(admin_at)), n, admin_at)
    expected = _reference_totals(rows)
    for stats in (rows, _Table(rows)):
        totals = _stats_totals(stats)
        assert totals == expected
        assert list(totals) == list(expected)  # same keys in the same order
        assert all(type(v) is float for v in totals.values())
    if n > len(admin_at):
        assert "xact_count" in expected and "null" not in expected


def test_stats_totals_of_only_the_admin_console_are_empty() -> None:
    assert _stats_totals([{"database": "pgbouncer", "total_xact_count": 5}]) == {}
    assert _stats_totals([]) == {}
