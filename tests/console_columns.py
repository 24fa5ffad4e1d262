"""Column lists of PgBouncer's admin console, spelled as PgBouncer prints them (1.18+), for tests
that build result rows by hand. Written out rather than taken from ``poolwatch``'s own column
table, so the tests do not trust the code they check."""

from __future__ import annotations

#: SHOW POOLS of PgBouncer 1.18 to 1.25
POOL_COLUMNS = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
]
