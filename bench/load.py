"""
Concurrent users (CCU) one game server holds, and how fast it serves them:
ramps to N authenticated connections over the ramp, holds them for the
hold, each connection sending a request mix (ping, list_inventory,
hunt, move_item, in turn from a random place in the mix) at the set rate
from a random phase.  Reports the connections held through the hold, the
requests answered per second, the latency from a request sent to its answer
(p50, p90, p99, over the hold), and errors and refusals over the whole run.

- A refusal is an error reply of the game's rules (a hunt inside its 500 ms
  cooldown is C{HUNT_COOLDOWN}), counted by the code's name; it is an answer
  like any other, so it counts in the rate and the latencies.
- An error is what kept a connection from being held or a request from an
  answer: C{connect} (TCP), C{auth:CODE} (authentication refused or timed
  out), C{closed:CODE} (a held connection closed, with the server's reason if
  it gave one), C{timeout} (no answer within 10 s), C{malformed_reply}, and
  C{reply:CODE} for error replies that say the server failed (codes below the
  token codes: C{INTERNAL_ERROR}, C{UNAVAILABLE}, ...).

The load comes from worker processes (one per core unless C{--workers}), so
that the generator is not the bottleneck.  Each connects its share of the
users at an even pace over the ramp, answers the server's pings and drives
all its connections from one timer; every second it reports its counts and a
latency histogram (2% buckets) to this process on a line of its standard
output.  This process shows them as they come (one updating line on a
terminal), then a summary; the last line printed is the JSON result.

Where the users come from:

- By default (C{--start}) this process starts its own game server (twistd
  C{dreamraid-game} on free ports, with its own sync and matchmaking key
  prefixes) and makes the users live in Redis itself, with login tokens
  signed by a fresh key pair that only that server trusts; each user owns
  two stacks in the materials tab, so every move swaps them.  Needs only the
  local stack (C{scripts/stack.sh up}); the Redis keys it made are deleted at
  the end.
- C{--session HOST:PORT} targets a running system (C{make run}: the session
  server is 127.0.0.1:9091): the users log in through its session server as
  players do, as accounts C{load_0}, C{load_1}, ... (registered on first
  use, kept for the next run), and connect to the game server it names.
  Registering and logging in cost a password hash each on the session
  server, so thousands of users take minutes before the ramp starts (the
  tokens must still be valid when it ends: 600 s by default).  New
  accounts own nothing: their moves are refused C{EMPTY_SLOT} until a hunt
  drops ore.  The system's own sync writes them back and unloads them; two
  runs at once log each other's users out.

    python bench/load.py --quick
    python bench/load.py --connections N [--workers W] [--ramp S] [--hold S]
                         [--rate R] [--start | --session HOST:PORT]
"""

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict

from twisted.internet import defer, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from bench.children import ROOT, UNLIMITED_GAME, Child, forget_players, live_players, say, start
from bench.game_ops import free_port, listening
from bench.raid_load import Schedule, cpu_seconds
from dreamraid.client.connection import RemoteError, connect
from dreamraid.config import load_settings
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import Item

MATERIALS_TAB = 2
# Two stacks of different materials in slots 0 and 1: a move between them always swaps.
ITEMS = {(MATERIALS_TAB, 0): Item(301, 0, 5), (MATERIALS_TAB, 1): Item(302, 0, 1)}
MONSTER_KINDS = 5
AUTHENTICATE_ID = 1
REQUEST_TIMEOUT = 10.0
# Error replies with a code below the token codes say the server failed, not that a rule refused.
SERVER_FAILURES = frozenset(code for code in ErrorCode if code < ErrorCode.TOKEN_MALFORMED)
ACCOUNT_PASSWORD = "load-bench-password"
LOGINS_AT_ONCE = 8
LATENCY_FLOOR_MS, LATENCY_GROWTH = 0.001, 1.02


def latency_bucket(ms):
    """The histogram bucket of a latency: buckets grow by 2%, from a microsecond."""
    return max(0, int(math.log(max(ms, LATENCY_FLOOR_MS) / LATENCY_FLOOR_MS, LATENCY_GROWTH)))


def bucket_ms(bucket):
    """The latency a bucket stands for: its geometric middle."""
    return LATENCY_FLOOR_MS * LATENCY_GROWTH ** (bucket + 0.5)


def percentile_ms(histogram, fraction):
    """The latency below which C{fraction} of a histogram's answers fall, in ms, or None if it is empty."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = min(total - 1, int(fraction * total)), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen > rank:
            return round(bucket_ms(bucket), 2)


def code_name(code):
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class Tally:
    """What one worker counted in one second."""

    def __init__(self):
        self.answered = 0
        self.latencies = Counter()  # bucket -> answers
        self.refusals = Counter()
        self.errors = Counter()

    def answer(self, seconds, code):
        self.answered += 1
        self.latencies[latency_bucket(seconds * 1000)] += 1
        if code in SERVER_FAILURES:
            self.errors[f"reply:{code_name(code)}"] += 1
        elif code is not None:
            self.refusals[code_name(code)] += 1


class LoadUser(FrameReceiver):
    """
    One user's connection: authenticates with its token, then sends the next
    request of its mix whenever the schedule calls L{send_next}, timing each
    request until its answer.
    """

    def __init__(self, generator, token):
        self.generator, self.token = generator, token
        self.held = False
        self.pending = {}  # request id -> time.monotonic() when sent
        self._mix = (self._ping, self._list_inventory, self._hunt, self._move_item)
        self._turn = random.randrange(len(self._mix))
        self._last_id = AUTHENTICATE_ID
        self._moves = 0
        self._failed = False
        self._close_reason = None  # the code name of the server's error push, if it sent one

    def connectionMade(self):
        self.transport.write(packets.AUTHENTICATE.encode(AUTHENTICATE_ID, {"token": self.token}))

    def send_next(self):
        if not self.held:
            return
        self._last_id += 1
        self.pending[self._last_id] = time.monotonic()
        self.transport.write(self._mix[self._turn % len(self._mix)](self._last_id))
        self._turn += 1

    def _ping(self, request_id):
        return packets.PING.encode(request_id, {"nonce": request_id})

    def _list_inventory(self, request_id):
        return packets.LIST_INVENTORY.encode(request_id, {})

    def _hunt(self, request_id):
        return packets.HUNT.encode(request_id, {"monster": 1 + request_id % MONSTER_KINDS})

    def _move_item(self, request_id):
        self._moves += 1
        there = self._moves % 2
        return packets.MOVE_ITEM.encode(request_id, {"tab": MATERIALS_TAB, "from_slot": 1 - there, "to_slot": there})

    def frameReceived(self, frame):
        message, request_id, body = frame
        if request_id == 0:
            self._pushed(message, body)
        elif not self.held:
            self._authenticated(message, body)
        else:
            sent = self.pending.pop(request_id, None)
            if sent is not None:  # else it timed out already
                self.generator.tally.answer(time.monotonic() - sent,
                                            body["code"] if message is packets.ERROR else None)

    def _pushed(self, message, body):
        if message is packets.PING:
            self.transport.write(packets.PONG.encode(0, body))
        elif message is packets.ERROR:
            self._close_reason = code_name(body["code"])

    def _authenticated(self, message, body):
        if message is packets.AUTHENTICATED:
            self.held = True
            self.generator.joined(self)
        else:
            reason = code_name(body["code"]) if message is packets.ERROR else message.name
            self._fail(f"auth:{reason}")
            self.transport.loseConnection()

    def codecErrorReceived(self, error):
        self.generator.tally.errors["malformed_reply"] += 1

    def connectionLost(self, reason):
        if self.held:
            self.held = False
            self.generator.left(self._close_reason or "connection_lost")
        else:
            self._fail(f"auth:{self._close_reason or 'connection_lost'}")

    def _fail(self, kind):
        if not self._failed:
            self._failed = True
            self.generator.tally.errors[kind] += 1

    def expire(self, now):
        """Forget requests unanswered for L{REQUEST_TIMEOUT}; how many."""
        late = [request_id for request_id, sent in self.pending.items() if now - sent > REQUEST_TIMEOUT]
        for request_id in late:
            del self.pending[request_id]
        return len(late)


class Generator:
    """One worker's users: connects them over the ramp, drives them from one schedule, reports every second."""

    def __init__(self, reactor, users, rate):
        self.reactor, self.rate = reactor, rate
        self.users = [LoadUser(self, token) for token, _, _ in users]
        self.addresses = [(host, port) for _, host, port in users]
        self.schedule = Schedule()
        self.tally = Tally()
        self.held = 0
        self.closing = False
        self._endpoints = {}
        self._started = 0
        self._second = 0

    def joined(self, user):
        self.held += 1
        self.schedule.add(self.rate, user.send_next)

    def left(self, reason):
        self.held -= 1
        if not self.closing:
            self.tally.errors[f"closed:{reason}"] += 1

    def ramp(self, seconds):
        """Connect the users at an even pace over C{seconds}."""
        began = self.reactor.seconds()

        def connect_due():
            elapsed = self.reactor.seconds() - began
            due = len(self.users) if elapsed >= seconds else math.ceil(elapsed / seconds * len(self.users))
            while self._started < due:
                self._connect(self._started)
                self._started += 1
            if self._started == len(self.users):
                pacer.stop()

        pacer = task.LoopingCall(connect_due)
        pacer.clock = self.reactor
        pacer.start(0.01)

    def _connect(self, index):
        address = self.addresses[index]
        if address not in self._endpoints:
            self._endpoints[address] = TCP4ClientEndpoint(self.reactor, *address, timeout=REQUEST_TIMEOUT)
        connectProtocol(self._endpoints[address], self.users[index]).addErrback(self._connect_failed)

    def _connect_failed(self, failure):
        self.tally.errors["connect"] += 1

    def report(self, seconds):
        """Print the tally of the C{seconds} (usually one) since the last report as a "second" line, and start anew."""
        self._second += seconds
        now = time.monotonic()
        timed_out = sum(user.expire(now) for user in self.users if user.pending)
        if timed_out:
            self.tally.errors["timeout"] += timed_out
        tally, self.tally = self.tally, Tally()
        print("second", json.dumps({"second": self._second, "held": self.held, "answered": tally.answered,
                                    "latencies": tally.latencies, "refusals": tally.refusals,
                                    "errors": tally.errors}), flush=True)

    def close(self):
        self.closing = True
        for user in self.users:
            if user.transport is not None:
                user.transport.loseConnection()


async def work(reactor, arguments):
    """A worker process: on "go", ramp and hold its share of the users, reporting every second; then "done"."""
    with open(arguments.users) as f:
        generator = Generator(reactor, json.load(f), arguments.rate)
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    # The worker's own garbage collections would stall it for tens of
    # milliseconds and show up as the server's latency: it has none while
    # it runs (as in bench/raid_load.py).
    gc.freeze()
    gc.disable()
    wall, cpu = time.monotonic(), time.process_time()
    generator.schedule.start()
    reporter = task.LoopingCall.withCount(generator.report)
    reporter.clock = reactor
    reporter.start(1.0, now=False)
    generator.ramp(arguments.ramp)
    await task.deferLater(reactor, arguments.ramp + arguments.hold + 0.5, lambda: None)
    reporter.stop()
    cpu_percent = round((time.process_time() - cpu) / (time.monotonic() - wall) * 100)
    generator.close()
    print("done", json.dumps({"cpu_percent": cpu_percent}), flush=True)


class WorkerProcess(Child):
    """A worker: "ready", "go" and "done" as every bench child, and a "second {json}" line each second."""

    def __init__(self, index, progress):
        super().__init__(reports=True)
        self.index, self.progress = index, progress
        self._lines = b""

    def outReceived(self, data):
        self._lines += data
        *lines, self._lines = self._lines.split(b"\n")
        for line in lines:
            word, _, rest = line.partition(b" ")
            if word == b"second":
                self.progress.second(self.index, json.loads(rest))
            else:
                super().outReceived(line + b"\n")


class Progress:
    """
    Merges the workers' seconds: shows each second once every worker has
    reported it, and keeps the hold's latencies and rate and the run's
    errors and refusals.
    """

    def __init__(self, workers, requested, ramp, out=sys.stdout):
        self.requested, self.ramp, self.out = requested, ramp, out
        self.on_terminal = out.isatty()
        self._reached = [0] * workers  # the last second each worker reported
        self._held = [0] * workers
        self._seconds = defaultdict(list)  # second -> reports not yet shown
        self._shown = 0
        self.hold_latencies = Counter()
        self.hold_answered = 0
        self.hold_held = []  # connections held in each second of the hold
        self.errors, self.refusals = Counter(), Counter()

    def second(self, worker, report):
        self._reached[worker] = report["second"]
        self._held[worker] = report["held"]
        self._seconds[report["second"]].append(report)
        while self._shown < min(self._reached):
            self._shown += 1
            self._show(self._shown, self._seconds.pop(self._shown, []))

    def _show(self, second, reports):
        latencies = Counter()
        answered = 0
        for report in reports:
            latencies.update({int(bucket): n for bucket, n in report["latencies"].items()})
            answered += report["answered"]
            self.errors.update(report["errors"])
            self.refusals.update(report["refusals"])
        held = sum(self._held)
        holding = second > self.ramp
        if holding:
            self.hold_latencies.update(latencies)
            self.hold_answered += answered
            self.hold_held.append(held)
        line = (f"{'hold' if holding else 'ramp'} {second:>4} s  held {held:>7,}/{self.requested:,}  "
                f"{answered:>7,} req/s  p50 {_ms(percentile_ms(latencies, 0.5))}  "
                f"p99 {_ms(percentile_ms(latencies, 0.99))}  errors {sum(self.errors.values()):,}  "
                f"refused {sum(self.refusals.values()):,}")
        if self.on_terminal:
            self.out.write("\r" + line.ljust(100))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self):
        if self.on_terminal:
            self.out.write("\n")


def _ms(value):
    return "   -    " if value is None else f"{value:>6.1f} ms"


async def enter_world_through(reactor, address, count):
    """
    Log C{count} users in through a running session server as C{load_0},
    C{load_1}, ... (registering the accounts it does not know) and enter the
    world; C{[token, game host, game port]} of each.
    """
    host, _, port = address.rpartition(":")
    limit = defer.DeferredSemaphore(LOGINS_AT_ONCE)

    async def enter(index):
        client = await connect(reactor, host, int(port))
        try:
            credentials = {"name": f"load_{index}", "password": ACCOUNT_PASSWORD}
            try:
                await client.request(packets.REGISTER, credentials)
            except RemoteError as e:
                if e.code != ErrorCode.NAME_TAKEN:
                    raise
            _, logged_in = await client.request(packets.LOGIN, credentials)
            _, world = await client.request(packets.ENTER_WORLD, {"token": logged_in["token"]})
            return [logged_in["token"], world["host"], world["port"]]
        finally:
            client.close()

    return await gather([limit.run(lambda i: defer.ensureDeferred(enter(i)), i) for i in range(count)])


async def run_workers(reactor, users, arguments, work_dir, server_pid):
    """Start the workers with their shares of C{users}, show their progress; the result's figures."""
    workers = arguments.workers
    progress = Progress(workers, len(users), arguments.ramp)
    processes = []
    for index in range(workers):
        share = os.path.join(work_dir, f"users{index}.json")
        with open(share, "w") as f:
            json.dump(users[index::workers], f)
        process = WorkerProcess(index, progress)
        reactor.spawnProcess(process, sys.executable, [
            sys.executable, os.path.abspath(__file__), "--worker", "--users", share, "--ramp", str(arguments.ramp),
            "--hold", str(arguments.hold), "--rate", str(arguments.rate)], env=None, path=ROOT)
        processes.append(process)
    await gather([p.ready for p in processes])
    server_cpu = []

    def sample_server_cpu():
        if server_pid is not None:
            server_cpu.append((time.monotonic(), cpu_seconds(server_pid)))

    # The server's CPU over the hold: sampled when it starts and when it ends.
    reactor.callLater(arguments.ramp, sample_server_cpu)
    reactor.callLater(arguments.ramp + arguments.hold, sample_server_cpu)
    say(processes, "go")
    await gather([p.done for p in processes])
    progress.finish()
    server_cpu_percent = None
    if len(server_cpu) == 2:
        (began, cpu_began), (ended, cpu_ended) = server_cpu
        server_cpu_percent = round((cpu_ended - cpu_began) / (ended - began) * 100)
    return {
        "ccu_held": min(progress.hold_held, default=0),
        "requests_per_second": round(progress.hold_answered / arguments.hold),
        "p50_ms": percentile_ms(progress.hold_latencies, 0.5),
        "p90_ms": percentile_ms(progress.hold_latencies, 0.9),
        "p99_ms": percentile_ms(progress.hold_latencies, 0.99),
        "errors": dict(progress.errors.most_common()),
        "refusals": dict(progress.refusals.most_common()),
        "server_cpu_percent": server_cpu_percent,
        "workers_cpu_percent": [p.result["cpu_percent"] for p in processes],
    }


async def run_with_own_server(reactor, arguments, work_dir):
    """Make the users live, start a game server that trusts their tokens, run, then clean up."""
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    players = await live_players(reactor, settings, arguments.connections, ITEMS)
    sync_prefix, mm_prefix = f"bench{random.getrandbits(32):x}", f"benchmm{random.getrandbits(32):x}"
    game_port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    game = start(reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME,
                 "--game-listen", f"tcp:{game_port}:interface=127.0.0.1",
                 "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1", "--game-udp-port", "0",
                 "--tokens-public-key", players.public_key, "--sync-prefix", sync_prefix,
                 "--raids-matchmaking-prefix", mm_prefix, executable=twistd, reports=False)
    try:
        await listening(reactor, game_port)
        users = [[issued.token, "127.0.0.1", game_port] for issued in players.issued]
        return await run_workers(reactor, users, arguments, work_dir, game.transport.pid)
    finally:
        game.transport.signalProcess("TERM")
        await game.exited
        await forget_players(reactor, players.router, settings, players.users, sync_prefix, mm_prefix)


async def main(reactor, arguments):
    with tempfile.TemporaryDirectory(prefix="dreamraid-load-") as work_dir:
        if arguments.session:
            print(f"logging {arguments.connections:,} users in through the session server at {arguments.session}",
                  flush=True)
            users = await enter_world_through(reactor, arguments.session, arguments.connections)
            result = await run_workers(reactor, users, arguments, work_dir, None)
        else:
            result = await run_with_own_server(reactor, arguments, work_dir)
    print(f"held {result['ccu_held']:,} of {arguments.connections:,} connections through the {arguments.hold} s hold "
          f"({arguments.workers} workers, {arguments.rate:g} requests/s each connection)")
    print(f"answered {result['requests_per_second']:,} requests/s: p50 {result['p50_ms']} ms, "
          f"p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms")
    print("refusals:", ", ".join(f"{k} {v:,}" for k, v in result["refusals"].items()) or "none")
    print("errors:", ", ".join(f"{k} {v:,}" for k, v in result["errors"].items()) or "none")
    workers_cpu = ", ".join(f"{percent}%" for percent in result["workers_cpu_percent"])
    server_cpu = "not measured" if result["server_cpu_percent"] is None else f"{result['server_cpu_percent']}%"
    print(f"CPU: game server {server_cpu}, workers {workers_cpu}")
    print(json.dumps({
        "metric": "ccu_held",
        "value": result["ccu_held"],
        **result,
        "workers": arguments.workers,
        "connections_requested": arguments.connections,
        "rate_per_connection": arguments.rate,
        "ramp_seconds": arguments.ramp,
        "hold_seconds": arguments.hold,
        "target": arguments.session or "own game server",
        "machine": platform.machine(),
    }))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="2,000 connections, a 5 s ramp and a 10 s hold")
    parser.add_argument("--connections", type=int, help="connections to ramp to")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="load generator processes (default: one per core)")
    parser.add_argument("--ramp", type=int, default=10, help="seconds to reach every connection (default 10)")
    parser.add_argument("--hold", type=int, default=30, help="seconds to hold them, measured (default 30)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="requests per second of each connection (default 1)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--start", action="store_true",
                        help="start a game server of its own and make the users live itself (the default)")
    target.add_argument("--session", metavar="HOST:PORT",
                        help="log the users in through this running session server instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--users", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.connections, arguments.ramp, arguments.hold = arguments.connections or 2000, 5, 10
    if not arguments.worker:
        if not arguments.connections or arguments.connections < 1:
            parser.error("--connections N (or --quick) is required")
        if arguments.workers < 1 or arguments.ramp < 0 or arguments.hold < 1:
            parser.error("--workers and --hold must be at least 1, --ramp at least 0")
        if not 0 < arguments.rate <= 1 / Schedule.TICK:
            parser.error(f"--rate must be above 0 and at most {1 / Schedule.TICK:g}")
    return arguments


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.worker:
        task.react(lambda reactor: defer.ensureDeferred(work(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
