"""
Concurrent users one game server process holds: authenticated, idle
connections, each pinging once a second, held in steps (500, 1,000, then
2,000 more a step) until the p99 round trip of those pings passes 50 ms or
errors appear (a connection refused, reset or closed, an error frame, a
ping unanswered when the next is due).  Connections held is the last step
with neither; a step whose p99 is over the limit is measured once more (the
cores are shared) and stops the ramp only if it is over again.  Reports the
connections held, the p99 at that step and the memory per connection (the
server's RSS growth over the idle server, divided by the connections); and,
in the same run under the same rule, what a bare Twisted server answering
the same PING frames with PONGs holds: the baseline.

The game server runs as configured for players (it pings a connection it
has not heard from for a second, which the generators answer, renews
presences and drops the idle); the baseline does nothing but answer pings, and its connections do
not authenticate (it has no users).  Load generators are separate
processes, at least one per core and at most 10,000 connections each, each
binding its connections to a loopback source address of its own (so no
address needs more ephemeral ports than the range holds, and the baseline's
closed connections keep none of the game's ports); each pings all of its
connections off one timer, from random phases.  Every process raises its
file-descriptor limit (past the hard limit where it may), which caps the
ramp: a server holds at most that limit less the descriptors it keeps for
itself.

Quick: up to 10,000 connections, 3 s a step; full: up to 30,000, 5 s a step.
Needs the local cluster (C{scripts/stack.sh up}).  The last line printed is
the JSON result (C{value}: connections held).

    python bench/ccu.py [--quick]
"""

import argparse
import collections
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import struct
import sys
import time

from twisted.internet import defer, protocol, stdio, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.protocols.basic import IntNStringReceiver

from bench.children import ROOT, UNLIMITED_GAME, CommandLines, forget_players, live_players, start, write_shares
from bench.game_ops import free_port, listening
from bench.raid_load import Schedule, cpu_seconds
from dreamraid.client import RemoteError
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather

STEP = 2000
# Steps below the first full one: a server that fails at 2,000 still says how many it holds.
SMALL_STEPS = (500, 1000)
P99_LIMIT_MS = 50
PER_GENERATOR = 10_000
# Descriptors a server keeps besides its clients' (listeners, Redis, stdio,
# epoll: about 20 for a game server), left free when the ramp is capped.
SERVER_FDS = 100
# Seconds between opening a step's connections and measuring it.
SETTLE = 1.0
# Each connection has at most one ping in flight, so all share one frame.
PING_REQUEST, AUTHENTICATE_REQUEST = 1, 2
PING_FRAME = packets.PING.encode(PING_REQUEST, {"nonce": 7})
_HEADER = struct.Struct("<HI")
_NONCE = struct.Struct("<I")
_PING_ID, _PONG_ID = struct.pack("<H", packets.PING.id), struct.pack("<H", packets.PONG.id)


def error_kind(exception):
    """How an error is counted: an error frame by its code, anything else by its class."""
    if isinstance(exception, RemoteError):
        return f"error frame {getattr(exception.code, 'name', exception.code)}"
    return type(exception).__name__


WANTED_FDS = 65536


def raise_fd_limit():
    """
    Raise this process's open-file limit (and so its children's) to
    WANTED_FDS, past the hard limit where allowed (as root); the limit.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, WANTED_FDS), max(hard, WANTED_FDS)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Window:
    """
    What a generator heard since it last answered: the round trips of the
    pings sent while it measures, in 0.1 ms buckets, and errors by kind.
    """

    def __init__(self):
        self.started = None  # monotonic time the measured window opened, or None
        self.round_trips = collections.Counter()
        self.errors = collections.Counter()

    def round_trip(self, sent_at, now):
        if self.started is not None and sent_at >= self.started:
            self.round_trips[int((now - sent_at) * 10_000)] += 1

    def answer(self):
        """Round trips and errors so far, forgotten once told."""
        told = {"round_trips": self.round_trips, "errors": self.errors}
        self.round_trips, self.errors = collections.Counter(), collections.Counter()
        return told


class Heartbeat(IntNStringReceiver):
    """
    One idle player's connection: authenticates if given a token, answers
    the server's pings, and pings when its schedule says, one ping in flight
    at most: one still unanswered when the next is due is a timeout.
    """

    structFormat = "<H"
    prefixLength = 2
    MAX_LENGTH = packets.MAX_FRAME_LENGTH

    def __init__(self, token, window):
        self.token, self.window = token, window
        self.ready = defer.Deferred()
        self.held = False  # counted among the generator's connections
        self._sent_at = None  # of the ping in flight
        self._late = False

    def connectionMade(self):
        if self.token is None:
            self.ready.callback(self)
        else:
            self.transport.write(packets.AUTHENTICATE.encode(AUTHENTICATE_REQUEST, {"token": self.token}))

    def connectionLost(self, reason):
        self.connected = False
        if not self.ready.called:
            self.ready.errback(reason)
        elif self.held:
            self.window.errors["connection lost"] += 1

    def ping(self):
        if not self.connected:
            return
        if self._sent_at is not None:
            if not self._late:
                self.window.errors["ping timeout"] += 1
                self._late = True
            return
        self._sent_at = time.monotonic()
        self.transport.write(PING_FRAME)

    def close_window(self, now):
        """The measured window closes: a ping of it still in flight counts as answered now (at the least)."""
        if self._sent_at is not None:
            self.window.round_trip(self._sent_at, now)

    def stringReceived(self, payload):
        message_id, request_id = _HEADER.unpack_from(payload)
        if message_id == packets.PONG.id and request_id == PING_REQUEST and self._sent_at is not None:
            self.window.round_trip(self._sent_at, time.monotonic())
            self._sent_at, self._late = None, False
        elif message_id == packets.PING.id and request_id == 0:
            self.transport.write(packets.PONG.encode(0, {"nonce": _NONCE.unpack_from(payload, _HEADER.size)[0]}))
        elif message_id == packets.AUTHENTICATED.id and not self.ready.called:
            self.ready.callback(self)
        elif message_id == packets.ERROR.id:
            body = packets.decode_payload(payload).body
            if self.ready.called:
                self.window.errors[error_kind(RemoteError(body["code"], body["detail"]))] += 1
            else:
                self.ready.errback(RemoteError(body["code"], body["detail"]))


class Heartbeats:
    """A load generator's connections to the server under test, all pinging once a second off one schedule."""

    OPENING_AT_ONCE = 50
    READY_TIMEOUT = 10

    def __init__(self, reactor, endpoint, tokens):
        self.reactor, self.endpoint, self.tokens = reactor, endpoint, tokens
        self.window = Window()
        self.connections = []
        self._opened = 0  # connections tried so far: the next one takes the next token
        self.schedule = Schedule()
        self.schedule.start()

    async def hold(self, count):
        """Open connections until C{count} were tried; how many are held and the errors since the last answer."""
        wanted = range(self._opened, count)
        self._opened = max(count, self._opened)
        await gather([self._open(wanted[i::self.OPENING_AT_ONCE]) for i in range(self.OPENING_AT_ONCE)])
        return {"held": len(self.connections), **self.window.answer()}

    async def _open(self, indices):
        for index in indices:
            connection = Heartbeat(self.tokens[index] if self.tokens else None, self.window)
            try:
                await connectProtocol(self.endpoint, connection)
                await connection.ready.addTimeout(self.READY_TIMEOUT, self.reactor)
            except Exception as e:
                self.window.errors[error_kind(e)] += 1
                if connection.transport is not None:
                    connection.transport.abortConnection()
            else:
                connection.held = True
                self.connections.append(connection)
                self.schedule.add(1, connection.ping)

    async def measure(self, seconds):
        """Round trips of the pings sent in the next C{seconds}, the errors since the last answer, CPU used."""
        cpu, self.window.started = time.process_time(), time.monotonic()
        await task.deferLater(self.reactor, seconds, lambda: None)
        now = time.monotonic()
        for connection in self.connections:
            connection.close_window(now)
        self.window.started = None
        used = time.process_time() - cpu
        return {**self.window.answer(), "cpu_percent": round(used / seconds * 100)}


class Commands(CommandLines):
    """A generator's commands: C{hold N} and C{measure SECONDS}."""

    def __init__(self, heartbeats):
        self.heartbeats = heartbeats

    def lineReceived(self, line):
        word, argument = line.decode().split()
        if word == "hold":
            answer = self.heartbeats.hold(int(argument))
        else:
            answer = self.heartbeats.measure(float(argument))
        self.answer(defer.ensureDeferred(answer))


def generate(reactor, arguments):
    """A load generator process: takes its commands on standard input until it closes."""
    # A collection would stall the generator for tens of milliseconds and
    # show up as the server's latency; it makes little cyclic garbage.
    gc.disable()
    tokens = json.load(open(arguments.tokens)) if arguments.tokens else None
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", arguments.port, timeout=10, bindAddress=(arguments.source, 0))
    stdio.StandardIO(Commands(Heartbeats(reactor, endpoint, tokens)), reactor=reactor)
    return defer.Deferred()


class PingAnswers(IntNStringReceiver):
    """The baseline server's connection: each PING frame answered with its PONG (same request id and nonce)."""

    structFormat = "<H"
    prefixLength = 2
    MAX_LENGTH = packets.MAX_FRAME_LENGTH

    def stringReceived(self, payload):
        if payload[:2] == _PING_ID:
            self.sendString(_PONG_ID + payload[2:])


def echo_server(reactor, port):
    """A bare Twisted server that answers pings."""
    factory = protocol.Factory.forProtocol(PingAnswers)
    factory.noisy = False
    return TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory).addCallback(
        lambda _: defer.Deferred())


class Generator(protocol.ProcessProtocol):
    """A load generator process as its parent sees it: each command written gets one JSON answer."""

    def __init__(self):
        self.exited = defer.Deferred()
        self._answers = []
        self._buffer = b""

    def ask(self, command):
        answer = defer.Deferred()
        self._answers.append(answer)
        self.transport.write(command.encode() + b"\n")
        return answer

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._answers.pop(0).callback(json.loads(line))

    def errReceived(self, data):
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason):
        for answer in self._answers:
            answer.errback(RuntimeError(f"a load generator ended early: {reason.value}"))
        self.exited.callback(None)


def start_generator(reactor, *args):
    generator = Generator()
    reactor.spawnProcess(generator, sys.executable, [sys.executable, os.path.abspath(__file__), "--generate", *args],
                         env=None, path=ROOT)
    return generator


def rss_bytes(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(round_trips, fraction):
    """The upper edge, in ms, of the 0.1 ms bucket holding the C{fraction} percentile."""
    total = sum(round_trips.values())
    rank, seen = min(total - 1, int(fraction * total)), 0
    for bucket in sorted(round_trips):
        seen += round_trips[bucket]
        if seen > rank:
            return (bucket + 1) / 10
    return None


def merged(answers):
    """The round trips and errors of several generators' answers, together."""
    round_trips, errors = collections.Counter(), collections.Counter()
    for told in answers:
        round_trips.update({int(k): v for k, v in told["round_trips"].items()})
        errors.update(told["errors"])
    return round_trips, errors


async def measure(generators, server_pid, seconds):
    """One window of every generator: C{(round trips, errors, server CPU %, each generator's CPU %)}."""
    cpu, started = cpu_seconds(server_pid), time.monotonic()
    windows = await gather([g.ask(f"measure {seconds}") for g in generators])
    cpu = (cpu_seconds(server_pid) - cpu) / (time.monotonic() - started)
    return (*merged(windows), round(cpu * 100), [told["cpu_percent"] for told in windows])


def within_limit(p99):
    return p99 is not None and p99 <= P99_LIMIT_MS


def passes(step):
    return not step["errors"] and within_limit(step["p99_ms"])


async def ramp(reactor, server_pid, generators, steps, seconds):
    """Hold each step's connections, measuring each; the steps measured, the last the first that failed if one did."""
    idle_rss = rss_bytes(server_pid)
    measured = []
    for target in steps:
        # Generator g holds the connections numbered g, g + n, g + 2n, ... below the target.
        held = await gather([g.ask(f"hold {len(range(i, target, len(generators)))}")
                             for i, g in enumerate(generators)])
        connections = sum(told["held"] for told in held)
        _, errors = merged(held)
        await task.deferLater(reactor, SETTLE, lambda: None)
        round_trips, window_errors, cpu, generators_cpu = await measure(generators, server_pid, seconds)
        first_p99 = percentile(round_trips, 0.99)
        if not errors and not window_errors and not within_limit(first_p99):
            # The cores are shared with whatever else runs: a p99 over the
            # limit is measured once more before the ramp stops on it.
            round_trips, window_errors, cpu, generators_cpu = await measure(generators, server_pid, seconds)
        errors.update(window_errors)
        rss = rss_bytes(server_pid)
        step = {"connections": connections, "pings": sum(round_trips.values()),
                "p50_ms": percentile(round_trips, 0.5), "p99_ms": percentile(round_trips, 0.99),
                "first_p99_ms": first_p99, "errors": dict(errors), "server_rss_bytes": rss,
                "memory_per_connection_bytes": round((rss - idle_rss) / connections) if connections else None,
                "server_cpu_percent": cpu, "generators_cpu_percent": generators_cpu}
        print(json.dumps(step), flush=True)
        measured.append(step)
        if not passes(step):
            break
    for generator in generators:
        generator.transport.closeStdin()
    await gather([generator.exited for generator in generators])
    return measured


def verdict(measured):
    """C{(the last step that passed or None, why the ramp stopped)}."""
    last = measured[-1]
    if passes(last):
        return last, "reached the ramp's cap"
    good = measured[-2] if len(measured) > 1 else None
    if last["errors"]:
        return good, f"errors at {last['connections']}: {last['errors']}"
    return good, f"p99 {last['p99_ms']} ms at {last['connections']}"


async def main(reactor, quick, fd_limit):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    most = 10_000 if quick else 30_000
    seconds = 3.0 if quick else 5.0
    cap = min(most, fd_limit - SERVER_FDS)
    steps = [s for s in SMALL_STEPS if s < cap] + list(range(STEP, cap + 1, STEP))
    if not steps or steps[-1] != cap:
        steps.append(cap)
    generator_count = max(len(os.sched_getaffinity(0)), math.ceil(cap / PER_GENERATOR))
    router, work, public, users, issued = await live_players(reactor, settings, cap, {})
    shares = write_shares(work, "tokens", [t.token for t in issued], generator_count)

    echo_port, game_port = free_port(), free_port()
    echo = start(reactor, os.path.abspath(__file__), "--echo", str(echo_port), reports=False)
    await listening(reactor, echo_port)
    baseline = await ramp(reactor, echo.transport.pid, [
        start_generator(reactor, "--port", str(echo_port), "--source", f"127.0.1.{i + 1}")
        for i in range(generator_count)], steps, seconds)
    echo.transport.signalProcess("TERM")
    await echo.exited

    prefix, mm = f"bench{random.getrandbits(32):x}", f"benchmm{random.getrandbits(32):x}"
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    game = start(reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME, "--game-listen",
                 f"tcp:{game_port}:interface=127.0.0.1", "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                 "--game-udp-port", "0", "--tokens-public-key", public, "--sync-prefix", prefix,
                 "--raids-matchmaking-prefix", mm, "--game-ping-interval", "1", "--game-idle-timeout", "15",
                 executable=twistd, reports=False)
    await listening(reactor, game_port)
    game_fds = len(os.listdir(f"/proc/{game.transport.pid}/fd"))
    measured = await ramp(reactor, game.transport.pid, [
        start_generator(reactor, "--port", str(game_port), "--source", f"127.0.2.{i + 1}", "--tokens", share)
        for i, share in enumerate(shares)], steps, seconds)
    game.transport.signalProcess("TERM")
    await game.exited
    await forget_players(reactor, router, settings, users, prefix, mm)
    shutil.rmtree(work)

    good, stopped = verdict(measured)
    baseline_good, baseline_stopped = verdict(baseline)
    held, baseline_held = (good or {}).get("connections", 0), (baseline_good or {}).get("connections", 0)
    print(json.dumps({"steps": steps, "seconds_a_step": seconds, "generators": generator_count, "fd_limit": fd_limit,
                      "game_server_fds_at_start": game_fds, "game": measured, "echo": baseline}, indent=1))
    print(json.dumps({
        "metric": "game_server_connections_held",
        "value": held,
        "baseline": baseline_held,
        "ratio": round(held / baseline_held, 3) if baseline_held else None,
        "unit": f"authenticated idle connections with 1 s heartbeats, p99 round trip <= {P99_LIMIT_MS} ms, no errors",
        "p99_ms": (good or {}).get("p99_ms"),
        "baseline_p99_ms": (baseline_good or {}).get("p99_ms"),
        "memory_per_connection_bytes": (good or {}).get("memory_per_connection_bytes"),
        "baseline_memory_per_connection_bytes": (baseline_good or {}).get("memory_per_connection_bytes"),
        "server_cpu_percent": (good or {}).get("server_cpu_percent"),
        "stopped": stopped,
        "baseline_stopped": baseline_stopped,
        "ramp_cap": cap,
        "ramp_capped_by": "quick mode" if quick and cap == most else "file-descriptor limit" if cap < most else None,
        "fd_limit": fd_limit,
        "target": 20000,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="up to 10,000 connections, 3 s a step")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    fd_limit = raise_fd_limit()
    if arguments.echo:
        task.react(lambda reactor: echo_server(reactor, arguments.echo))
    elif arguments.generate:
        task.react(lambda reactor: generate(reactor, arguments))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick, fd_limit)))
