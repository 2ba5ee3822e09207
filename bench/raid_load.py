"""
Concurrent raids on one game server process (quick: 100 raids of 2
players; full: 500, so 1,000 players), each player hitting 5 times a second
over TCP and moving 10 times a second over UDP.  Measures hits/s,
datagrams/s, the time from a hit sent to the boss-HP datagram that carries
its result (p50, p99) and the game server's CPU; and, in the same run, the
same clients at the same rates against a bare Twisted server that answers
each TCP frame with a UDP datagram: its p99 is the baseline.  The last line
printed is the JSON result (C{value}: the raid p99 in ms).

Needs the local cluster (C{scripts/stack.sh up}).

    python bench/raid_load.py [--quick] [--raids N]
"""

import argparse
import gc
import json
import os
import platform
import random
import struct
import sys
import time

from twisted.internet import defer, protocol, reactor as global_reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from bench.children import ROOT, UNLIMITED_GAME, forget_players, live_players, say, start, write_shares
from bench.game_ops import free_port, listening
from dreamraid.client.game import GameClient, RaidChannel
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import Item

HITS_PER_SECOND, MOVES_PER_SECOND = 5, 10
# The baseline's frames: a hit (request number) in, a datagram of a boss-HP's size out.
_HIT = struct.Struct("<HI")
_HP = struct.Struct("<I27x")


class Schedule:
    """
    Calls each added function C{per_second} times a second from a random
    phase, so players do not act in step, off one timer ticking every
    C{TICK} seconds: a timer per player would cost the generator more than
    the players' own messages do.
    """

    TICK = 0.005

    def __init__(self):
        self._rounds = {}  # per_second -> one list of calls per tick of its period

    def add(self, per_second, function, *args):
        slots = self._rounds.setdefault(per_second, [[] for _ in range(round(1 / (per_second * self.TICK)))])
        random.choice(slots).append((function, args))

    def start(self):
        """Tick from now on; a late tick makes up the ticks it missed."""
        self._ticks = 0
        task.LoopingCall.withCount(self._tick).start(self.TICK)

    def _tick(self, count):
        for _ in range(count):
            for slots in self._rounds.values():
                for function, args in slots[self._ticks % len(slots)]:
                    function(*args)
            self._ticks += 1


class Measure:
    """Latencies and counts of one load generator's window."""

    def __init__(self):
        self.latencies, self.hits, self.datagrams, self.measuring = [], 0, 0, False

    def report(self, started, ended, cpu_seconds):
        return {"latencies": self.latencies, "hits": self.hits, "datagrams": self.datagrams,
                "started": started, "ended": ended, "cpu_percent": round(cpu_seconds / (ended - started) * 100)}


class RaidPlayer:
    """One player: hits and moves at the set rates; a hit's latency ends when the HP datagram with its sequence comes."""

    def __init__(self, client, measure):
        self.client, self.measure = client, measure
        self.channel = None
        self.raid_id = None
        self._sent = {}  # hit number -> send time, until its reply names its sequence
        self._waiting = {}  # HP sequence -> send time of the hit that made it
        self._heard = {}  # HP sequence -> arrival time, when the datagram came before the reply
        self._hits = 0

    async def join(self):
        await self.client.request(packets.QUEUE_RAID, {})
        found = await self.client.next_push("raid_found")
        self.raid_id = found["raid_id"]
        self.channel = RaidChannel(found)
        self.channel.on_hp = self._hp
        global_reactor.listenUDP(0, self.channel, interface="127.0.0.1")
        await self.channel.greet(global_reactor)
        await self.client.request(packets.RAID_READY, {"raid_id": self.raid_id})
        await self.client.next_push("raid_fight")

    def play(self, schedule):
        schedule.add(HITS_PER_SECOND, self.hit)
        schedule.add(MOVES_PER_SECOND, self.channel.position, 1.0, 2.0, 1)

    def hit(self):
        self._hits += 1
        number, sent = self._hits, time.monotonic()
        self._sent[number] = sent
        self.client.request(packets.RAID_HIT, {"raid_id": self.raid_id}).addCallbacks(
            self._replied, lambda f: self._sent.pop(number, None), callbackArgs=(number,))

    def _replied(self, reply, number):
        sent = self._sent.pop(number)
        arrived = self._heard.pop(reply[1]["sequence"], None)
        if arrived is None:
            self._waiting[reply[1]["sequence"]] = sent
        else:
            self._record(arrived - sent)

    def _hp(self, hp, sequence):
        now = time.monotonic()
        self.measure.datagrams += self.measure.measuring
        sent = self._waiting.pop(sequence, None)
        if sent is None:
            self._heard[sequence] = now
            if len(self._heard) > 1000:
                self._heard.clear()
        else:
            self._record(now - sent)

    def _record(self, seconds):
        if self.measure.measuring:
            self.measure.hits += 1
            self.measure.latencies.append(seconds * 1000)


class EchoPlayer(protocol.DatagramProtocol):
    """The same player against the baseline server: hits over TCP, each answered by a datagram."""

    def __init__(self, measure, server_udp):
        self.measure, self.server_udp = measure, server_udp
        self.tcp = None
        self._sent = {}
        self._hits = 0

    def play(self, schedule):
        schedule.add(HITS_PER_SECOND, self.hit)
        schedule.add(MOVES_PER_SECOND, self.transport.write, b"\0" * 31, self.server_udp)

    def hit(self):
        self._hits += 1
        self._sent[self._hits] = time.monotonic()
        self.tcp.transport.write(_HIT.pack(_HIT.size - 2, self._hits))

    def datagramReceived(self, data, address):
        if len(data) != _HP.size:
            return
        (number,) = _HP.unpack(data)
        sent = self._sent.pop(number, None)
        if sent is not None and self.measure.measuring:
            self.measure.hits += 1
            self.measure.datagrams += 1
            self.measure.latencies.append((time.monotonic() - sent) * 1000)


async def generate(reactor, arguments):
    """A load generator process: its players connect, then on "go" play; it reports one measured window."""
    measure = Measure()
    if arguments.mode == "raid":
        players = []
        for token in json.load(open(arguments.tokens)):
            client = await GameClient.login(reactor, "127.0.0.1", arguments.port, token)
            players.append(RaidPlayer(client, measure))
    else:
        players = []
        for _ in range(arguments.connections):
            player = EchoPlayer(measure, ("127.0.0.1", arguments.udp_port))
            udp = reactor.listenUDP(0, player, interface="127.0.0.1")
            player.tcp = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", arguments.port),
                                               protocol.Protocol())
            player.tcp.transport.write(struct.pack("<HI", 4, udp.getHost().port))
            players.append(player)
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    # The generator's own garbage collections would stall it for tens of
    # milliseconds and show up as the server's latency: it has none while
    # it measures (the servers under test keep theirs).
    gc.freeze()
    gc.disable()
    if arguments.mode == "raid":
        await gather([player.join() for player in players])
    schedule = Schedule()
    for player in players:
        player.play(schedule)
    schedule.start()
    await task.deferLater(reactor, 2, lambda: None)  # every player under way
    measure.measuring, started, cpu = True, time.time(), time.process_time()
    await task.deferLater(reactor, arguments.seconds, lambda: None)
    measure.measuring, ended, cpu = False, time.time(), time.process_time() - cpu
    print("done", json.dumps(measure.report(started, ended, cpu)), flush=True)
    os._exit(0)


class EchoHits(protocol.Protocol):
    """The baseline server's TCP side: each hit frame is answered with a datagram to the client's UDP port."""

    def connectionMade(self):
        self.udp_address, self._buffer = None, b""

    def dataReceived(self, data):
        data = self._buffer + data
        while len(data) >= _HIT.size:
            if self.udp_address is None:
                self.udp_address = ("127.0.0.1", struct.unpack_from("<I", data, 2)[0])
            else:
                self.factory.udp.transport.write(_HP.pack(_HIT.unpack_from(data)[1]), self.udp_address)
            data = data[_HIT.size:]
        self._buffer = data


def echo_server(reactor, tcp_port, udp_port):
    """A bare Twisted server: TCP hits in, UDP datagrams out, UDP moves counted and dropped."""
    udp = protocol.DatagramProtocol()
    reactor.listenUDP(udp_port, udp, interface="127.0.0.1")
    factory = protocol.Factory.forProtocol(EchoHits)
    factory.udp, factory.noisy = udp, False
    return TCP4ServerEndpoint(reactor, tcp_port, interface="127.0.0.1").listen(factory).addCallback(
        lambda _: defer.Deferred())


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(reactor, generators, server_pid, seconds):
    """Start the generators' window; C{(merged report, server CPU percent over the window)}."""
    await gather([g.ready for g in generators])
    samples = []
    sampler = task.LoopingCall(lambda: samples.append((time.time(), cpu_seconds(server_pid))))
    sampler.start(0.25)
    say(generators, "go")
    await gather([g.done for g in generators])
    sampler.stop()
    reports = [g.result for g in generators]
    started, ended = max(r["started"] for r in reports), min(r["ended"] for r in reports)
    inside = [(t, c) for t, c in samples if started <= t <= ended] or samples[-2:]
    cpu = (inside[-1][1] - inside[0][1]) / max(inside[-1][0] - inside[0][0], 1e-9) * 100
    latencies = [value for r in reports for value in r["latencies"]]
    return {"hits_per_second": round(sum(r["hits"] for r in reports) / seconds),
            "hp_datagrams_per_second": round(sum(r["datagrams"] for r in reports) / seconds),
            "p50_ms": round(percentile(latencies, 0.5), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
            "cpu_percent": round(cpu), "generators_cpu_percent": [r["cpu_percent"] for r in reports]}


async def main(reactor, quick, raids=None):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    raids = raids or (100 if quick else 500)
    seconds = 10.0 if quick else 30.0
    players = 2 * raids
    router, work, public, users, issued = await live_players(reactor, settings, players, {(0, 0): Item(101, 0, 1)})
    generators_count = max(1, len(os.sched_getaffinity(0)))
    shares = write_shares(work, "tokens", [i.token for i in issued], generators_count)
    me = os.path.abspath(__file__)
    prefix, mm = f"bench{random.getrandbits(32):x}", f"benchmm{random.getrandbits(32):x}"
    game_port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    # The boss does not fall and time does not run out during the run; the
    # clients keep to 5 hits a second themselves.
    game = start(reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME, "--game-listen",
                 f"tcp:{game_port}:interface=127.0.0.1", "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                 "--game-udp-port", "0", "--tokens-public-key", public, "--sync-prefix", prefix,
                 "--raids-matchmaking-prefix", mm, "--raids-boss-hp", "1000000000", "--raids-time-limit", "3600",
                 "--raids-ready-grace", "5", "--raids-hit-interval", "0.1",
                 "--game-ping-interval", "30", "--game-idle-timeout", "120",
                 executable=twistd, reports=False)
    echo_tcp, echo_udp = free_port(), free_port()
    echo = start(reactor, me, "--echo", str(echo_tcp), "--udp-port", str(echo_udp), reports=False)
    await listening(reactor, game_port)
    await listening(reactor, echo_tcp)

    raid = await run(reactor, [start(reactor, me, "--generate", "--mode", "raid", "--port", str(game_port),
                                     "--tokens", share, "--seconds", str(seconds)) for share in shares],
                     game.transport.pid, seconds)
    # The raids go on: stop their host before the baseline's clients take the ports its datagrams go to.
    game.transport.signalProcess("TERM")
    await game.exited
    baseline = await run(reactor, [start(reactor, me, "--generate", "--mode", "echo", "--port", str(echo_tcp),
                                         "--udp-port", str(echo_udp), "--connections",
                                         str(players // generators_count), "--seconds", str(seconds))
                                   for _ in shares], echo.transport.pid, seconds)
    echo.transport.signalProcess("TERM")
    await echo.exited
    await forget_players(reactor, router, settings, users, prefix, mm)

    print(json.dumps({"raids": raids, "players": players, "seconds": seconds, "raid": raid, "echo": baseline},
                     indent=1))
    print(json.dumps({
        "metric": "raid_hit_to_hp_datagram_p99_ms",
        "value": raid["p99_ms"],
        "baseline": baseline["p99_ms"],
        "unit": "ms from a hit sent over TCP to the boss-HP datagram with its result",
        "ratio": round(raid["p99_ms"] / baseline["p99_ms"], 2),
        "players": players,
        "hits_per_second": raid["hits_per_second"],
        "hp_datagrams_per_second": raid["hp_datagrams_per_second"],
        "p50_ms": raid["p50_ms"],
        "server_cpu_percent": raid["cpu_percent"],
        "generators_cpu_percent": raid["generators_cpu_percent"],
        "target_p99_ms": 20,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="100 raids for 10 s a measurement")
    parser.add_argument("--raids", type=int, help="this many raids instead (to find where the p99 turns)")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--udp-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["raid", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.echo:
        task.react(lambda reactor: echo_server(reactor, arguments.echo, arguments.udp_port))
    elif arguments.generate:
        task.react(lambda reactor: defer.ensureDeferred(generate(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick, arguments.raids)))
