"""What the PostgreSQL store does beyond the store contract (tests/test_store_contract.py runs that
on it): the extra it needs, its schema made by `sdjobs queue migrate`, credentials kept out of
every message, a lock holder named, a newer schema refused, and Procrastinate's waiting jobs kept
matching the jobs a worker may claim."""

from __future__ import annotations

import sys

import psycopg
import pytest
from process_helpers import sdjobs
from sdjobs import cli
from sdjobs.postgres_server import fresh_url
from runner_helpers import job_spec
from sdjobs.postgres_store import QUEUE, SCHEMA_VERSION, TASK, WRITE_LOCK, PostgresStore, migrate, redact
from sdjobs.store import StoreLocked, StoreTooNew, StoreUnreadable
from test_kill import job_file

SECRET = "s3cret-pw"


def with_password(url: str) -> str:
    """The URL with a user and password (the test server trusts any)."""
    return url.replace("postgresql://sdjobs@", f"postgresql://sdjobs:{SECRET}@")


def test_redact_drops_the_user_the_password_and_a_password_parameter():
    assert redact("postgresql://bob:pw@db.example:5432/farm") == "postgresql://db.example:5432/farm"
    assert redact("postgres://bob@db/farm?password=pw&sslmode=require") == "postgres://db/farm?sslmode=require"
    assert redact("postgresql:///farm") == "postgresql:///farm"


def test_without_the_extra_a_postgresql_queue_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an install without `sdjobs[postgres]` has
    status = cli.main(["queue", "list", "--queue", f"postgresql://bob:{SECRET}@db.example/farm"])
    error = capsys.readouterr().err
    assert status == 2
    assert error == (
        "sdjobs: error: postgresql://db.example/farm: a PostgreSQL queue needs the postgres extra:"
        " pip install 'sdjobs[postgres]'\n"
    )


def test_a_database_without_the_queue_is_refused_until_queue_migrate_makes_it(postgres_url, monkeypatch, tmp_path):
    url = fresh_url(postgres_url)
    monkeypatch.setenv("SDJOBS_QUEUE", url)
    refused = sdjobs("queue", "list")
    assert refused.returncode == 2
    assert refused.stderr == f"sdjobs: error: {redact(url)}: has no sdjobs queue yet; run: sdjobs queue migrate --queue URL\n"
    made = sdjobs("queue", "migrate")
    assert made.stdout == f"{redact(url)}: sdjobs queue schema {SCHEMA_VERSION} (made), with Procrastinate's tables\n"
    assert sdjobs("queue", "migrate").stdout.endswith("(up to date), with Procrastinate's tables\n")
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone() == (True,)
    [line] = sdjobs("queue", "add", job_file(tmp_path, "sea")).stdout.splitlines()
    assert line.split()[1:] == ["sea"]
    _, *rows, _ = sdjobs("queue", "list").stdout.splitlines()  # the last line: when the last job ends
    assert [row.split()[2] for row in rows] == ["sea"]


def test_credentials_never_appear_in_what_the_commands_print(postgres_queue, monkeypatch, tmp_path):
    monkeypatch.setenv("SDJOBS_QUEUE", with_password(postgres_queue))
    printed = [
        sdjobs("queue", "add", job_file(tmp_path, "sea")),
        sdjobs("queue", "list"),
        sdjobs("queue", "show", "feedface"),
        sdjobs("history"),
        sdjobs("queue", "migrate"),
    ]
    assert [answer.returncode for answer in printed] == [0, 0, 2, 0, 0]
    assert printed[2].stderr.startswith(f"sdjobs: error: {redact(postgres_queue)}: no job")
    assert not [answer for answer in printed if SECRET in answer.stdout + answer.stderr or "sdjobs@" in answer.stderr]
    with PostgresStore(with_password(postgres_queue)) as store:
        assert SECRET not in repr(store) + store.location


def test_an_unreachable_server_is_one_line_without_the_password(closed_port_url):
    port = closed_port_url.rpartition(":")[2]
    answer = sdjobs("queue", "list", "--queue", f"postgresql://bob:{SECRET}@127.0.0.1:{port}/farm")
    assert answer.returncode == 2
    assert answer.stderr.startswith(f"sdjobs: error: postgresql://127.0.0.1:{port}/farm: cannot use the queue (")
    assert answer.stderr.count("\n") == 1 and SECRET not in answer.stderr


def test_a_queue_of_a_newer_sdjobs_is_refused_untouched(postgres_queue):
    with psycopg.connect(postgres_queue) as connection:
        connection.execute("UPDATE sdjobs_settings SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreTooNew, match=f"queue schema 99; this one knows up to {SCHEMA_VERSION}"):
        PostgresStore(postgres_queue)
    with pytest.raises(StoreTooNew):
        migrate(postgres_queue)
    with psycopg.connect(postgres_queue) as connection:
        assert connection.execute("SELECT value FROM sdjobs_settings WHERE key = 'schema_version'").fetchone() == ("99",)


def test_a_lock_held_past_the_timeout_is_store_locked_naming_the_holder(postgres_queue):
    with PostgresStore(postgres_queue, timeout=1) as store, psycopg.connect(postgres_queue, application_name="nightly backup") as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        assert store.list() == []  # reads take no lock
        with pytest.raises(StoreLocked, match=r"locked by another process for 1 s \(held by nightly backup"):
            store.register_worker()
        other.rollback()
        assert store.register_worker().id


def test_a_lost_connection_is_a_store_error_and_the_next_call_reconnects(postgres_queue):
    with PostgresStore(postgres_queue) as store, psycopg.connect(postgres_queue, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'sdjobs pid %'")
        with pytest.raises(StoreUnreadable, match="cannot use the queue"):
            store.list()
        assert store.list() == []


def waiting_in_procrastinate(url: str) -> list[str]:
    """The sdjobs jobs Procrastinate waits to hand out, in the order its workers fetch them."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT args->>'job_id' FROM procrastinate_jobs WHERE status = 'todo' AND task_name = %s AND queue_name = %s"
            " ORDER BY priority DESC, id",
            (TASK, QUEUE),
        ).fetchall()
    return [job_id for (job_id,) in rows]


def test_procrastinate_waits_with_one_job_for_each_job_a_worker_may_claim_in_the_queues_order(postgres_queue):
    with PostgresStore(postgres_queue) as store:
        a, b, c = (job.id for job in store.add([job_spec(name=name) for name in "abc"]))
        assert waiting_in_procrastinate(postgres_queue) == [a, b, c]
        store.move(c, before=a)
        assert waiting_in_procrastinate(postgres_queue) == [c, a, b]
        store.set_priority(b, 5)
        assert waiting_in_procrastinate(postgres_queue) == [b, c, a]
        store.pause(a)
        assert waiting_in_procrastinate(postgres_queue) == [b, c]
        store.pause()
        assert waiting_in_procrastinate(postgres_queue) == []
        store.resume()
        store.resume(a)
        assert waiting_in_procrastinate(postgres_queue) == [b, c, a]
        store.request_cancel(c)
        store.remove(a)
        assert waiting_in_procrastinate(postgres_queue) == [b]
        worker = store.register_worker()
        [own] = (job.id for job in store.add([job_spec(name="own")], owner=worker.id))
        assert waiting_in_procrastinate(postgres_queue) == [b], "a living worker's own job is its own"
        store.claim(worker.id, ids=[b])
        store.release(b, worker.id)
        store.unregister_worker(worker.id)
        assert waiting_in_procrastinate(postgres_queue) == [b, own]
        store.retry(c)
        assert waiting_in_procrastinate(postgres_queue) == [b, own, c]


def test_queue_migrate_has_procrastinate_wait_for_jobs_queued_without_it(postgres_queue):
    with PostgresStore(postgres_queue) as store:
        ids = [job.id for job in store.add([job_spec(name=name) for name in "ab"])]
    with psycopg.connect(postgres_queue) as connection:
        connection.execute("DELETE FROM procrastinate_jobs")  # as a queue of an sdjobs before Procrastinate dispatched
    migrate(postgres_queue)
    assert waiting_in_procrastinate(postgres_queue) == ids

