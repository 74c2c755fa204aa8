"""The PostgreSQL fixtures work against a real server: psycopg, eventsourcing.postgres, restart."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    StoredEvent,
)

from .postgres import PostgresServer, _alive, running_postgres

pytestmark = pytest.mark.peer


def es_env(url: str) -> dict[str, str]:
    """eventsourcing.postgres settings for a postgresql:// URL."""
    u = urlsplit(url)
    assert u.scheme == "postgresql"
    assert u.hostname
    assert u.port
    assert u.username
    assert u.password is not None
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(u.path.lstrip("/")),
        "POSTGRES_HOST": u.hostname,
        "POSTGRES_PORT": str(u.port),
        "POSTGRES_USER": unquote(u.username),
        "POSTGRES_PASSWORD": unquote(u.password),
        "POSTGRES_CONNECT_TIMEOUT": "5",  # a bad address or password must not hang for 30 s
        "CREATE_TABLE": "y",
    }


def recorder_for(url: str) -> tuple[InfrastructureFactory, ApplicationRecorder]:
    factory = InfrastructureFactory.construct(es_env(url))
    return factory, factory.application_recorder()


def event(originator_id: object, version: int, payload: bytes = b"{}") -> StoredEvent:
    return StoredEvent(
        originator_id=originator_id,  # type: ignore[arg-type]
        originator_version=version,
        topic="tests.peers:Happened",
        state=payload,
    )


def same(a: StoredEvent, b: StoredEvent) -> bool:
    return (str(a.originator_id), a.originator_version, a.topic, bytes(a.state)) == (
        str(b.originator_id),
        b.originator_version,
        b.topic,
        bytes(b.state),
    )


def test_server_attributes_match_url(postgres_server: PostgresServer) -> None:
    s = postgres_server
    assert s.url == f"postgresql://{s.user}:{s.password}@127.0.0.1:{s.port}/{s.dbname}"
    assert s.host == "127.0.0.1"
    assert s.port > 1024
    assert s.dbname == "backhaul"
    assert str(s.dir).startswith("/tmp/bh-pg.")
    assert (s.dir / f".s.PGSQL.{s.port}").exists()  # the unix socket
    assert s.is_running()


def test_select_one(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        dbname = urlsplit(postgres_url).path.lstrip("/")
        assert conn.execute("select current_database()").fetchone() == (dbname,)


def test_password_is_required_over_tcp(postgres_url: str) -> None:
    bad = re.sub(r":[^:@/]+@", ":wrong@", postgres_url, count=1)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


def test_each_test_gets_a_fresh_database(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    with psycopg.connect(postgres_server.url, connect_timeout=5) as conn:
        dbs = {r[0] for r in conn.execute("select datname from pg_database")}
    assert urlsplit(postgres_url).path.lstrip("/") in dbs
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        row = conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()
    assert row == (0,)


def test_eventsourcing_recorder_roundtrip(postgres_url: str) -> None:
    factory, recorder = recorder_for(postgres_url)
    try:
        oid = uuid4()
        e1, e2 = event(oid, 1, b'{"n":1}'), event(oid, 2, b'{"n":2}')
        ids = recorder.insert_events([e1, e2])
        assert ids is not None
        assert len(ids) == 2

        got = recorder.select_events(oid)
        assert len(got) == 2
        assert same(got[0], e1)
        assert same(got[1], e2)
        assert [e.originator_version for e in recorder.select_events(oid, gt=1)] == [2]

        notes = recorder.select_notifications(start=None, limit=10)
        assert [n.id for n in notes] == list(ids)
        assert all(same(n, e) for n, e in zip(notes, (e1, e2), strict=True))
        assert recorder.max_notification_id() == ids[-1]
    finally:
        factory.close()


def test_duplicate_originator_version_raises_integrity_error(postgres_url: str) -> None:
    factory, recorder = recorder_for(postgres_url)
    try:
        oid = uuid4()
        recorder.insert_events([event(oid, 1, b'{"first":true}')])
        with pytest.raises(IntegrityError):
            recorder.insert_events([event(oid, 1, b'{"second":true}')])
        # the conflicting batch is all-or-nothing, and the first write is intact
        with pytest.raises(IntegrityError):
            recorder.insert_events([event(oid, 2), event(oid, 1)])
        got = recorder.select_events(oid)
        assert len(got) == 1
        assert bytes(got[0].state) == b'{"first":true}'
        assert len(recorder.select_notifications(start=None, limit=10)) == 1
    finally:
        factory.close()


@pytest.mark.parametrize("immediate", [False, True], ids=["fast", "crash"])
def test_restart_keeps_data(
    postgres_server: PostgresServer, postgres_url: str, immediate: bool
) -> None:
    port, pid = postgres_server.port, postgres_server.pid
    factory, recorder = recorder_for(postgres_url)
    oid = uuid4()
    try:
        recorder.insert_events([event(oid, 1, b'{"before":"restart"}')])
    finally:
        factory.close()
    old = psycopg.connect(postgres_url, connect_timeout=5, autocommit=True)
    try:
        old.execute("create table t (v text)")
        old.execute("insert into t values ('committed')")

        postgres_server.restart(immediate=immediate)

        assert postgres_server.port == port
        assert postgres_server.pid != pid
        assert postgres_server.is_running()
        assert not _alive(pid, None)
        # connections from before the restart are dead
        with pytest.raises(psycopg.OperationalError):
            old.execute("select 1")
    finally:
        old.close()

    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        assert conn.execute("select v from t").fetchall() == [("committed",)]
    factory, recorder = recorder_for(postgres_url)
    try:
        got = recorder.select_events(oid)
        assert [bytes(e.state) for e in got] == [b'{"before":"restart"}']
        recorder.insert_events([event(oid, 2)])  # and it takes new writes
        assert len(recorder.select_events(oid)) == 2
    finally:
        factory.close()


def test_own_cluster_is_removed_after_use() -> None:
    with running_postgres(dbname="other") as pg:
        d, pid = pg.dir, pg.pid
        assert pg.url.endswith(f":{pg.port}/other")
        conn = psycopg.connect(pg.url, connect_timeout=5, autocommit=True)
        try:
            assert conn.execute("select current_database()").fetchone() == ("other",)
            # an open client must not delay the stop (SIGINT = fast shutdown)
            pg.stop()
            assert not pg.is_running()
        finally:
            conn.close()
    assert not _alive(pid, None)
    assert not d.exists()


def test_start_failure_raises_with_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # not tmp_path: as root initdb runs as the postgres user, who can't enter /tmp/pytest-of-root
    fake = Path(tempfile.mkdtemp(prefix="bh-fake."))
    try:
        fake.chmod(0o755)
        for tool in ("initdb", "pg_ctl"):
            (fake / tool).write_text("#!/bin/sh\necho 'fake failure: boom' >&2\nexit 3\n")
            (fake / tool).chmod(0o755)
        monkeypatch.setenv("BACKHAUL_PG_BIN", str(fake))
        with pytest.raises(RuntimeError, match="initdb failed") as exc, running_postgres():
            pass
    finally:
        shutil.rmtree(fake)
    assert "boom" in str(exc.value)  # the log tail is in the message
    left = re.findall(r"/tmp/bh-pg\.\w+", str(exc.value))
    assert left
    assert not any(Path(p).exists() for p in left)  # and the temp dir is gone

    monkeypatch.setenv("BACKHAUL_PG_BIN", str(fake / "nowhere"))
    with pytest.raises(RuntimeError, match="not found"), running_postgres():
        pass
