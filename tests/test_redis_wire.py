"""The Redis store's own wire format and its one-timer deadlines, without a Redis server."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock

from tests.support import ReactorThread
from twisted_sesscache.exceptions import StoreUnavailable

pytest.importorskip("txredisapi")

from txredisapi import InvalidResponse, ResponseError  # noqa: E402

from twisted_sesscache.stores.redis_deadlines import BUSY_CAP, Deadlines  # noqa: E402
from twisted_sesscache.stores import redis_wire  # noqa: E402
from twisted_sesscache.stores.redis_wire import MAX_BULK, ReplyReader, encode_command  # noqa: E402


def test_commands_are_encoded_as_bulk_strings() -> None:
    assert encode_command("SET", b"k\r\n", b"", "EX", 300) == b"*5\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$0\r\n\r\n$2\r\nEX\r\n$3\r\n300\r\n"
    assert encode_command("GET", bytearray(b"\xff")) == b"*2\r\n$3\r\nGET\r\n$1\r\n\xff\r\n"


def test_every_kind_of_reply() -> None:
    reader = ReplyReader()
    replies = reader.feed(b"$3\r\na\r\n\r\n$-1\r\n+OK\r\n:42\r\n-WRONGTYPE no\r\n*-1\r\n*0\r\n"
                          b"*3\r\n$6\r\nmaster\r\n:7\r\n*1\r\n*2\r\n$9\r\n127.0.0.1\r\n:1\r\n")
    assert replies[:4] == [b"a\r\n", None, "OK", 42]
    assert isinstance(replies[4], ResponseError) and str(replies[4]) == "WRONGTYPE no"
    assert replies[5:] == [None, [], [b"master", 7, [[b"127.0.0.1", 1]]]]


@given(st.lists(st.one_of(st.binary(max_size=300), st.none(), st.integers(-(2**40), 2**40)), max_size=20),
       st.lists(st.integers(1, 50), max_size=30))
def test_replies_split_anywhere_come_out_whole_and_in_order(values: list[Any], cuts: list[int]) -> None:
    wire = b"".join(b"$-1\r\n" if v is None else b":%d\r\n" % v if isinstance(v, int) else b"$%d\r\n%s\r\n" % (len(v), v)
                    for v in values)
    reader, out, position = ReplyReader(), [], 0
    for cut in cuts:
        out += reader.feed(wire[position : position + cut])
        position += cut
    out += reader.feed(wire[position:])
    assert out == values


@pytest.mark.parametrize("wire", [b"?what\r\n", b":x\r\n", b"$%d\r\n" % (MAX_BULK + 1), b"*1\r\n" * 20, b"+" * (70 * 1024)])
def test_malformed_or_oversized_replies_are_refused(wire: bytes) -> None:
    with pytest.raises(InvalidResponse):
        ReplyReader().feed(wire)


def test_a_bulk_reply_arriving_a_byte_at_a_time_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear time: the held bytes are not re-read per segment, whatever Redis's segmentation."""
    calls = []
    parse = redis_wire._parse

    def counted(*args: Any) -> Any:
        calls.append(args[1])
        return parse(*args)

    monkeypatch.setattr(redis_wire, "_parse", counted)
    record = bytes(range(256)) * 40
    wire = b"$%d\r\n%s\r\n+OK\r\n" % (len(record), record)
    reader, out = ReplyReader(), []
    for index in range(len(wire)):
        out += reader.feed(wire[index : index + 1])
    assert out == [record, "OK"]
    assert len(calls) < 20, len(calls)  # header bytes, then once for the whole bulk, then the status


@pytest.mark.parametrize("wire", [b"*%d\r\n" % (redis_wire.MAX_ITEMS + 1), b"+" * (redis_wire.MAX_LINE + 3)])
def test_replies_beyond_the_bounds_are_refused_before_they_arrive(wire: bytes) -> None:
    with pytest.raises(InvalidResponse):
        ReplyReader().feed(wire)


class Link:
    """What Deadlines asks of a RedisLink: when Redis last answered, and whether bytes wait unread."""

    def __init__(self) -> None:
        self.last_reply = -1.0  # never
        self.waiting = False

    def answering(self, since: float) -> bool:
        return self.last_reply >= since or self.waiting


def failed_with_timeout(request: Deferred[Any]) -> bool:
    outcome: list[Any] = []
    request.addErrback(outcome.append)
    return bool(outcome) and outcome[0].check(TimeoutError) is not None


def test_a_silent_redis_times_requests_out_by_their_own_budget_on_one_timer() -> None:
    clock, link = Clock(), Link()
    deadlines = Deadlines(clock, link)  # type: ignore[arg-type]
    slow, quick, answered = Deferred[Any](), Deferred[Any](), Deferred[Any]()
    deadlines.watch(slow, 1.0)
    deadlines.watch(quick, 0.05)
    deadlines.watch(answered, 0.05)
    assert len(clock.getDelayedCalls()) == 1
    answered.callback(b"record")
    clock.advance(0.05)
    clock.advance(0)
    assert failed_with_timeout(quick) and not slow.called
    clock.advance(0.95)
    clock.advance(0)
    assert failed_with_timeout(slow)
    assert clock.getDelayedCalls() == []


def test_a_redis_that_answers_gets_more_time_up_to_the_cap() -> None:
    clock, link = Clock(), Link()
    deadlines = Deadlines(clock, link)  # type: ignore[arg-type]
    request = Deferred[Any]()
    deadlines.watch(request, 0.1)
    link.waiting = True  # its bytes wait in the socket: this process is busy, Redis is not late
    for _ in range(int(BUSY_CAP / 0.1) - 1):
        clock.advance(0.1)
        clock.advance(0)
        assert not request.called
    for _ in range(3):
        clock.advance(0.1)
        clock.advance(0)
    assert failed_with_timeout(request)


def test_a_late_reactor_is_not_blamed_on_redis() -> None:
    clock, link = Clock(), Link()
    deadlines = Deadlines(clock, link)  # type: ignore[arg-type]
    request = Deferred[Any]()
    deadlines.watch(request, 0.1)
    clock.advance(0.5)  # the reactor was busy for five budgets
    clock.advance(0)
    assert not request.called
    clock.advance(0.1)
    clock.advance(0)
    assert failed_with_timeout(request)
    deadlines.stop()


class FakeRedis(Protocol):
    """Answers PING and GET; a GET gets a malformed reply while ``state["garbage"]`` is set."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.requests = ReplyReader()  # a request is a RESP array of bulk strings

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        for command in self.requests.feed(data):
            if command[0] == b"GET":
                self.state["gets_by_connection"][id(self)] = self.state["gets_by_connection"].get(id(self), 0) + 1
                self.transport.write(b"?not RESP\r\n" if self.state["garbage"] else b"$5\r\nvalue\r\n")
            else:
                self.transport.write(b"+PONG\r\n")


def test_requests_share_one_connection_and_a_malformed_reply_only_costs_a_reconnect(
    reactor_thread: ReactorThread,
) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults

    from twisted_sesscache.stores.redis import RedisStore

    state: dict[str, Any] = {"garbage": False, "gets_by_connection": {}}
    factory: Any = ServerFactory.forProtocol(lambda: FakeRedis(state))
    listen: Any = reactor.listenTCP
    listener: Any = reactor_thread.call(listen, 0, factory, interface="127.0.0.1")
    store = reactor_thread.call(RedisStore, port=listener.getHost().port, poolsize=2)
    try:
        assert reactor_thread.call(store.get, b"k") == b"value"
        reactor_thread.call(lambda: gatherResults([store.get(b"k%d" % i) for i in range(20)]))
        assert sorted(state["gets_by_connection"].values()) == [21]  # both connected; one carried them all
        state["garbage"] = True
        with pytest.raises(StoreUnavailable):
            reactor_thread.call(store.get, b"k")
        state["garbage"] = False
        deadline = time.monotonic() + 10
        while (reactor_thread.call(lambda: store.get(b"k").addErrback(lambda _: None)) != b"value"
               or reactor_thread.call(store.stats)["store_reconnects"] < 1):  # the dropped one came back
            assert time.monotonic() < deadline, "the store did not come back after a malformed reply"
            time.sleep(0.05)
        stats = reactor_thread.call(store.stats)
        assert stats["store_errors"] >= 1 and stats["store_connected"] == 1
    finally:
        reactor_thread.call(store.close)
        reactor_thread.call(listener.stopListening)
