"""`etl sync --follow-related`: the calls that fetched calls derive from (`relatedCallId`) are
fetched too, transitively, up to a depth limit, each once a run.

A small server in this module serves the chains each test defines and counts the requests per
id (the simulator serves unrelated calls); the warehouse is a real database.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from helpers import RouteServer, answer, etl_env, ids_file, make_settings, run_etl
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import URL

from etl.errors import InputError, Interrupted
from etl.extract import Extractor, RelatedCalls
from etl.ids import select_shard, shard_of
from etl.outcome import OK, Outcome
from etl.schema import calls, etl_call_status, etl_runs
from etl.simulator import DEFAULT_ACCESS_TOKEN, DEFAULT_TENANT_ID
from etl.sync import StopRequest, SyncSummary, run_sync

ABSENT = object()  # a payload without the relatedCallId key


class ChainApi:
    """Serves the calls a test defines: `links[id]` is the relatedCallId its payload carries
    (ABSENT: no such key). For an id of an `endless` prefix, `p-n` relates to `p-(n+1)`,
    forever. Other ids answer 404, those in `failing` 500 every time, and those in `impostors`
    with a payload of another call. `before(id)` runs as each request arrives. Counts the
    requests per id."""

    def __init__(self, route_server: Callable[..., RouteServer],
                 links: dict[str, Any] | None = None, *, failing: tuple[str, ...] = (),
                 impostors: tuple[str, ...] = (), endless: tuple[str, ...] = (),
                 delay_s: float = 0.0, before: Callable[[str], None] | None = None) -> None:
        self.links = links or {}
        self.failing = set(failing)
        self.impostors = set(impostors)
        self.endless = endless
        self.delay_s = delay_s
        self.before = before
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.server = route_server(self._route)
        self.url = self.server.url

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def _route(self, h: BaseHTTPRequestHandler, call_id: str) -> None:
        with self._lock:
            self.requests[call_id] += 1
        if self.before is not None:
            self.before(call_id)
        if self.delay_s:
            time.sleep(self.delay_s)
        related = self._related(call_id)
        if call_id in self.failing:
            answer(h, 500, b"{}", reason="Internal Server Error")
        elif related is None:
            answer(h, 404, b'{"message": "not found"}', reason="Not Found")
        else:
            payload: dict[str, Any] = {
                "callId": "someone-else" if call_id in self.impostors else call_id,
                "callType": 1, "talkTime": 30}
            if related is not ABSENT:
                payload["relatedCallId"] = related
            answer(h, 200, json.dumps(payload).encode(), ("Content-Type", "application/json"))

    def _related(self, call_id: str) -> Any:
        if call_id in self.links:
            return self.links[call_id]
        prefix, _, n = call_id.rpartition("-")
        if prefix in self.endless and n.isdigit() and not self.server.stopping.is_set():
            return f"{prefix}-{int(n) + 1}"
        return None


def chain(*call_ids: str) -> dict[str, Any]:
    """Links of a chain: each call derives from the next one, the last from none."""
    links: dict[str, Any] = {a: b for a, b in zip(call_ids, call_ids[1:], strict=False)}
    links[call_ids[-1]] = ABSENT
    return links


def sync(api: ChainApi, db_url: URL, call_ids: list[str], **kwargs: Any) -> SyncSummary:
    settings = make_settings(api, db_url, **kwargs.pop("settings", {}))
    return run_sync(settings, call_ids, follow_related=kwargs.pop("follow_related", True),
                    **kwargs)


def stored(db_url: URL) -> tuple[dict[str, str], dict[str, str | None]]:
    """(status of each id, related_call_id of each stored call)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            statuses = dict(conn.execute(select(etl_call_status.c.call_id,
                                                etl_call_status.c.status)).all())
            links = dict(conn.execute(select(calls.c.call_id, calls.c.related_call_id)).all())
    finally:
        engine.dispose()
    return statuses, links


def assert_counts_hold(db_url: URL, summary: SyncSummary) -> None:
    """The identity of a completed run, and the run's row and statuses agree with it."""
    assert summary.requested + summary.related == (
        summary.loaded + summary.not_found + summary.failed + summary.skipped)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            run = conn.execute(select(etl_runs).where(
                etl_runs.c.run_id == summary.run_id)).mappings().one()
            by_status = dict(conn.execute(
                select(etl_call_status.c.status, func.count())
                .where(etl_call_status.c.run_id == summary.run_id)
                .group_by(etl_call_status.c.status)).all())
    finally:
        engine.dispose()
    for name in ("status", "requested", "related", "loaded", "not_found", "failed", "skipped"):
        assert run[name] == getattr(summary, name), name
    assert by_status.get("loaded", 0) == summary.loaded
    assert by_status.get("not_found", 0) == summary.not_found
    assert by_status.get("failed", 0) == summary.failed


# -- chains are completed ------------------------------------------------------------------------


def test_a_chain_of_depth_3_outside_the_ids_file_is_completed(route_server, pg_url):
    api = ChainApi(route_server, chain("a0", "a1", "a2", "a3"))

    summary = sync(api, pg_url, ["a0"])

    statuses, links = stored(pg_url)
    assert statuses == dict.fromkeys(["a0", "a1", "a2", "a3"], "loaded")
    assert links == {"a0": "a1", "a1": "a2", "a2": "a3", "a3": None}
    assert (summary.requested, summary.related, summary.loaded) == (1, 3, 4)
    assert summary.status == "succeeded"
    assert api.requests == Counter(a0=1, a1=1, a2=1, a3=1)
    assert_counts_hold(pg_url, summary)


def test_without_follow_related_no_related_call_is_fetched(route_server, pg_url):
    api = ChainApi(route_server, chain("a0", "a1", "a2"))

    summary = sync(api, pg_url, ["a0"], follow_related=False)

    assert api.requests == Counter(a0=1)
    assert summary.related == 0
    assert summary.to_dict()["related"] == 0


def test_related_depth_1_fetches_only_the_first_link(route_server, pg_url):
    api = ChainApi(route_server, chain("a0", "a1", "a2", "a3"))

    summary = sync(api, pg_url, ["a0"], related_depth=1)

    assert api.requests == Counter(a0=1, a1=1)
    assert stored(pg_url)[0] == {"a0": "loaded", "a1": "loaded"}
    assert summary.related == 1


def test_an_endless_chain_ends_at_the_depth_limit(route_server, pg_url):
    api = ChainApi(route_server, endless=("p", "q", "r"))

    summary = sync(api, pg_url, ["p-0", "q-0", "r-5"], related_depth=3)

    assert api.requests == Counter({f"{p}-{n}": 1 for p, start in (("p", 0), ("q", 0), ("r", 5))
                                    for n in range(start, start + 4)})
    assert (summary.related, summary.loaded) == (9, 12)
    assert_counts_hold(pg_url, summary)


def test_a_call_reached_by_a_shorter_way_later_is_followed_from_there():
    """b0 -> c -> d -> x -> y -> z and a0 -> x, depth 3: by b0's way x is at depth 3 and y out
    of reach; by a0's, x is at 1, so y (2) and z (3) are fetched, also when b0's chain got to
    x first (the order forced here)."""
    related = RelatedCalls(["a0", "b0"], max_depth=3)
    links = {"b0": "c", "c": "d", "d": "x", "x": "y", "y": "z", "z": None, "a0": "x"}

    def fetched(call_id: str) -> list[str]:
        payload = {"callId": call_id, "relatedCallId": links[call_id]}
        return related.after(Outcome(call_id, OK, payload=payload))

    assert fetched("b0") == ["c"]
    assert fetched("c") == ["d"]
    assert fetched("d") == ["x"]
    assert fetched("x") == []  # y would be at depth 4
    assert fetched("a0") == ["y"]  # x is at depth 1 now: y at 2
    assert fetched("y") == ["z"]
    assert fetched("z") == []
    assert all(related.is_related(i) for i in "cdxyz")
    assert not related.is_related("a0")


def test_a_call_reached_by_a_shorter_way_gets_its_chain_over_http(route_server, pg_url):
    arrived = threading.Event()

    def before(call_id: str) -> None:
        if call_id == "x":
            arrived.set()
        elif call_id == "a0":
            arrived.wait(10)  # let b0's long way reach x first, where the timing allows

    api = ChainApi(route_server, {**chain("b0", "c", "d", "x", "y", "z"), "a0": "x"},
                   before=before)

    summary = sync(api, pg_url, ["a0", "b0"], related_depth=3, settings={"concurrency": 2})

    assert api.requests == Counter(a0=1, b0=1, c=1, d=1, x=1, y=1, z=1)
    assert summary.related == 5


def test_the_extractor_fetches_what_its_follow_hook_names_and_then_ends(route_server,
                                                                        sqlite_url):
    # Each call leads to two more, three levels down: the one given id runs out at once, and
    # the workers wait for what the calls in flight lead to.
    tree = [f"t{bits}" for n in range(4) for bits in
            (format(i, f"0{n}b") if n else "" for i in range(2 ** n))]
    api = ChainApi(route_server, dict.fromkeys(tree, ABSENT))

    def follow(outcome: Outcome) -> list[str]:
        return [outcome.call_id + "0", outcome.call_id + "1"] if len(outcome.call_id) < 4 else []

    extractor = Extractor(make_settings(api, sqlite_url, concurrency=4))
    got = [o.call_id for o in extractor.fetch(["t"], follow=follow) if o is not None]

    assert sorted(got) == sorted(tree)
    assert api.requests == Counter(tree)


# -- each id once ----------------------------------------------------------------------------


def test_two_calls_deriving_from_one_fetch_it_once(route_server, pg_url):
    api = ChainApi(route_server, {"p": "t", "q": "t", "r": "t", "t": ABSENT})

    summary = sync(api, pg_url, ["p", "q", "r"])

    assert api.requests == Counter(p=1, q=1, r=1, t=1)
    assert summary.related == 1
    assert_counts_hold(pg_url, summary)


def test_a_cycle_is_fetched_once_around(route_server, pg_url):
    api = ChainApi(route_server, {"a": "b", "b": "c", "c": "a", "self": "self"})

    summary = sync(api, pg_url, ["a", "self"])

    assert api.requests == Counter(a=1, b=1, c=1, self=1)
    assert (summary.requested, summary.related, summary.loaded) == (2, 2, 4)
    assert_counts_hold(pg_url, summary)


def test_an_id_of_the_ids_file_reached_as_related_is_fetched_once_and_counted_as_requested(
        route_server, pg_url):
    api = ChainApi(route_server, {"x0": "y0", "y0": "z", "z": "x0"})

    summary = sync(api, pg_url, ["x0", "y0"])

    assert api.requests == Counter(x0=1, y0=1, z=1)
    assert (summary.requested, summary.related, summary.loaded) == (2, 1, 3)
    assert_counts_hold(pg_url, summary)


# -- what a related id may be -----------------------------------------------------------------


def test_a_related_id_answering_404_is_recorded_not_found(route_server, pg_url):
    api = ChainApi(route_server, {"a0": "gone", "b0": "b1", "b1": "gone-too"})

    summary = sync(api, pg_url, ["a0", "b0"])

    statuses, _ = stored(pg_url)
    assert statuses == {"a0": "loaded", "b0": "loaded", "b1": "loaded", "gone": "not_found",
                        "gone-too": "not_found"}
    assert (summary.related, summary.loaded, summary.not_found) == (3, 3, 2)
    assert api.requests["gone"] == api.requests["gone-too"] == 1
    assert_counts_hold(pg_url, summary)


def test_related_ids_of_invalid_form_are_not_requested(route_server, pg_url):
    invalid = {"sp": "has space", "empty": "", "long": "x" * 65, "slash": "a/b", "dot": "../x",
               "float": 1.5, "null": None, "absent": ABSENT, "nested": {"callId": "n1"}}
    # "wrong" answers with a payload of another call: what that names is not followed.
    api = ChainApi(route_server, {**invalid, "number": 424242, "424242": ABSENT,
                                  "wrong": "w1", "w1": ABSENT}, impostors=("wrong",))

    call_ids = [*invalid, "number", "wrong"]
    summary = sync(api, pg_url, call_ids)

    assert api.requests == Counter({i: 1 for i in [*call_ids, "424242"]})
    statuses, links = stored(pg_url)
    # A number is stored as its digits, and followed as that same id.
    assert links["number"] == "424242"
    assert statuses["424242"] == "loaded"
    assert statuses["wrong"] == "failed"  # the loader refuses it, as without following
    assert summary.related == 1
    assert_counts_hold(pg_url, summary)


# -- --skip-loaded ---------------------------------------------------------------------------


def test_skip_loaded_does_not_refetch_related_calls_already_loaded(route_server, pg_url):
    api = ChainApi(route_server, {**chain("a0", "a1", "a2", "a3"), "b0": "a1"})
    sync(api, pg_url, ["a0"])
    api.requests.clear()

    summary = sync(api, pg_url, ["b0"], skip_loaded=True)

    assert api.requests == Counter(b0=1)  # a1 is loaded, and so are a2 and a3 it leads to
    assert (summary.requested, summary.related, summary.loaded, summary.skipped) == (1, 0, 1, 0)
    assert_counts_hold(pg_url, summary)


def test_skip_loaded_completes_the_chains_an_earlier_run_left_unfinished(route_server, pg_url):
    api = ChainApi(route_server, chain("a0", "a1", "a2", "a3", "a4"))
    sync(api, pg_url, ["a0"], related_depth=1)  # or a run that stopped after a1
    api.requests.clear()

    summary = sync(api, pg_url, ["a0"], skip_loaded=True, related_depth=3)

    # a0 and a1 are loaded: the chain goes on from the related ids stored with them.
    assert api.requests == Counter(a2=1, a3=1)
    assert stored(pg_url)[0] == dict.fromkeys(["a0", "a1", "a2", "a3"], "loaded")
    assert (summary.requested, summary.skipped, summary.related, summary.loaded) == (1, 1, 2, 2)
    assert_counts_hold(pg_url, summary)


def test_skip_loaded_refetches_related_calls_that_did_not_load(route_server, any_db_url):
    api = ChainApi(route_server, {"a0": "a1", "a1": "a2", "a2": ABSENT, "b0": "gone"},
                   failing=("a1",))
    first = sync(api, any_db_url, ["a0", "b0"], settings={"max_attempts": 2})
    assert (first.loaded, first.failed, first.not_found) == (2, 1, 1)  # a0, b0; a1; gone
    api.failing.clear()
    api.requests.clear()

    summary = sync(api, any_db_url, ["a0", "b0", "c0"], skip_loaded=True)

    # a0 and b0 are loaded: skipped, their stored links followed; a1 failed and gone was
    # not found, so both are fetched again; c0 answers 404.
    assert api.requests == Counter(a1=1, a2=1, gone=1, c0=1)
    assert (summary.requested, summary.skipped, summary.related) == (3, 2, 3)
    assert (summary.loaded, summary.not_found, summary.failed) == (2, 2, 0)
    assert stored(any_db_url)[0]["a2"] == "loaded"
    assert_counts_hold(any_db_url, summary)


# -- counts ----------------------------------------------------------------------------------


def test_the_summary_counts_hold_with_every_kind_of_outcome(route_server, any_db_url):
    links = {**chain("a0", "a1", "a2"), "b0": "broken", "c0": "missing", "d0": "a1",
             "e0": "e1", "e1": "a0", "f0": "bad id"}
    api = ChainApi(route_server, {**links, "broken": "never"}, failing=("broken",))

    summary = sync(api, any_db_url, ["a0", "b0", "c0", "d0", "e0", "f0", "nf0"],
                   settings={"batch_size": 2, "max_attempts": 2})

    # Related: a1, a2, broken, missing, e1 (a0 is in the ids file; "bad id" is not followed).
    assert (summary.requested, summary.related) == (7, 5)
    assert (summary.loaded, summary.not_found, summary.failed, summary.skipped) == (9, 2, 1, 0)
    assert summary.status == "partial"
    assert all(n == 1 for call_id, n in api.requests.items() if call_id != "broken")
    assert api.requests["never"] == 0
    assert_counts_hold(any_db_url, summary)


def test_a_shard_follows_its_own_chains_into_other_shards_ids(route_server, pg_url):
    mine = next(f"s{n}" for n in range(100) if shard_of(f"s{n}", 2) == 0)
    theirs = next(f"t{n}" for n in range(100) if shard_of(f"t{n}", 2) == 1)
    other = next(f"o{n}" for n in range(100) if shard_of(f"o{n}", 2) == 1)
    api = ChainApi(route_server, {mine: theirs, theirs: ABSENT, other: "o-related",
                                  "o-related": ABSENT})

    summary = sync(api, pg_url, select_shard([mine, other], 0, 2), shard=(0, 2))

    assert api.requests == Counter({mine: 1, theirs: 1})
    assert summary.related == 1


def test_a_related_depth_below_1_is_refused_before_any_request(route_server, pg_url):
    api = ChainApi(route_server, chain("a0", "a1"))

    with pytest.raises(InputError, match="related depth"):
        sync(api, pg_url, ["a0"], related_depth=0)
    assert api.total == 0


# -- stopping --------------------------------------------------------------------------------


def test_a_stop_ends_a_run_while_related_ids_keep_coming(route_server, pg_url):
    stop = StopRequest()
    stopped_at: list[int] = []
    after_stop = 5000  # the chains end this many requests after the stop, should it not work

    def before(call_id: str) -> None:
        if api.total >= 60 and not stop.requested:
            stopped_at.append(api.total)
            stop.stop("stopped by the test")
        if stopped_at and api.total > stopped_at[0] + after_stop:
            api.endless = ()

    # Two chains for four workers: two of them wait for related ids when the stop comes.
    api = ChainApi(route_server, endless=("p", "q"), delay_s=0.002, before=before)
    threads_before = set(threading.enumerate())

    with pytest.raises(Interrupted) as caught:
        sync(api, pg_url, ["p-0", "q-0"], related_depth=10**9, stop=stop)

    summary = caught.value.summary
    assert summary.status == "interrupted"
    assert summary.related > 0
    ended = api.total
    assert ended < stopped_at[0] + after_stop
    # No worker is left, neither fetching nor waiting for related ids.
    assert [t.name for t in set(threading.enumerate()) - threads_before
            if t.name.startswith("fetch-")] == []
    time.sleep(0.5)
    assert api.total == ended
    statuses, links = stored(pg_url)
    assert summary.loaded == len(statuses)  # what was fetched before the stop is committed
    assert all(links[f"{p}-0"] == f"{p}-1" for p in "pq")


def test_ctrl_c_ends_an_etl_sync_that_follows_an_endless_chain(route_server, pg_url, fast_config,
                                                                tmp_path):
    api = ChainApi(route_server, endless=("p", "q"), delay_s=0.002)
    env = etl_env(None, pg_url, COMMUBO_BASE_URL=api.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                  COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "sync", "--config", str(fast_config), "--ids-file",
         str(ids_file(tmp_path, ["p-0", "q-0"])), "--follow-related", "--related-depth",
         "1000000000", "--json"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while api.total < 60 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["status"] == "interrupted"
    assert summary["requested"] == 2
    assert summary["related"] > 0
    assert summary["loaded"] == summary["related"] + 2
    assert len(stored(pg_url)[0]) == summary["loaded"]  # what was counted was committed


# -- the command -----------------------------------------------------------------------------


def test_etl_sync_follow_related_prints_related_in_its_json(route_server, pg_url, fast_config,
                                                          tmp_path):
    api = ChainApi(route_server, chain("a0", "a1", "a2", "a3"))
    env = etl_env(None, pg_url, COMMUBO_BASE_URL=api.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                  COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)
    path = str(ids_file(tmp_path, ["a0"]))

    proc = run_etl("sync", "--config", str(fast_config), "--ids-file", path, "--follow-related",
                   "--related-depth", "2", "--json", env=env)

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert {k: summary[k] for k in ("requested", "related", "loaded", "skipped")} == {
        "requested": 1, "related": 2, "loaded": 3, "skipped": 0}
    assert api.requests == Counter(a0=1, a1=1, a2=1)

    text = run_etl("sync", "--config", str(fast_config), "--ids-file", path, "--follow-related",
                   env=env)
    assert text.returncode == 0, text.stderr
    assert "1 requested (and 3 related), 4 loaded" in text.stdout


def test_related_depth_without_follow_related_is_refused(route_server, pg_url, fast_config,
                                                        tmp_path):
    api = ChainApi(route_server, chain("a0", "a1"))
    env = etl_env(None, pg_url, COMMUBO_BASE_URL=api.url, COMMUBO_TENANT_ID=DEFAULT_TENANT_ID,
                  COMMUBO_ACCESS_TOKEN=DEFAULT_ACCESS_TOKEN)

    proc = run_etl("sync", "--config", str(fast_config), "--ids-file",
                   str(ids_file(tmp_path, ["a0"])), "--related-depth", "2", env=env)

    assert proc.returncode == 2
    assert "--related-depth is for --follow-related" in proc.stderr
    assert api.total == 0

