"""JSON logs (`etl --log-format json`, ETL_LOG_FORMAT) and the run fields of every log record
(`etl.logs`): the real command against the simulator, and the formatter and `log_context` in
process."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from pathlib import Path

import pytest
from helpers import answer, etl_env, ids_file, run_etl
from sqlalchemy.engine import URL

from etl.logs import ContextFilter, JsonFormatter, OneLineFormatter, log_context, shard_label
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID, ESCAPE_REASON, Simulator

TOKEN = "tok-SECRET-789"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# What no line may hold raw: C0/C1 controls, line and paragraph separators (in stderr, "\n"
# only ends lines).
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def raw_control(stderr: str) -> list[str]:
    return RAW_CONTROL.findall(stderr.replace("\n", ""))


def json_records(stderr: str) -> list[dict]:
    """Every line of stderr as a JSON object with the fields each record has."""
    assert stderr.strip(), "no log lines"
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(record, dict)
        assert {"ts", "level", "logger", "message"} <= set(record), line
        assert TS.match(record["ts"]), record["ts"]
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        records.append(record)
    return records


def sync(*args: str, sim: Simulator, db_url: URL, config: Path, **env: str):
    return run_etl(*args, "--config", str(config),
                   env=etl_env(sim, db_url, COMMUBO_ACCESS_TOKEN=TOKEN, **env))


@pytest.fixture
def token_sim():
    """A simulator whose access token is recognisable, to look for it in the output."""
    with Simulator(access_token=TOKEN) as simulator:
        yield simulator


# -- the command -------------------------------------------------------------------------------


def test_json_logs_are_one_record_a_line_with_the_run_id_and_shard(
        token_sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    ids = [f"call-{n:06d}" for n in range(1, 31)] + ["escape-1", "broken-1", "nf-1"]
    # -vv: urllib3 then logs each new connection from the extractor's worker threads.
    proc = sync("--log-format", "json", "-vv", "sync", "--ids-file",
                str(ids_file(tmp_path, ids)), "--json", sim=token_sim, db_url=pg_url,
                config=fast_config)

    assert proc.returncode == 1, proc.stderr  # broken-1 fails
    summary = json.loads(proc.stdout)  # stdout is the summary alone, as without JSON logs
    assert summary["failed"] == 2  # broken-1 and escape-1
    records = json_records(proc.stderr)
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout
    assert not raw_control(proc.stderr)

    started = [r for r in records if r["message"].startswith(f"run {summary['run_id']}: ")]
    assert len(started) == 1
    assert started[0]["logger"] == "etl.sync" and started[0]["level"] == "info"
    run_lines = [r for r in records if r["message"].startswith(f"run {summary['run_id']}")]
    assert len(run_lines) >= 2  # started, and ended
    assert all((r["run_id"], r["shard"]) == (summary["run_id"], "1/1") for r in run_lines)
    # Records from the worker threads (which do not inherit the context) carry it too.
    workers = [r for r in records if r["logger"].startswith("urllib3")]
    assert workers, "no urllib3 debug records"
    assert all(r["run_id"] == summary["run_id"] for r in workers)
    # Every record is the run's: none was logged before the CLI entered the shard context.
    assert all(r.get("shard") == "1/1" for r in records)


def test_etl_log_format_json_from_the_environment_and_the_shard_shown_1_based(
        token_sim: Simulator, pg_url: URL, fast_config: Path, tmp_path: Path) -> None:
    ids = [f"call-{n:06d}" for n in range(1, 61)]
    proc = sync("sync", "--ids-file", str(ids_file(tmp_path, ids)), "--shard-index", "1",
                "--num-shards", "3", sim=token_sim, db_url=pg_url, config=fast_config,
                ETL_LOG_FORMAT="json")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("run ")  # the text summary, unchanged
    run_id = proc.stdout.split()[1]
    records = json_records(proc.stderr)
    run_lines = [r for r in records if "run_id" in r]
    assert run_lines
    assert {(r["run_id"], r["shard"]) for r in run_lines} == {(run_id, "2/3")}
    assert TOKEN not in proc.stderr


def test_the_option_wins_over_the_environment(sim: Simulator, tmp_path: Path) -> None:
    # An error before any run: exit 2, the one line about it in the format asked for.
    env = etl_env(sim, None, ETL_LOG_FORMAT="json")
    proc = run_etl("--log-format", "text", "sync", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "etl: error: give --ids-file PATH (or - for standard input), or --retry-failed"]

    proc = run_etl("sync", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    [record] = json_records(proc.stderr)
    assert (record["level"], record["logger"], record["message"]) == (
        "error", "etl", "error: give --ids-file PATH (or - for standard input), or --retry-failed")


def test_an_unknown_log_format_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_etl("sync", env=etl_env(ETL_LOG_FORMAT="xml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "'xml' is not one of 'text', 'json'" in proc.stderr


def test_a_hostile_403_ends_in_one_json_error_record(route_server, sqlite_url: URL,
                                                     tmp_path: Path) -> None:
    server = route_server(lambda h, _id: answer(
        h, 403, b'{"error": "\x1b[2J\x1b]0;owned\x07"}', reason=ESCAPE_REASON))
    env = etl_env(None, sqlite_url, COMMUBO_BASE_URL=server.url,
                  COMMUBO_TENANT_ID=DEFAULT_TENANT_ID, COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN,
                  ETL_LOG_FORMAT="json")
    proc = run_etl("-v", "sync", "--ids-file", str(ids_file(tmp_path, ["a", "b"])), env=env)

    assert proc.returncode == 3
    assert not raw_control(proc.stderr)
    records = json_records(proc.stderr)
    last = records[-1]
    assert (last["level"], last["logger"]) == ("error", "etl")
    # Made printable where it entered the message (as in text), not escaped a second time.
    assert last["message"].startswith("error: 403 Bad Request\\x1b]0;pwned\\x07\\x1b[2J\\rall")
    assert DEFAULT_ACCESS_TOKEN not in proc.stderr


# -- the formatter -----------------------------------------------------------------------------


def record(msg: str, *args: object, level: int = logging.INFO, exc_info=None,
           name: str = "etl.test") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize("message", [
    "two\nlines", "a\rcarriage return", "\x1b]0;pwned\x07\x1b[2J", "nel\x85line",
    "line\u2028separator", "para\u2029graph", "bidi \u202eevil", "lone \ud800 surrogate",
    "tab\there", "zero\x00byte", '"quoted" \\ backslash', "日本語 and ☎",
])
def test_every_record_is_one_line_and_its_message_comes_back_unchanged(message: str) -> None:
    line = JsonFormatter().format(record("said: %s", message))
    assert len(line.splitlines()) == 1
    assert not RAW_CONTROL.search(line)
    assert "\u202e" not in line and "\ud800" not in line
    assert json.loads(line)["message"] == f"said: {message}"


def test_the_fields_of_a_record() -> None:
    rec = record("%d loaded", 5, level=logging.WARNING, name="etl.sync")
    rec.created = 1_795_640_584.1239  # 2026-11-25T21:03:04.123Z
    with log_context(run_id="20261125T210304Z-abcdef", shard="2/8"):
        ContextFilter().filter(rec)
    out = json.loads(JsonFormatter().format(rec))
    assert out == {"ts": "2026-11-25T21:03:04.123Z", "level": "warning", "logger": "etl.sync",
                   "message": "5 loaded", "run_id": "20261125T210304Z-abcdef", "shard": "2/8"}
    assert list(out) == ["ts", "level", "logger", "message", "run_id", "shard"]


def test_an_exception_is_one_line_unless_etl_debug() -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        rec = record("it failed", level=logging.ERROR, exc_info=sys.exc_info())
    out = json.loads(JsonFormatter(debug=False).format(rec))
    assert out["exc"] == "ValueError: bad value"
    debug = JsonFormatter(debug=True).format(rec)
    assert len(debug.splitlines()) == 1
    exc = json.loads(debug)["exc"]
    assert exc.startswith("Traceback (most recent call last):")
    assert exc.endswith("ValueError: bad value\nsecond line")
    assert "exc" not in json.loads(JsonFormatter().format(record("fine")))


def test_a_long_message_is_cut() -> None:
    out = json.loads(JsonFormatter().format(record("x" * 10_000)))
    assert out["message"] == "x" * 4000 + "…"


def test_the_text_format_is_as_before() -> None:
    formatter = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise KeyError("k")
    except KeyError:
        rec = record("a\x1b[2J b", level=logging.ERROR, exc_info=sys.exc_info())
    with log_context(run_id="r1"):  # the fields are not part of a text line
        ContextFilter().filter(rec)
    assert formatter.format(rec) == "ERROR etl.test: a\\x1b[2J b\\n  (KeyError: 'k')"


# -- log_context ---------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    handler = Capture()
    logger = logging.getLogger("etl.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler
    logger.removeHandler(handler)


def fields(rec: logging.LogRecord) -> dict:
    return dict(rec.etl_fields)


def test_log_context_reaches_worker_threads_and_nests(captured) -> None:
    logger, handler = captured
    logger.info("before")
    with log_context(run_id="r1", shard="1/2"):
        logger.info("in the run")
        worker = threading.Thread(target=logger.info, args=("from a worker",))
        worker.start()
        worker.join()
        with log_context(batch=3):
            logger.info("nested")
        logger.info("after nested")
    logger.info("after")

    got = {r.getMessage(): fields(r) for r in handler.records}
    run = {"run_id": "r1", "shard": "1/2"}
    assert got == {"before": {}, "in the run": run, "from a worker": run,
                   "nested": {**run, "batch": 3}, "after nested": run, "after": {}}
    in_run = handler.records[1]
    assert (in_run.run_id, in_run.shard) == ("r1", "1/2")  # attributes, for any formatter
    assert not hasattr(handler.records[0], "run_id")


def test_a_thread_with_its_own_context_keeps_it(captured) -> None:
    logger, handler = captured
    inside = threading.Event()
    done = threading.Event()

    def other_run() -> None:
        with log_context(run_id="r2"):
            inside.set()
            done.wait(5)
            logger.info("r2 here")

    thread = threading.Thread(target=other_run)
    with log_context(run_id="r1"):
        thread.start()
        inside.wait(5)
        logger.info("r1 here")  # the newer block of the other thread does not take it
        done.set()
        thread.join()
    assert {r.getMessage(): fields(r)["run_id"] for r in handler.records} == {
        "r1 here": "r1", "r2 here": "r2"}


def test_extra_given_at_the_call_wins_and_reserved_names_are_refused(captured) -> None:
    logger, handler = captured
    with log_context(run_id="r1"):
        logger.info("explicit", extra={"run_id": "mine"})
    assert handler.records[0].run_id == "mine"
    for name in ("message", "msg", "levelname", "ts", "exc"):
        with pytest.raises(ValueError, match=name), log_context(**{name: 1}):
            pass


def test_shard_label_counts_from_one() -> None:
    assert shard_label(0, 1) == "1/1"
    assert shard_label(2, 8) == "3/8"
