"""The job-list read model on PostgreSQL (imported only for postgresql:// stores, so
SQLite users never load the PostgreSQL driver)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder

from backhaul.adapters.view import PROJECTION, _create_sql, _SqlViews


class PostgresJobViews(PostgresTrackingRecorder, _SqlViews):
    mark = "%s"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from psycopg import sql

        super().__init__(*args, **kwargs)
        self.sql_create_statements.extend(sql.SQL(s) for s in _create_sql("TEXT", "NUMERIC"))  # type: ignore[arg-type]

    def _tracking(self, c: Any, position: int) -> None:
        self._insert_tracking(c, Tracking(PROJECTION, position))

    def _max(self) -> int | None:
        return self.max_tracking_id(PROJECTION)

    def _tuple(self, record: Any) -> Sequence[Any]:
        values = tuple(record.values()) if isinstance(record, dict) else tuple(record)
        return tuple(int(v) if _is_decimal(v) else v for v in values)

    _add_if = "IF NOT EXISTS"  # several workers may upgrade one store at once

    def _has_next_due(self, c: Any) -> bool:
        c.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'backhaul_job_views' AND column_name = 'next_due'",
            [self.datastore.schema or "public"],
        )
        return bool(c.fetchall())

    def _clear(self, c: Any) -> None:
        c.execute("DELETE FROM backhaul_job_views")
        c.execute(
            f"DELETE FROM {self.datastore.schema}.{self.tracking_table_name} "
            "WHERE application_name = %s",
            [PROJECTION],
        )


def _is_decimal(value: Any) -> bool:
    return type(value).__name__ == "Decimal"
