"""
What one raid member flooding valid (correctly signed) position datagrams
does to the game server and to another player: a raid of two on one game
server process with its shipped limits, one member (a process of its own)
sending positions as fast as one Python process can seal and send them,
the other pinging the server over TCP every PING_INTERVAL and hearing the
boss's HP over UDP.  Two windows of C{--seconds} each (10 by default):
without the flood (the baseline), then with it.  Reported per window: the
other player's ping p50/p99/max, the longest gap between the HP datagrams
it heard (no one hits: SPEC says at least one a second), and the server's
CPU; for the flood, the datagrams sent a second, what the server took and
dropped by reason (its /metrics), and the kernel's UDP receive-buffer drops
on the whole machine (what never reached the server).  Everything is on
127.0.0.1.  The last line printed is the JSON result: C{value} is the
ping p50 under flood, C{baseline} the p50 without it.  Extra game server
options go after C{--game}, e.g. C{--game --raids-datagram-rate off} to
see the flood without the per-member rate.  Needs the local cluster
(C{scripts/stack.sh up}).

    python bench/udp_flood.py [--seconds 10] [--game OPTION ...]
"""

import argparse
import hashlib
import json
import os
import platform
import random
import struct
import sys
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task, threads
from twisted.web.client import Agent, readBody

from bench.children import ROOT, forget_players, live_players, say, start
from bench.game_ops import free_port, listening
from bench.raid_load import cpu_seconds, percentile
from dreamraid.client.game import GameClient, RaidChannel
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather

ME = os.path.abspath(__file__)
# Within the game server's shipped rate limit of 20 requests a second.
PING_INTERVAL = 0.06
FLOOD_BODY = {"x": 1.0, "y": 2.0, "state": 1}


async def join_raid(reactor, client):
    """Queue C{client}, take its raid's channel, greet and report ready; the L{RaidChannel}."""
    await client.request(packets.QUEUE_RAID, {})
    found = await client.next_push("raid_found")
    channel = RaidChannel(found)
    reactor.listenUDP(0, channel, interface="127.0.0.1")
    await channel.greet(reactor)
    await client.request(packets.RAID_READY, {"raid_id": found["raid_id"]})
    return channel


def sealer(channel):
    """
    A function of a sequence number: the channel's position datagram with
    it, sealed with the member's key; what L{packets.seal_datagram} makes,
    for a fraction of its cost (only the header's sequence and the MAC
    change from one to the next).
    """
    head = struct.Struct("<HIBI")
    body = packets.POSITION.encode(channel.number, channel.member, 0, FLOOD_BODY)[packets.DATAGRAM_HEADER_SIZE:]
    key, message, number, member = channel.key, packets.POSITION.id, channel.number, channel.member
    blake2b, pack = hashlib.blake2b, head.pack

    def seal(sequence):
        data = pack(message, number, member, sequence) + body
        return data + blake2b(data, key=key, digest_size=packets.MAC_SIZE).digest()
    assert seal(7) == packets.seal_datagram(key, packets.POSITION, number, member, 7, FLOOD_BODY)
    return seal


async def flood(reactor, arguments):
    """
    The flooding member's process: joins the raid, prints "ready", and on
    "go" sends signed positions with rising sequences for the given
    seconds in a blocking loop, then prints "done" with how many it sent.
    """
    client = await GameClient.login(reactor, "127.0.0.1", arguments.port, arguments.token)
    channel = await join_raid(reactor, client)
    seal, send, server = sealer(channel), channel.transport.socket.sendto, channel.server
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    sequence = channel.sequence
    sent = refused = 0
    started = time.monotonic()
    deadline = started + arguments.seconds
    while time.monotonic() < deadline:
        for _ in range(1000):
            sequence += 1
            try:
                send(seal(sequence), server)
            except BlockingIOError:
                refused += 1
        sent += 1000
    print("done", json.dumps({"sent": sent - refused, "refused_by_own_kernel": refused,
                              "seconds": time.monotonic() - started}), flush=True)
    os._exit(0)


async def scrape(reactor, port):
    """C{{(name, reason): value}} of the server's UDP datagram counters."""
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
    text = (await readBody(response)).decode()  # noqa: the warning about abortConnection is harmless here
    return {(s.name, s.labels.get("reason")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("dreamraid_udp_datagrams")}


def kernel_udp_receive_drops():
    """The machine's count of UDP datagrams dropped for a full receive buffer (all sockets)."""
    with open("/proc/net/snmp") as snmp:
        names, values = [line.split() for line in snmp if line.startswith("Udp:")][:2]
    return int(values[names.index("RcvbufErrors")])


async def window(reactor, client, channel, server_pid, seconds):
    """Ping every PING_INTERVAL (or when the last pong came) for C{seconds}; the other player's and the server's figures."""
    hp_times = []
    channel.on_hp = lambda hp, sequence: hp_times.append(reactor.seconds())
    rtts = []
    cpu, started = cpu_seconds(server_pid), time.monotonic()
    end = reactor.seconds() + seconds
    while reactor.seconds() < end:
        # One at a time: the client matches a pong by its nonce.
        sent = reactor.seconds()
        rtts.append(await client.connection.ping() * 1000)
        await task.deferLater(reactor, max(0.0, sent + PING_INTERVAL - reactor.seconds()), lambda: None)
    cpu = (cpu_seconds(server_pid) - cpu) / (time.monotonic() - started) * 100
    channel.on_hp = None
    gaps = [later - earlier for earlier, later in zip(hp_times, hp_times[1:])]
    return {"pings": len(rtts), "ping_p50_ms": round(percentile(rtts, 0.5), 2),
            "ping_p99_ms": round(percentile(rtts, 0.99), 2), "ping_max_ms": round(max(rtts), 2),
            "hp_datagrams": len(hp_times), "longest_hp_gap_s": round(max(gaps), 3) if gaps else None,
            "server_cpu_percent": round(cpu)}


async def main(reactor, seconds, game_options):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    router, work, public, users, issued = await live_players(reactor, settings, 2, {})
    prefix, mm = f"bench{random.getrandbits(32):x}", f"benchmm{random.getrandbits(32):x}"
    game_port, http_port = free_port(), free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    # The shipped limits; the boss does not fall and time does not run out during the run.
    game = start(reactor, "-n", "--pidfile=", "dreamraid-game", "--game-listen",
                 f"tcp:{game_port}:interface=127.0.0.1", "--game-http-listen", f"tcp:{http_port}:interface=127.0.0.1",
                 "--game-udp-port", "0", "--tokens-public-key", public, "--sync-prefix", prefix,
                 "--raids-matchmaking-prefix", mm, "--raids-boss-hp", "1000000000", "--raids-time-limit", "3600",
                 *game_options, executable=twistd, reports=False)
    try:
        await listening(reactor, game_port)
        flooder = start(reactor, ME, "--flood", "--port", str(game_port), "--token", issued[0].token,
                        "--seconds", str(seconds))
        other = await GameClient.login(reactor, "127.0.0.1", game_port, issued[1].token)
        channel, _ = await gather([join_raid(reactor, other), flooder.ready])
        await other.next_push("raid_fight")
        await task.deferLater(reactor, 1, lambda: None)
        baseline = await window(reactor, other, channel, game.transport.pid, seconds)
        counters, kernel_drops = await scrape(reactor, http_port), kernel_udp_receive_drops()
        say([flooder], "go")
        flooded = await window(reactor, other, channel, game.transport.pid, seconds)
        await flooder.done
        after, kernel_drops = await scrape(reactor, http_port), kernel_udp_receive_drops() - kernel_drops
        await flooder.exited
        other.close()
    finally:
        game.transport.signalProcess("TERM")
        await game.exited
    await forget_players(reactor, router, settings, users, prefix, mm)

    sent = flooder.result
    moved = {key: after.get(key, 0) - counters.get(key, 0) for key in after}
    per_second = sent["seconds"]
    flooded.update({
        "flood_sent_per_second": round(sent["sent"] / per_second),
        "server_took_per_second": round(moved[("dreamraid_udp_datagrams_received_total", None)] / per_second),
        "server_dropped_per_second": {reason: round(value / per_second) for (name, reason), value in moved.items()
                                      if name == "dreamraid_udp_datagrams_dropped_total" and value},
        "kernel_receive_buffer_drops_per_second": round(kernel_drops / per_second),
    })
    print(json.dumps({"baseline": baseline, "flood": flooded}, indent=1))
    print(json.dumps({
        "metric": "other_player_ping_p50_under_udp_flood_ms",
        "value": flooded["ping_p50_ms"],
        "baseline": baseline["ping_p50_ms"],
        "unit": f"ms, p50 of another raid member's TCP pings (one every {PING_INTERVAL} s)",
        "p99_ms": flooded["ping_p99_ms"],
        "baseline_p99_ms": baseline["ping_p99_ms"],
        "server_cpu_percent": flooded["server_cpu_percent"],
        "baseline_server_cpu_percent": baseline["server_cpu_percent"],
        "flood_sent_per_second": flooded["flood_sent_per_second"],
        "game_options": game_options,
        "seconds": seconds,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window (default 10)")
    parser.add_argument("--game", nargs=argparse.REMAINDER, default=[], help="extra game server options, last")
    parser.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.flood:
        task.react(lambda reactor: defer.ensureDeferred(flood(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.seconds, arguments.game)))
