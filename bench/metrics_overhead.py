"""
What the game server's Prometheus metrics cost: requests per game-server CPU
second with metrics on over the same with C{--game-metrics off}, under the
load of C{bench/game_ops.py} (ping, then inventory move; one request in flight
per client, 1,000 clients a side in a quick run, 2,000 in a full one).

Both sides (one game server process per core each, the same options but for
C{--game-metrics}, started turn about) are under load at the same time, so a
slow spell of the shared machine hits both alike.  The run is in rounds
(4 quick, 6 full), each with fresh server processes; in a round each side's
load generators stay connected for a few short windows a request type (4 of
2 s quick, 6 of 5 s full), and the go order alternates.  The headline is,
for the worse request type, the median over all windows of the on/off ratio
of requests per server CPU second (target 0.95: metrics cost less than 5%);
the throughput ratio is given too.  C{--same} runs metrics off on both
sides: the spread it reads then is the bench's own noise.  The JSON also
gives what metrics add to a request timed in this process
(C{metrics_microseconds}) and the ratio that cost implies at the measured
rates (C{estimated_ratio}).  The last line printed is the JSON result.
Needs the local cluster (C{scripts/stack.sh up}).

The game servers' liveness sweep pings connections of unknown round trip;
these clients answer those pings, which game_ops' clients, built for one
short measurement, do not.

    python bench/metrics_overhead.py [--quick] [--same]
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import timeit

from twisted.internet import defer, task, threads
from twisted.internet.testing import StringTransport

from bench.children import ROOT, UNLIMITED_GAME, forget_players, live_players, say, start, write_shares
from bench.game_ops import Load, connect_loads, free_port, listening, restore_sessions
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.protocols.server import ServerFactory, ServerProtocol
from dreamraid.services.deferreds import gather
from dreamraid.services.liveness import Liveness
from dreamraid.services.livestore import Item
from dreamraid.services.metrics import Buckets, Metrics

ME = os.path.abspath(__file__)
TARGET = 0.95
SIDES = ("on", "off")
MODES = ("ping", "move")
# The in-process server runs without the abuse limits, as the bench's servers do (UNLIMITED_GAME).
UNLIMITED_SETTINGS = {("game", "rate_limits"): "off", ("game", "frame_rate"): "off"}
PUSHED_PING = packets.PING.encode(0, {"nonce": 0})[:8]  # length, message id, request id 0


class PingAnsweringLoad(Load):
    """
    A game_ops client that also answers the server's pings with pongs, as a
    real client does.  With one request in flight a read is most often one
    whole reply, counted as game_ops counts it; anything else is taken apart
    frame by frame.
    """

    def dataReceived(self, data):
        if (self.ready.called and not self._pending and len(data) == self.reply_size
                and data[2:4] == self.expected_id):
            Load.dataReceived(self, data)
            return
        data, self._pending = self._pending + data, b""
        while len(data) >= 2:
            end = 2 + int.from_bytes(data[:2], "little")
            if len(data) < end:
                break
            frame, data = data[:end], data[end:]
            if frame[:8] == PUSHED_PING:
                nonce = packets.decode_frame(frame).body["nonce"]
                self.transport.write(packets.PONG.encode(0, {"nonce": nonce}))
            else:
                Load.dataReceived(self, frame)
        self._pending = data


def cpu_seconds(pids):
    """CPU seconds the processes C{pids} (every thread of each) have run so far, from the scheduler's own count."""
    nanoseconds = 0
    for pid in pids:
        for thread in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{thread}/schedstat") as stat:
                nanoseconds += int(stat.read().split()[0])
    return nanoseconds / 1e9


def metrics_microseconds(pairs=201, requests=2000):
    """
    What metrics add to one ping's protocol work and to one Redis reply, in
    microseconds, timed in this process through the real server protocol on
    an in-memory transport: the cost of the code alone, to read the windows
    against.  The machine's speed swings (a plain loop's time doubles for
    seconds at a time), so a server with metrics and one without take short
    turns, and the figure is the median of the differences of neighbours.
    """
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"), UNLIMITED_SETTINGS).game
    clock = _RealTime()
    frame = packets.PING.encode(1, {"nonce": 5})

    def server(metrics):
        factory = ServerFactory("bench", settings, Liveness(clock, settings.ping_interval, settings.idle_timeout,
                                                           settings.auth_timeout))
        factory.protocol, factory.metrics = ServerProtocol, metrics
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(_Discard())
        return protocol

    def per_ping(protocol):
        started = time.perf_counter()
        for _ in range(requests):
            protocol.dataReceived(frame)
        return (time.perf_counter() - started) / requests * 1e6

    on, off = server(Metrics(clock, "game")), server(None)
    ping = statistics.median(per_ping(on) - per_ping(off) for _ in range(pairs))
    buckets = Buckets()
    redis = min(timeit.repeat(lambda: buckets.observe(clock.seconds() - 0.0), number=requests, repeat=9))
    return {"ping": round(ping, 2), "redis_reply": round(redis / requests * 1e6, 2)}


class _RealTime(task.Clock):
    """A clock that tells the time as the reactor does, for liveness and metrics to share; its timers never fire."""

    seconds = staticmethod(time.time)


class _Discard(StringTransport):
    """A transport that keeps nothing written to it."""

    def write(self, data):
        pass


async def generate_windows(reactor, arguments):
    """
    A load generator that stays connected: ready once, then each "go"
    line runs one window of the given seconds and reports its replies,
    once every request sent has had its reply.
    """
    loads = await connect_loads(reactor, arguments, PingAnsweringLoad)
    print("ready", flush=True)
    while (await threads.deferToThread(sys.stdin.readline)).strip() == "go":
        before = sum(load.replies for load in loads)
        for load in loads:
            load.running = True
            load.send()
        await task.deferLater(reactor, arguments.seconds, lambda: None)
        replies = sum(load.replies for load in loads) - before
        for load in loads:
            load.running = False
        while any(load.replies < load.sent for load in loads):
            await task.deferLater(reactor, 0.01, lambda: None)
        print("done", json.dumps({"replies": replies}), flush=True)
    for load in loads:
        load.transport.loseConnection()


async def window(generators, pids, order):
    """
    One window with both sides under load at once, their generators set
    going in C{order}: each side's replies per second and replies per CPU
    second of its game servers.
    """
    cpu = {side: cpu_seconds(pids[side]) for side in SIDES}
    for side in SIDES:
        for g in generators[side]:
            g.done = defer.Deferred()
    say([g for side in order for g in generators[side]], "go")
    await gather([g.done for side in SIDES for g in generators[side]])
    return {side: (sum(g.result["replies"] for g in generators[side]),
                   cpu_seconds(pids[side]) - cpu[side]) for side in SIDES}


def start_servers(reactor, public, prefix, cores, order, same):
    """
    One game server process per core a side, the same but for
    C{--game-metrics}, started turn about, the sides first in C{order}, so
    neither side is always the older process; their ports and processes by
    side.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    ports = {side: [free_port() for _ in range(cores)] for side in SIDES}
    servers = {side: [] for side in SIDES}
    for i in range(cores):
        for side in order if i % 2 == 0 else order[::-1]:
            servers[side].append(start(
                reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME, "--game-listen",
                f"tcp:{ports[side][i]}:interface=127.0.0.1", "--game-http-listen",
                f"tcp:{free_port()}:interface=127.0.0.1", "--tokens-public-key", public,
                "--sync-prefix", prefix, "--game-udp-port", "0", "--game-ping-interval", "60",
                "--game-idle-timeout", "120", "--game-metrics", "off" if same else side,
                executable=twistd, reports=False))
    return ports, servers


async def main(reactor, quick, same):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    clients = 1000 if quick else 2000
    seconds = 2.0 if quick else 5.0
    rounds, per_round = (4, 4) if quick else (6, 6)
    cores = len(os.sched_getaffinity(0))
    router, work, public, users, issued = await live_players(reactor, settings, 2 * clients, {(2, 0): Item(301, 0, 1)})
    tokens = [i.token for i in issued]
    halves = [write_shares(work, "first", tokens[:clients], cores), write_shares(work, "second", tokens[clients:], cores)]
    prefix = f"bench{random.getrandbits(32):x}"

    windows = {mode: [] for mode in MODES}
    for r in range(rounds):
        # Fresh server processes each round: one process can run a few per
        # cent faster than its twin for the whole of its life (where its
        # memory landed, its hash seed), which windows alone never average out.
        ports, servers = start_servers(reactor, public, prefix, cores, SIDES[::-1] if r % 2 else SIDES, same)
        pids = {side: [process.transport.pid for process in servers[side]] for side in SIDES}
        try:
            for port in ports["on"] + ports["off"]:
                await listening(reactor, port)
            for mode in MODES:
                await restore_sessions(reactor, router, users, issued)
                generators = {side: [start(reactor, ME, "--generate", "--port", str(port), "--mode", mode,
                                           "--seconds", str(seconds), "--tokens", tokens)
                                     for port, tokens in zip(ports[side], half)]
                              for side, half in zip(SIDES, halves)}
                await gather([g.ready for side in SIDES for g in generators[side]])
                # A first, unrecorded window warms both sides up: the first load a server meets runs slow.
                for w in range(-1, per_round):
                    measured = await window(generators, pids, SIDES[::-1] if (r + w) % 2 else SIDES)
                    if w >= 0:
                        windows[mode].append(measured)
                say([g for side in SIDES for g in generators[side]], "end")
                await gather([g.exited for side in SIDES for g in generators[side]])
        finally:
            # The servers end with the round, even a failed one.
            for process in servers["on"] + servers["off"]:
                if process.transport.pid is not None:  # not one that failed to start
                    process.transport.signalProcess("TERM")
            await gather([process.exited for process in servers["on"] + servers["off"]])
        for mode in MODES:
            print(f"round {r + 1} of {rounds}, {mode}: {summarize(windows[mode][-per_round:], seconds)}",
                  file=sys.stderr, flush=True)
    await forget_players(reactor, router, settings, users, prefix)

    summary = {mode: summarize(windows[mode], seconds) for mode in MODES}
    cost = metrics_microseconds()
    # A move is a request like a ping plus one Redis reply.
    extra = {"ping": cost["ping"], "move": cost["ping"] + cost["redis_reply"]}
    estimated = {mode: round(1 / (1 + extra[mode] * summary[mode]["off_per_cpu_second"] / 1e6), 3) for mode in MODES}
    worst = min(MODES, key=lambda mode: summary[mode]["ratio"])
    ratio = summary[worst]["ratio"]
    print(json.dumps({
        "metric": "game_requests_per_server_cpu_second_metrics_on_over_off",
        "value": ratio,
        "baseline": summary[worst]["off_per_cpu_second"],
        "unit": f"{worst} requests per game-server CPU second with metrics off, one request in flight per client",
        "ratio": ratio,
        "ping": summary["ping"],
        "move": summary["move"],
        "target": TARGET,
        "met": ratio >= TARGET,
        "metrics_microseconds": cost,
        "estimated_ratio": estimated,
        "clients_per_side": clients,
        "window_seconds": seconds,
        "windows": rounds * per_round,
        "server_rounds": rounds,
        "server_processes_per_side": cores,
        "same_on_both_sides": same,
        "machine": platform.machine(),
    }))


def summarize(windows, seconds):
    """
    A request type's windows: the median over windows of the on/off ratio
    of requests per server CPU second (the headline), of requests per
    second, and the totals.
    """
    def total(side, column):
        return sum(w[side][column] for w in windows)
    return {
        "ratio": round(statistics.median((w["on"][0] / w["on"][1]) / (w["off"][0] / w["off"][1]) for w in windows), 3),
        "throughput_ratio": round(statistics.median(w["on"][0] / w["off"][0] for w in windows), 3),
        "on_per_cpu_second": round(total("on", 0) / total("on", 1)),
        "off_per_cpu_second": round(total("off", 0) / total("off", 1)),
        "on_per_second": round(total("on", 0) / seconds / len(windows)),
        "off_per_second": round(total("off", 0) / seconds / len(windows)),
        "window_ratios": [round((w["on"][0] / w["on"][1]) / (w["off"][0] / w["off"][1]), 3) for w in windows],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 clients a side, 4 rounds of 4 windows of 2 s a request type "
                             "(full: 2,000, 6 rounds of 6 windows of 5 s)")
    parser.add_argument("--same", action="store_true",
                        help="metrics off on both sides: what the bench reads when nothing differs (its noise)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["ping", "move"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.generate:
        task.react(lambda reactor: defer.ensureDeferred(generate_windows(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick, arguments.same)))
