"""
What a flood of corrupted frames does to well-behaved players: the p99
latency of 100 authenticated clients, each sending a ping or an inventory
listing every 0.1 s, with no fuzz (the baseline) and then while fuzz
generators pour corrupted frames of a replayed session (tests/mutations.py)
into the same game servers, in the same run.

The game servers (one process per core) run with their shipped abuse
limits, but for the per-address connection cap (every client here comes
from 127.0.0.1): a fuzz connection is refused RATE_LIMITED past its token
bucket and closed after a run of refusals, and its generator opens another
at once, unauthenticated (its session ended with the first).  The fuzz
generators (one per core) each keep C{--fuzz-connections} connections
writing a batch of frames whenever the last batch's replies are in.
Reported: the fuzz frames the servers rejected a second (error replies the
fuzzers read) and refused connections, the good clients' p50/p99 in each
phase, errors they saw, and the servers' RSS before and after.  The last
line printed is the JSON result: C{value} is the good clients' p99 under
fuzz, C{baseline} their p99 without it, C{ratio} baseline / value (target
0.7).  Needs the local cluster (C{scripts/stack.sh up}).

    python bench/fuzz.py [--quick]
"""

import argparse
import json
import os
import platform
import random
import sys

from twisted.internet import defer, protocol, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from bench.children import ROOT, forget_players, live_players, say, start, write_shares
from bench.game_ops import free_port, listening, restore_sessions
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import Item
from tests.mutations import fuzzed_frames

ME = os.path.abspath(__file__)
TARGET = 0.7
GOOD_CLIENTS = 100
GOOD_INTERVAL = 0.1
GOOD_REQUESTS = [packets.PING.encode(1, {"nonce": 7}), packets.LIST_INVENTORY.encode(1, {})]
FUZZ_BATCH = 50
# The request id of the ping that ends each fuzz batch (a request id 0 is refused).
CLOSING_PING = 0xFFFFFFFF
CLOSING_PING_ID = CLOSING_PING.to_bytes(4, "little")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else None


class Frames(protocol.Protocol):
    """Splits what a server sends into frames for C{frameReceived(message_id, data)}."""

    _buffer = b""

    def dataReceived(self, data):
        self._buffer += data
        while len(self._buffer) >= 2:
            end = 2 + int.from_bytes(self._buffer[:2], "little")
            if len(self._buffer) < end:
                return
            frame, self._buffer = self._buffer[:end], self._buffer[end:]
            self.frameReceived(int.from_bytes(frame[2:4], "little"), frame)


class GoodClient(Frames):
    """Authenticates, then on C{start} sends one request every GOOD_INTERVAL and times each reply."""

    def __init__(self, token, clock):
        self.token, self.clock = token, clock
        self.ready = defer.Deferred()
        self.latencies, self.errors = ([], []), 0  # ping latencies, inventory latencies
        self._sent_at = None
        self._turn = 0

    def connectionMade(self):
        self.transport.write(packets.AUTHENTICATE.encode(1, {"token": self.token}))

    def frameReceived(self, message_id, frame):
        if message_id == packets.PING.id:  # the server's liveness ping: answer it, as a client does
            self.transport.write(packets.PONG.encode(0, packets.decode_frame(frame).body))
        elif not self.ready.called:
            if message_id == packets.AUTHENTICATED.id:
                self.ready.callback(None)
            else:
                self.ready.errback(RuntimeError(f"authentication failed: {packets.decode_frame(frame)}"))
        elif self._sent_at is not None:
            if message_id == packets.ERROR.id:
                self.errors += 1
            else:
                self.latencies[message_id != packets.PONG.id].append(self.clock.seconds() - self._sent_at)
            self._sent_at = None

    def tick(self):
        if self._sent_at is None and self.transport.connected:
            self._sent_at = self.clock.seconds()
            self.transport.write(GOOD_REQUESTS[self._turn % 2])
            self._turn += 1


class Fuzzer(Frames):
    """Writes a batch of corrupted frames whenever the last batch was answered; counts the error replies."""

    def __init__(self, token, batches, tally):
        self.token, self.batches, self.tally = token, batches, tally
        self.running = False
        self.closed = defer.Deferred()
        self._next = random.randrange(len(batches))

    def connectionMade(self):
        if self.token is not None:
            self.transport.write(packets.AUTHENTICATE.encode(1, {"token": self.token}))
        if self.running:
            self.send()

    def frameReceived(self, message_id, frame):
        if message_id == packets.ERROR.id:
            self.tally["rejected"] += 1
        elif message_id == packets.PONG.id and frame[4:8] == CLOSING_PING_ID and self.running:
            self.send()  # the batch's closing ping is back

    def send(self):
        self.transport.write(self.batches[self._next % len(self.batches)])
        self._next += 1

    def connectionLost(self, reason):
        self.tally["closed"] += 1
        self.closed.callback(None)


async def good(reactor, arguments):
    """The well-behaved clients' process: each "go" line runs one window and reports its latencies."""
    tokens = json.load(open(arguments.tokens))
    clients = []
    for i, token in enumerate(tokens):
        client = GoodClient(token, reactor)
        port = arguments.ports[i % len(arguments.ports)]
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), client)
        clients.append(client)
    await gather([c.ready for c in clients])
    print("ready", flush=True)
    while (await threads.deferToThread(sys.stdin.readline)).strip() == "go":
        for c in clients:
            c.latencies, c.errors = ([], []), 0
        # Spread the clients' requests over the interval, as players would be.
        loops = [task.LoopingCall(c.tick) for c in clients]
        for i, loop in enumerate(loops):
            reactor.callLater(GOOD_INTERVAL * i / len(loops), loop.start, GOOD_INTERVAL)
        await task.deferLater(reactor, arguments.seconds, lambda: None)
        for loop in loops:
            if loop.running:
                loop.stop()
        pings = [x for c in clients for x in c.latencies[0]]
        inventories = [x for c in clients for x in c.latencies[1]]
        latencies = pings + inventories
        print("done", json.dumps({"p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
                                  "ping_p99_ms": percentile(pings, 0.99) * 1000,
                                  "inventory_p99_ms": percentile(inventories, 0.99) * 1000,
                                  "replies": len(latencies), "errors": sum(c.errors for c in clients),
                                  "disconnected": sum(not c.transport.connected for c in clients)}), flush=True)


async def fuzz(reactor, arguments):
    """A fuzz generator process: on "go", its connections fuzz for the given seconds, reopening any closed."""
    # Attackers run on machines of their own: here they take only the CPU the servers leave.
    os.nice(19)
    tokens = json.load(open(arguments.tokens))
    rng = random.Random(arguments.seed)
    frames = fuzzed_frames(rng, 20_000)
    closing_ping = packets.PING.encode(CLOSING_PING, {"nonce": 0})
    batches = [b"".join(frames[i:i + FUZZ_BATCH]) + closing_ping for i in range(0, len(frames), FUZZ_BATCH)]
    tally = {"rejected": 0, "closed": 0, "opened": 0}
    state = {"running": False}

    async def keep(port, token):
        """One fuzz connection slot: connect, fuzz until closed, connect again while running."""
        while True:
            fuzzer = Fuzzer(token, batches, tally)
            fuzzer.running = state["running"]
            try:
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), fuzzer)
            except Exception:
                await task.deferLater(reactor, 0.05, lambda: None)
                continue
            tally["opened"] += 1
            slots.append(fuzzer)
            token = None  # its session ends with this connection
            await fuzzer.closed
            slots.remove(fuzzer)
            if not state["running"]:
                return

    slots = []
    connections = [keep(arguments.ports[i % len(arguments.ports)], token) for i, token in enumerate(tokens)]
    running = [defer.ensureDeferred(c) for c in connections]
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    state["running"] = True
    tally.update(rejected=0, closed=0, opened=0)
    for fuzzer in slots:
        fuzzer.running = True
        fuzzer.send()
    await task.deferLater(reactor, arguments.seconds, lambda: None)
    state["running"] = False
    print("done", json.dumps(dict(tally)), flush=True)
    for fuzzer in list(slots):
        fuzzer.transport.loseConnection()
    await gather(running)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


async def main(reactor, quick):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    seconds = 10.0 if quick else 30.0
    levels = (2, 5, 10, 20) if quick else (2, 5, 10, 20, 50)  # fuzz connections per core
    cores = len(os.sched_getaffinity(0))
    router, work, public, users, issued = await live_players(
        reactor, settings, GOOD_CLIENTS + sum(levels) * cores, {(2, 0): Item(301, 0, 1)})
    tokens = [i.token for i in issued]
    good_tokens = write_shares(work, "good", tokens[:GOOD_CLIENTS], 1)[0]
    fuzz_tokens, first = {}, GOOD_CLIENTS
    for level in levels:  # each level's fuzzers authenticate with tokens of their own
        fuzz_tokens[level], first = write_shares(work, f"fuzz{level}_", tokens[first:first + level * cores], cores), \
            first + level * cores

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    prefix = f"bench{random.getrandbits(32):x}"
    ports = [free_port() for _ in range(cores)]
    servers = [start(reactor, "-n", "--pidfile=", "dreamraid-game", "--game-connections-per-address", "0",
                     "--game-listen", f"tcp:{port}:interface=127.0.0.1",
                     "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                     "--tokens-public-key", public, "--sync-prefix", prefix, "--game-udp-port", "0",
                     executable=twistd, reports=False) for port in ports]
    port_args = [str(p) for p in ports]
    results = []
    try:
        for port in ports:
            await listening(reactor, port)
        await restore_sessions(reactor, router, users, issued)
        rss_before = [rss_mb(s.transport.pid) for s in servers]
        players = start(reactor, ME, "--good", "--seconds", str(seconds), "--tokens", good_tokens, "--ports", *port_args)
        await players.ready

        async def window(fuzzers):
            players.done = defer.Deferred()
            for f in fuzzers:
                await f.ready
            say(fuzzers, "go")
            say([players], "go")
            await gather([players.done, *[f.done for f in fuzzers]])
            return players.result, [f.result for f in fuzzers]

        await window([])  # an unrecorded warm-up
        baseline, _ = await window([])
        for level in levels:
            fuzzers = [start(reactor, ME, "--fuzz", "--seconds", str(seconds), "--tokens", share, "--seed", str(i),
                             "--ports", *port_args) for i, share in enumerate(fuzz_tokens[level])]
            under_fuzz, tallies = await window(fuzzers)
            await gather([f.exited for f in fuzzers])
            results.append({
                "fuzz_connections": level * cores,
                "rejected_frames_per_second": round(sum(t["rejected"] for t in tallies) / seconds),
                "fuzz_connections_closed": sum(t["closed"] for t in tallies),
                "ratio": round(baseline["p99_ms"] / under_fuzz["p99_ms"], 3),
                "good": under_fuzz})
            print(f"fuzz {level * cores} connections: {results[-1]['rejected_frames_per_second']} rejected/s, "
                  f"good p99 {under_fuzz['p99_ms']:.1f} ms (baseline {baseline['p99_ms']:.1f})", file=sys.stderr, flush=True)
        say([players], "end")
        await players.exited
        rss_after = [rss_mb(s.transport.pid) for s in servers]
    finally:
        for process in servers:
            process.transport.signalProcess("TERM")
        await gather([process.exited for process in servers])
    await forget_players(reactor, router, settings, users, prefix)

    # The headline: the heaviest fuzz the good clients' p99 withstood, or the lightest if none did.
    kept = [r for r in results if r["ratio"] >= TARGET]
    headline = kept[-1] if kept else results[0]
    print(json.dumps({
        "metric": "good_clients_p99_under_fuzz",
        "value": round(headline["good"]["p99_ms"], 2),
        "baseline": round(baseline["p99_ms"], 2),
        "unit": "ms, p99 of 100 well-behaved clients' requests (a request every 0.1 s each)",
        "ratio": headline["ratio"],
        "target": TARGET,
        "met": bool(kept),
        "rejected_frames_per_second": headline["rejected_frames_per_second"],
        "fuzz_connections": headline["fuzz_connections"],
        "levels": results,
        "good_baseline": baseline,
        "server_rss_mb": {"before": [round(x, 1) for x in rss_before], "after": [round(x, 1) for x in rss_after]},
        "seconds": seconds,
        "server_processes": cores,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true",
                        help="10 s windows, 2 to 20 fuzz connections a core (full: 30 s, up to 50)")
    parser.add_argument("--good", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fuzz", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", type=int, nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.good:
        task.react(lambda reactor: defer.ensureDeferred(good(reactor, arguments)))
    elif arguments.fuzz:
        task.react(lambda reactor: defer.ensureDeferred(fuzz(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick)))
