"""`make demo`'s terminal output (rlhn_assets/demo.py): the log file takes Dagster's stream, the terminal gets one
line per stage, periodic progress and, on failure, the innermost error instead of a stack trace."""

from __future__ import annotations

import os
import sys
import time

import dagster as dg
import pytest

from rlhn_assets import demo


@dg.asset
def slow_counter(context) -> dg.MaterializeResult:
    context.log.info("halfway through the slow counter")
    time.sleep(1.5)
    return dg.MaterializeResult(metadata={"instances": 42, "rows": 7})


@dg.asset
def broken(context) -> None:
    raise ValueError("bad row 17 in data/raw/x.jsonl: no query")


def _defs():
    return dg.Definitions(assets=[slow_counter, broken])


def test_stage_line_counts_and_progress(instance):
    seen = []
    seconds, checks, counts = demo._run(
        _defs(),
        instance,
        ["slow_counter"],
        None,
        {"ops": {}},
        progress=lambda elapsed, msg: seen.append(msg),
        progress_every=0.3,
    )
    assert counts == "slow_counter: instances 42, rows 7"
    assert checks == 0 and seconds >= 1.5
    assert "halfway through the slow counter" in seen, seen


def test_failed_step_reports_the_innermost_error_not_a_stack(instance):
    with pytest.raises(demo.StageFailed) as ei:
        demo._run(_defs(), instance, ["broken"], None, {"ops": {}})
    msg = str(ei.value)
    assert "broken [None] failed" in msg
    assert "ValueError: bad row 17 in data/raw/x.jsonl: no query" in msg
    assert "Traceback" not in msg and 'File "' not in msg


def test_console_sends_everything_else_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "demo.log"
    with demo.Console(log) as console:
        os.write(1, b"raw fd-1 noise\n")
        print("DEBUG - dagster event stream", file=sys.stderr, flush=True)
        print("a library's print", flush=True)
        console.line("[1/1] raw_bge [fiqa]  1.0s  2 checks passed")
    out, err = capfd.readouterr()
    assert "[1/1] raw_bge [fiqa]" in out
    assert "noise" not in out + err and "dagster event stream" not in out + err and "library" not in out + err
    text = log.read_text()
    assert "raw fd-1 noise" in text and "dagster event stream" in text and "a library's print" in text
    assert "[demo] [1/1] raw_bge [fiqa]" in text
    print("after the console")  # fds restored
    assert "after the console" in capfd.readouterr().out
