"""deploy/dagster.postgres.yaml works: a real PostgreSQL (Debian's server binaries, a throwaway cluster in a
temp dir on a free port) holds the run, event-log and schedule storage of a DagsterInstance loaded from that
exact file, and a materialization of raw_bge[fiqa] lands there.

Skipped, with the reason, when no PostgreSQL server binaries are installed and CI is unset; a failure when CI
is set (`.ci/run` installs the `postgresql` package)."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from rlhn_assets import settings

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def _pg_bin() -> Path | None:
    found = sorted(
        (Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this module: {host, port, user, db}. As root, the cluster runs as `postgres`
    (the server refuses to run as root)."""
    try:
        import dagster_postgres  # noqa: F401
    except ImportError:
        msg = "dagster-postgres is not installed (pip install -c constraints.txt -e '.[dev]')"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    pg_bin = _pg_bin()
    if pg_bin is None:
        msg = f"no PostgreSQL server binaries (initdb under {PG_BIN_GLOB} or on PATH); apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: .ci/run installs it)")
        pytest.skip(msg)
    as_root = os.geteuid() == 0
    if as_root:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, but there is no `postgres` user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    else:
        prefix = []
    # Not under pytest's tmp_path: /tmp/pytest-of-root is mode 700, so the postgres user could not enter it.
    root = Path(tempfile.mkdtemp(prefix="rlhn_pg_"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_root:
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
    port, user, db = _free_port(), "dagster", "dagster_test"

    def run(*args, **kw):
        return subprocess.run([*prefix, *map(str, args)], check=True, capture_output=True, text=True, **kw)

    try:
        run(pg_bin / "initdb", "-D", data, "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        run(
            pg_bin / "pg_ctl",
            "-D",
            data,
            "-l",
            root / "server.log",
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
        )
    except subprocess.CalledProcessError as e:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL ({pg_bin}): {e.stderr}\n{log}")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {db}")
        conn.close()
        yield {"host": "127.0.0.1", "port": port, "user": user, "db": db, "bin": pg_bin}
    finally:
        subprocess.run(
            [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_instance_stores_run_and_materialization(postgres, tmp_path, tmp_data, monkeypatch):
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(settings.PROJECT_ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    for k, v in {
        "DAGSTER_PG_HOST": postgres["host"],
        "DAGSTER_PG_PORT": str(postgres["port"]),
        "DAGSTER_PG_USER": postgres["user"],
        "DAGSTER_PG_PASSWORD": "unused-trust-auth",
        "DAGSTER_PG_DB": postgres["db"],
        "DAGSTER_HOME": str(home),
    }.items():
        monkeypatch.setenv(k, v)

    from rlhn_assets.defs.ingest.assets import raw_bge
    from rlhn_assets.resources import DatasetRegistryResource
    from rlhn_assets_tests.conftest import make_resources

    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        t0 = time.monotonic()
        result = dg.materialize(
            [raw_bge],
            partition_key="fiqa",
            instance=instance,
            resources=make_resources(
                tmp_path / "pg_test.duckdb", DatasetRegistryResource(path=str(tmp_data / "datasets.yaml"))
            ),
        )
        assert result.success
        print(f"materialize raw_bge[fiqa] against PostgreSQL storage: {time.monotonic() - t0:.1f} s")

        # Through the instance (reads from PostgreSQL).
        record = instance.get_run_record_by_id(result.run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert record.dagster_run.tags["dagster/partition"] == "fiqa"
        assert instance.get_materialized_partitions(dg.AssetKey("raw_bge")) == {"fiqa"}
        event = instance.get_latest_materialization_event(dg.AssetKey("raw_bge"))
        assert event.run_id == result.run_id and event.asset_materialization.partition == "fiqa"
        # Schedule storage answers from PostgreSQL (the daemon keeps nightly_backfill's state and ticks there).
        assert instance.schedule_storage.all_instigator_state() == []

    # And straight from the database, so nothing could have come from a local SQLite file.
    conn = psycopg2.connect(host=postgres["host"], port=postgres["port"], user=postgres["user"], dbname=postgres["db"])
    try:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_id = %s", [result.run_id])
        assert cur.fetchall() == [("SUCCESS",)]
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = "
            "'ASSET_MATERIALIZATION' AND asset_key LIKE %s AND partition = 'fiqa'",
            [result.run_id, "%raw_bge%"],
        )
        assert cur.fetchone()[0] == 1
        cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('instigators', 'jobs', 'job_ticks')"
        )
        assert cur.fetchone()[0] == 3  # schedule storage tables exist
    finally:
        conn.close()
    assert not list(home.rglob("*.db")), "a SQLite storage file appeared: the instance did not use PostgreSQL"
