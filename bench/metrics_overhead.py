"""
What the game server's Prometheus metrics cost: its ping and inventory-move
rates with metrics on over the same rates with C{--game-metrics off}, under
the load of C{bench/game_ops.py} (1,000 connected, authenticated clients in a
quick run, 2,000 in a full one, each with one request in flight).

Both sets of game servers (one process per core each, the same options but
for C{--game-metrics}) run from the start; only one set is under load at a
time.  After an unrecorded warm-up round, three rounds alternate the sides
(on, off, off, on, on, off) so the noise of a shared machine hits both
alike, and each side keeps its best measurement: other work on the cores
only ever slows a side down.  The last line printed is the JSON
result, its C{value} the lower of the ping and move ratios (target 0.95:
metrics cost less than 5%).  Needs the local cluster (C{scripts/stack.sh up}).

The game servers outlive a measurement here, and their liveness sweep pings
a tenth of the connections of unknown round trip every tenth of the ping
interval (6 s at the longest, 60 s): the clients answer those pings, which
game_ops' clients, built for one short measurement, do not.

    python bench/metrics_overhead.py [--quick]
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys

from twisted.internet import defer, task

from bench.children import ROOT, forget_players, live_players, start, write_shares
from bench.game_ops import Load, free_port, generate, listening, rate, restore_sessions
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import Item

ME = os.path.abspath(__file__)
TARGET = 0.95
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


async def main(reactor, quick):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    clients = 1000 if quick else 2000
    seconds = 5.0 if quick else 15.0
    rounds = 3
    router, work, public, users, issued = await live_players(reactor, settings, clients, {(2, 0): Item(301, 0, 1)})
    cores = len(os.sched_getaffinity(0))
    shares = write_shares(work, "tokens", [i.token for i in issued], cores)

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    prefix = f"bench{random.getrandbits(32):x}"
    ports = {side: [free_port() for _ in range(cores)] for side in ("on", "off")}
    servers = [start(reactor, "-n", "--pidfile=", "dreamraid-game", "--game-listen",
                     f"tcp:{port}:interface=127.0.0.1", "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                     "--tokens-public-key", public, "--sync-prefix", prefix, "--game-udp-port", "0",
                     "--game-ping-interval", "60", "--game-idle-timeout", "120", "--game-metrics", side,
                     executable=twistd, reports=False)
               for side in ports for port in ports[side]]

    rates = {mode: {"on": [], "off": []} for mode in ("ping", "move")}
    try:
        for port in ports["on"] + ports["off"]:
            await listening(reactor, port)
        for mode in ("ping", "move"):
            # A first, unrecorded round warms both sides up: the first load a server meets runs slow.
            for r in range(-1, rounds):
                for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    await restore_sessions(reactor, router, users, issued)
                    measured = await rate(reactor, [
                        start(reactor, ME, "--generate", "--port", str(port), "--mode", mode,
                              "--seconds", str(seconds if r >= 0 else 2.0), "--tokens", tokens)
                        for port, tokens in zip(ports[side], shares)], seconds if r >= 0 else 2.0)
                    if r < 0:
                        continue
                    rates[mode][side].append(measured)
                    print(f"{mode} metrics {side}: {rates[mode][side][-1]:.0f}/s", file=sys.stderr, flush=True)
    finally:
        # The servers end with the run, even a failed one.
        for process in servers:
            process.transport.signalProcess("TERM")
        await gather([process.exited for process in servers])
    await forget_players(reactor, router, settings, users, prefix)

    summary = {}
    for mode, sides in rates.items():
        best = {side: max(values) for side, values in sides.items()}
        summary[mode] = {"on": round(best["on"]), "off": round(best["off"]),
                         "ratio": round(best["on"] / best["off"], 3),
                         "median_ratio": round(statistics.median(sides["on"]) / statistics.median(sides["off"]), 3),
                         "runs": {side: [round(v) for v in values] for side, values in sides.items()}}
    worst = min(summary, key=lambda mode: summary[mode]["ratio"])
    ratio = summary[worst]["ratio"]
    print(json.dumps({
        "metric": "game_requests_per_second_metrics_on_over_off",
        "value": ratio,
        "baseline": summary[worst]["off"],
        "unit": f"{worst} requests/s with metrics off, one request in flight per client",
        "ratio": ratio,
        "ping": summary["ping"],
        "move": summary["move"],
        "target": TARGET,
        "met": ratio >= TARGET,
        "clients": clients,
        "seconds": seconds,
        "server_processes": cores,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 clients, 5 s a measurement, two of each side (full: 2,000, 15 s, three)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["ping", "move"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.generate:
        task.react(lambda reactor: defer.ensureDeferred(generate(reactor, arguments, PingAnsweringLoad)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick)))
