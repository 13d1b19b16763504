"""End-to-end test of the Dagster web UI in a real (headless) browser.

Starts `dg dev` like `make ui` does, but on a free port, with a temporary DAGSTER_HOME and a temporary copy of
the data directory, so the developer's `.dagster/` and `data/rlhn.duckdb` are never touched. Then, in
Chromium driven by Playwright: opens the asset lineage and the catalog, goes to `raw_bge`, launches a
materialization of ONE partition through "Materialize…" → partition selection → "Launch 1 run", follows the run
to success, and checks that the partition's page renders the metadata the asset recorded.

Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it) and the `playwright` Python
package (`.[dev]`). Playwright drives the system Chromium: `playwright install` (a CDN download) is never used.
Without a browser the test is skipped, except under CI (`CI` set), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rlhn_assets import settings

pytestmark = pytest.mark.browser

ROOT = settings.PROJECT_ROOT
VENV_BIN = Path(sys.executable).parent
ASSET = "raw_bge"
PARTITION = "fiqa"  # ships its negatives: `hard_negative_mining` is a no-op for it, raw_bge needs no model
SERVER_TIMEOUT_S = 180
RUN_TIMEOUT_S = 300
UI_TIMEOUT_MS = 60_000
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _missing(reason: str):
    msg = (
        f"browser test needs {reason} (Debian: `apt-get install chromium`, "
        f"`pip install -e '.[dev]'`; `.ci/run` does both)"
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set, so a missing browser is an error: {msg}", pytrace=False)
    pytest.skip(msg)


def _chromium() -> str:
    """The browser binary: ``$RLHN_CHROMIUM`` if set, else the first Chromium on PATH."""
    wanted = os.environ.get("RLHN_CHROMIUM")
    exe = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, CHROMIUM_CANDIDATES)), None)
    if not exe:
        _missing(f"a Chromium executable (none of {wanted or ', '.join(CHROMIUM_CANDIDATES)} found)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the `playwright` Python package")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instance_yaml(home: Path) -> str:
    """The repo's dagster.yaml with every state directory moved under ``home`` (its relative paths would
    resolve against the project root, i.e. the developer's `.dagster/`), and without the asset daemon: the
    RUNNING automation sensor must not start runs of its own in the middle of the test."""
    cfg = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    cfg["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}
    cfg.setdefault("local_artifact_storage", {"module": "dagster._core.storage.root", "class": "LocalArtifactStorage"})
    cfg["local_artifact_storage"]["config"] = {"base_dir": str(home / "artifacts")}
    cfg.setdefault(
        "compute_logs", {"module": "dagster._core.storage.local_compute_log_manager", "class": "LocalComputeLogManager"}
    )
    cfg["compute_logs"]["config"] = {"base_dir": str(home / "logs")}
    cfg["auto_materialize"] = {"enabled": False, "use_sensors": False}
    cfg["telemetry"] = {"enabled": False}
    return yaml.safe_dump(cfg, sort_keys=False)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(
        url + "/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _wait_until_loaded(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until the webserver answers and the code location is loaded (or failed to load)."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    query = (
        "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    )
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`dg dev` exited with {proc.returncode} before serving:\n{_tail(log)}", pytrace=False)
        try:
            entries = _graphql(url, query)["data"]["workspaceOrError"]["locationEntries"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            last = repr(e)
        else:
            last = repr(entries)
            for e in entries:
                err = e.get("locationOrLoadError") or {}
                if err.get("__typename") == "PythonError":
                    pytest.fail(f"code location {e['name']} failed to load: {err.get('message')}", pytrace=False)
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        time.sleep(2)
    pytest.fail(f"the UI did not come up within {SERVER_TIMEOUT_S}s (last: {last}):\n{_tail(log)}", pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    """`dg dev` runs the webserver, the daemon and code servers as children: signal the whole session."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children it did not reap may still hold the group
        time.sleep(1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.fixture
def chromium() -> str:
    return _chromium()


@pytest.fixture
def dagster_ui(chromium, tmp_path, tmp_data):
    """`dg dev` on a free port with a private instance and data directory; yields (url, data dir, log)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(_instance_yaml(home))
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RLHN_DATA_DIR": str(tmp_data),
        "RLHN_DUCKDB": str(tmp_data / "rlhn.duckdb"),
        "RLHN_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # dg warns when the active venv differs from the project's
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in ("RLHN_REGISTRY",):  # everything must come from the private copy
        env.pop(var, None)
    dg_cli = VENV_BIN / "dg" if (VENV_BIN / "dg").exists() else shutil.which("dg")
    if not dg_cli:
        pytest.fail(f"no `dg` next to {sys.executable} or on PATH (dagster-dg-cli is in `.[dev]`)", pytrace=False)
    log = tmp_path / "dg_dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(dg_cli), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_loaded(url, proc, log)
        yield url, tmp_data, log
    finally:
        _stop(proc)


def materialize_partition_in_ui(page, url: str, asset: str, partition: str) -> str:
    """Drive the UI like a user: lineage → catalog → asset → "Materialize…" → one partition → "Launch 1 run",
    then follow the run page until the run ends. Returns the run id."""
    from playwright.sync_api import expect

    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)

    # the global asset graph lists the groups
    page.goto(url + "/asset-groups", wait_until="domcontentloaded")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    expect(page.get_by_text("ingest", exact=True).first).to_be_visible()

    # catalog → the asset
    page.locator('a[href="/assets"]').first.click()
    page.locator(f'a[href="/assets/{asset}"]').first.click()
    page.wait_for_url(re.compile(rf"/assets/{asset}(\?|$)"))

    # a partitioned asset's button opens the launch dialog ("Materialize…")
    button = page.get_by_role("button", name="Materialize…")
    expect(button).to_be_enabled()
    button.click()
    launch = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {asset}")
    confirm = page.get_by_role("dialog").filter(has_text="Are you sure?")
    expect(launch.or_(confirm).first).to_be_visible()
    if confirm.is_visible():  # "upstream assets ... have not been materialized yet": raw_bge's is a lineage dep
        confirm.get_by_role("button", name="Confirm").click()
    expect(launch).to_be_visible()

    launch.get_by_text("Select a partition or create one").click()
    page.get_by_placeholder("Filter partitions").fill(partition)
    option = page.get_by_role("menuitem").filter(has=page.get_by_text(partition, exact=True))
    expect(option).to_have_count(1)
    option.click()
    launch.get_by_text(f"Launch runs to materialize {asset}").click()  # closes the partition popover
    expect(launch.get_by_text("1 partition", exact=True)).to_be_visible()
    go = launch.get_by_role("button", name="Launch 1 run")
    expect(go).to_be_enabled()
    go.click()

    # the toast links to the run
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    page.get_by_role("link", name="View", exact=True).first.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)

    expect(page.get_by_text(f"partition: {partition}").first).to_be_visible()
    done = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$"))
    expect(done.first).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    status = done.first.inner_text().strip()
    assert status == "Success", f"run {run_id} ended with {status}"
    return run_id


def expected_partition_metadata(data_dir: Path, partition: str) -> tuple[int, str]:
    """What the run stored: the instance count and the query of the first preview row."""
    import duckdb

    with duckdb.connect(str(data_dir / "rlhn.duckdb"), read_only=True) as conn:
        n = conn.execute("SELECT count(*) FROM raw_instances WHERE dataset = ?", [partition]).fetchone()[0]
        query = conn.execute(
            """SELECT q.query FROM raw_instances i JOIN raw_queries q USING (dataset, query_id)
               WHERE i.dataset = ? ORDER BY i.instance_id LIMIT 1""",
            [partition],
        ).fetchone()[0]
    return int(n), query


def check_partition_page(
    page, url: str, asset: str, partition: str, run_id: str, instances: int, first_query: str
) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/assets/{asset}?view=partitions&partition={partition}", wait_until="domcontentloaded")
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(page.get_by_text(run_id[:8], exact=True).first).to_be_visible()

    def value_of(key: str):
        """The value cell of one metadata entry (the metadata table is a two-column key/value table)."""
        key_cell = page.locator("td:first-child", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))
        return page.locator("tr").filter(has=key_cell).last.locator("> td").nth(1)

    expect(value_of("instances")).to_have_text(str(instances))
    expect(value_of("rows_read")).to_be_visible()
    # the markdown preview table is rendered as a table, its query column cut at 60 characters
    preview = value_of("preview")
    expect(preview.get_by_text("first positive", exact=True)).to_be_visible()
    expect(preview).to_contain_text(first_query[:40])


def test_materialize_one_partition_from_the_ui(chromium, dagster_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    url, data_dir, log = dagster_ui
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            # the "Join the Dagster community" dialog opens on 127.0.0.1 for a new instance; it is dismissed
            # for good by this localStorage key (its "Skip" button sets the same)
            context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"');")
            page = context.new_page()
            try:
                run_id = materialize_partition_in_ui(page, url, ASSET, PARTITION)
                instances, first_query = expected_partition_metadata(data_dir, PARTITION)
                assert instances > 0
                check_partition_page(page, url, ASSET, PARTITION, run_id, instances, first_query)
            except BaseException as e:
                shot = tmp_path / "ui-failure.png"
                try:
                    page.screenshot(path=str(shot), full_page=True)
                except Exception as shot_error:  # noqa: BLE001 - the original failure matters more
                    shot = f"(no screenshot: {shot_error})"
                if isinstance(e, Exception):
                    raise AssertionError(
                        f"{e}\n\nscreenshot: {shot}\npage: {page.url}\ndg dev log ({log}):\n{_tail(log, 40)}"
                    ) from e
                raise
        finally:
            browser.close()
    print(f"UI round trip in {time.monotonic() - t0:.0f}s (run {run_id})")
