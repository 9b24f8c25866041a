"""How long flushing expired sessions holds the reactor, and what a cached session costs in memory.

Each population size runs in its own subprocess (``python -m
bench.stall --sessions N``) with its own reactor, so that
RSS deltas start from a clean heap. Handshakes are far too slow to fill a
cache with 100,000 sessions, so one real server session is made in memory and
copied N times with distinct session IDs straight into the ``SSL_CTX`` cache.
A 1 ms ``LoopingCall`` runs throughout; its worst lateness is the stall.

Scenarios, each on a fresh context:

* ``scheduled``: ``SessionCache(flush_interval=...)``'s own loop flushing N
  sessions created at a steady 1,000 per second, caught up from before the
  first of them expired (as a loop running all along would have flushed them).
* ``sliced``: a prototype of a flush that advances one second of expiry per
  reactor turn (OpenSSL 3 keeps the cache in expiry order, so each step only
  touches what expired in that second); sessions created at a steady 1,000 per
  second, as a busy single process would.
* ``auto``: OpenSSL's automatic flush, run from inside the 255th handshake, with
  N expired sessions in a cache in plain ``server`` mode.
* ``store``: the memory store's ``expire()`` over N sealed records, all expired,
  a bounded batch per reactor turn as the flush loop runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted_sesscache.sharing import STORE_EXPIRY_BUDGET

PROBE_INTERVAL = 0.001
CREATION_RATE = 1000  # sessions per second for the "sliced" population
LIFETIME = 300


# -- in-process pieces ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Handshaker:
    """Full TLS 1.2 handshakes between two in-memory pyOpenSSL connections (no sockets)."""

    def __init__(self, server_context: Any) -> None:
        from OpenSSL import SSL

        self.SSL = SSL
        self.server_context = server_context
        self.client_context = SSL.Context(SSL.TLS_METHOD)
        self.client_context.set_max_proto_version(SSL.TLS1_2_VERSION)

    def once(self) -> Any:
        """One handshake; the server-side connection, its session in the cache."""
        SSL = self.SSL
        server = SSL.Connection(self.server_context, None)
        server.set_accept_state()
        client = SSL.Connection(self.client_context, None)
        client.set_connect_state()
        done = [False, False]
        for _ in range(20):
            for i, side in enumerate((client, server)):
                if not done[i]:
                    try:
                        side.do_handshake()
                        done[i] = True
                    except SSL.WantReadError:
                        pass
            for source, sink in ((client, server), (server, client)):
                try:
                    sink.bio_write(source.bio_read(65536))
                except SSL.WantReadError:
                    pass
            if all(done):
                return server
        raise RuntimeError("in-memory handshake did not finish")


class Probe:
    """A 1 ms LoopingCall that records how late each call ran."""

    def __init__(self, clock: Any, interval: float = PROBE_INTERVAL) -> None:
        from twisted.internet.task import LoopingCall

        self.clock = clock
        self.interval = interval
        self.loop = LoopingCall.withCount(self._tick)
        self.loop.clock = clock
        self.worst = 0.0
        self._ticks = 0

    def start(self) -> None:
        self.loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def _tick(self, count: int) -> None:
        due = (self.loop.starttime or 0.0) + (self._ticks + 1) * self.interval  # the first call this one stands for
        self.worst = max(self.worst, self.clock.seconds() - due)
        self._ticks += count

    def take(self) -> float:
        """Worst lateness (ms) since the last take."""
        worst, self.worst = self.worst, 0.0
        return worst * 1000


def _sleep(clock: Any, seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(clock, seconds, lambda: None)


def _certificate_options(directory: Path) -> Any:
    from twisted_sesscache.certs import certificate_options, generate_self_signed

    cert, key = generate_self_signed(directory, key_type="ecdsa")
    return certificate_options(cert, key)


def _fresh(options_dir: Path, **cache_options: Any) -> tuple[Any, Any]:
    """A SessionCache with no size limit, and the server context it manages."""
    from twisted_sesscache import SessionCache

    cache = SessionCache(size=0, **cache_options)
    creator = cache.server_context_factory(_certificate_options(options_dir))
    return cache, creator.getContext()


def run_scenarios(count: int, workdir: Path) -> Any:
    """All scenarios for one population size, on the running reactor; a Deferred of the results."""
    from twisted.internet import defer, reactor

    from twisted_sesscache import RUNTIME

    from bench.fill import fill_cache

    results: dict[str, Any] = {"sessions": count}

    @defer.inlineCallbacks
    def scenarios() -> Any:
        now = int(time.time())

        def expired_at_once(i: int) -> int:
            return now - 2 * LIFETIME

        # The template: a real server session from a real handshake.
        cache, context = _fresh(workdir / "a", flush_interval=0.3)
        template = RUNTIME.session_to_der(Handshaker(context).once().get_session())
        results["der_bytes"] = len(template)

        # Memory, on the first fill of a clean heap.
        gc.collect()
        before = rss_bytes()
        steady_first = now - 2 * LIFETIME - count // CREATION_RATE
        fill_cache(context, template, count, lambda i: steady_first + i // CREATION_RATE, LIFETIME)
        results["rss_per_session"] = (rss_bytes() - before) / count

        # scheduled: today's SessionCache flush loop.
        probe = Probe(reactor)
        probe.start()
        timings: list[float] = []
        flush_slice = cache.flushing.flush_until  # what each reactor turn of the loop calls

        def timed_slice(moment: int) -> int:
            started = time.perf_counter()
            try:
                return flush_slice(moment)
            finally:
                timings.append((time.perf_counter() - started) * 1000)

        cache.flushing.flush_until = timed_slice
        yield _sleep(reactor, 0.2)
        baseline = probe.take()
        # As if the loop had been running all along: it catches up from before the
        # first of these sessions expired, one second of expiry per reactor turn.
        # (Sessions that expired before a cache starts go in its first slice.)
        cache.flushing._flushed_until = steady_first + LIFETIME - 1
        cache.start(reactor)
        deadline = time.monotonic() + 10
        while cache.stats()["flushed"] < count and time.monotonic() < deadline:
            yield _sleep(reactor, 0.1)
        cache.stop()
        results["scheduled"] = {
            "worst_ms": probe.take(),
            "baseline_ms": baseline,
            "flush_ms": max(timings, default=0.0),
            "removed": cache.stats()["flushed"],
        }
        probe.stop()

        # sliced: one second of expiry per reactor turn, steady creation rate.
        cache, context = _fresh(workdir / "b")
        first = now - 2 * LIFETIME - count // CREATION_RATE
        fill_cache(context, template, count, lambda i: first + i // CREATION_RATE, LIFETIME)
        probe = Probe(reactor)
        probe.start()
        yield _sleep(reactor, 0.2)
        baseline = probe.take()
        steps = []
        started = time.perf_counter()
        for moment in range(first + LIFETIME, now + 2):
            step = time.perf_counter()
            cache.flush(moment)
            steps.append((time.perf_counter() - step) * 1000)
            yield _sleep(reactor, 0)
        results["sliced"] = {
            "worst_ms": probe.take(),
            "baseline_ms": baseline,
            "flush_ms": max(steps, default=0.0),
            "total_s": time.perf_counter() - started,
            "steps": len(steps),
            "removed": cache.stats()["flushed"],
        }
        probe.stop()

        # auto: OpenSSL's own flush, from inside every 255th handshake. No reactor flush
        # (flush_interval=0), or no-auto-clear would be on and OpenSSL would never flush.
        cache, context = _fresh(workdir / "c", flush_interval=0)
        fill_cache(context, template, count, expired_at_once, LIFETIME)
        shaker = Handshaker(context)
        probe = Probe(reactor)
        probe.start()
        yield _sleep(reactor, 0.2)
        baseline = probe.take()
        durations = []
        handshakes = 0
        while cache.stats()["number"] >= count and handshakes < 600:
            step = time.perf_counter()
            shaker.once()
            durations.append((time.perf_counter() - step) * 1000)
            handshakes += 1
            yield _sleep(reactor, 0)
        durations.sort()
        results["auto"] = {
            "worst_ms": probe.take(),
            "baseline_ms": baseline,
            "flush_ms": durations[-1] - durations[len(durations) // 2] if durations else 0.0,
            "handshakes": handshakes,
            # Each handshake's own session leaves the cache when its connection is
            # freed without close_notify, so what is left is what the flush kept.
            "left": cache.stats()["number"],
        }
        probe.stop()

        # store: the memory store's expire(), entries sealed as the external cache seals them.
        try:
            results["store"] = yield store_scenario(count, template, reactor)
        except Exception as error:  # the store's API is young; report rather than fail
            results["store"] = {"unavailable": f"{type(error).__name__}: {error}"}
        return results

    return scenarios()


def store_scenario(count: int, template: bytes, clock: Any) -> Any:
    """Fill a MemoryStore with ``count`` sealed records, expire them all at once, watch the timer."""
    from twisted.internet import defer

    from twisted_sesscache.server.external import SESSION_KIND, ExternalSessions
    from twisted_sesscache.sealing import Sealer
    from twisted_sesscache.stores.memory import MemoryStore

    @defer.inlineCallbacks
    def run() -> Any:
        sealer = Sealer([os.urandom(32)])
        context = b"0123456789abcdef0123456789abcdef"
        moment = [0.0]
        store = MemoryStore(max_entries=count, clock=lambda: moment[0])
        gc.collect()
        before = rss_bytes()
        for session_id in (os.urandom(32) for _ in range(count)):
            record = sealer.seal(template, kind=SESSION_KIND, context=context)
            store.set(ExternalSessions.key(context, session_id), record, LIFETIME)
        result: dict[str, Any] = {"rss_per_entry": (rss_bytes() - before) / count, "record_bytes": len(record)}
        probe = Probe(clock)
        probe.start()
        yield _sleep(clock, 0.2)
        result["baseline_ms"] = probe.take()
        moment[0] = 2.0 * LIFETIME
        yield _sleep(clock, 0)
        # As SessionCache's flush loop does it: a bounded batch per reactor turn.
        removed, longest = 0, 0.0
        while True:
            started = time.perf_counter()
            batch = store.expire(budget=STORE_EXPIRY_BUDGET)
            longest = max(longest, (time.perf_counter() - started) * 1000)
            removed += batch
            if not batch:
                break
            yield _sleep(clock, 0)
        result["removed"], result["flush_ms"] = removed, longest
        yield _sleep(clock, 0.1)
        result["worst_ms"] = probe.take()
        probe.stop()
        return result

    return run()


def child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One population size; JSON on stdout.")
    parser.add_argument("--sessions", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor as installed

    reactor: Any = installed
    outcome: dict[str, Any] = {}

    def finish(result: Any) -> None:
        if isinstance(result, dict):
            outcome.update(result)
        else:
            outcome["error"] = result.getErrorMessage()
            result.printTraceback(file=sys.stderr)
        reactor.stop()

    with tempfile.TemporaryDirectory(prefix="sesscache-stall-") as workdir:
        reactor.callWhenRunning(lambda: run_scenarios(args.sessions, Path(workdir)).addBoth(finish))
        reactor.run(installSignalHandlers=False)
    print(json.dumps(outcome))


# -- parent side -------------------------------------------------------------------------


SCENARIOS = ("scheduled", "sliced", "auto", "store")


def measure(sizes: list[int], repeats: int = 1, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Each population size in fresh subprocesses, ``repeats`` times; a result or an "unavailable" reason each.

    A flush is a fixed amount of work, and anything else running on the
    machine can only make the timer later, so for each scenario the
    least-disturbed repeat (the lowest worst lateness) is kept.
    """
    from twisted_sesscache import RUNTIME

    if not RUNTIME.shared:
        reason = f"needs the shared-OpenSSL runtime (this is {RUNTIME.name})"
        return [{"sessions": n, "unavailable": reason} for n in sizes]
    results = []
    for count in sizes:
        sys.stderr.write(f"flush stall and memory, {count:,} sessions, {repeats} run(s)\n")
        runs = [_one_child(count, timeout) for _ in range(repeats)]
        good = [run for run in runs if "unavailable" not in run]
        if not good:
            results.append(runs[0])
            continue
        merged = dict(good[0])
        for scenario in SCENARIOS:
            measured = [run[scenario] for run in good if "worst_ms" in run.get(scenario, {})]
            if measured:
                merged[scenario] = {**min(measured, key=lambda m: m["worst_ms"]), "repeats": len(measured)}
        results.append(merged)
    return results


def _one_child(count: int, timeout: float) -> dict[str, Any]:
    from bench.servers import child_environment

    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.stall", "--sessions", str(count)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"sessions": count, "unavailable": f"timed out after {timeout:.0f} s"}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join(done.stderr.strip().splitlines()[-4:])
        result = {"unavailable": f"exited with {done.returncode}: {tail}"}
    if "error" in result:
        result = {"unavailable": result["error"]}
    return {"sessions": count, **result}


if __name__ == "__main__":
    child_main()
