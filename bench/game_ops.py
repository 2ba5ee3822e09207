"""
Requests per second a game server answers with 1,000 connected, authenticated
clients (quick; 2,000 in a full run), each with one request in flight, against
baselines under the same load in the same run:

- ping (no Redis) against a bare Twisted echo server echoing the same frames;
- an inventory move (one Lua script) against the same script called with
  EVALSHA through the router by as many concurrent callers, no game server
  in between.

Servers and load generators are separate processes started by this one, each
connecting before the clock starts: one server process per core on every side
(game, echo, raw callers), each with its share of the clients and a load
generator of its own.  The JSON also gives C{move_bound}: the move rate if a
move cost a game ping plus a raw call and nothing more, the most the shared
cores allow.  Needs the local cluster
(C{scripts/stack.sh up}).  The last line printed is the JSON result, its
C{ratio} the lower of the two.

    python bench/game_ops.py [--quick]
"""

import argparse
import json
import os
import platform
import random
import socket
import sys

from twisted.internet import defer, protocol, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from bench.children import ROOT, UNLIMITED_GAME, forget_players, live_players, say, start, write_shares
from dreamraid.config import load_settings
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.inventory import Inventory
from dreamraid.services.livestore import Item, LiveStore, data_keys, tab_key
from dreamraid.services.presence import presence_key
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.tables import load_tables

PING = packets.PING.encode(1, {"nonce": 7})
PONG = packets.PONG.encode(1, {"nonce": 7})
MOVES = [packets.MOVE_ITEM.encode(1, {"tab": 2, "from_slot": a, "to_slot": b}) for a, b in ((0, 1), (1, 0))]
# A move of the one item to the other, empty, slot changes two slots.
MOVED = packets.INVENTORY.encode(1, {"items": [
    {"tab": 2, "slot": s, "item_code": 301, "enhancement": 0, "count": 1} for s in (0, 1)]})


class Load(protocol.Protocol):
    """
    One client connection: authenticates if given a token, then keeps one
    request in flight and counts replies.  Every reply of a run has the same
    size, so counting is a division and each answer is one write: the
    generator stays cheaper than the servers it measures.
    """

    def __init__(self, token, requests, reply_size):
        self.token, self.requests, self.reply_size = token, requests, reply_size
        self.ready = defer.Deferred()
        self.replies = 0
        self.running = False
        self._pending = b""
        self.sent = 0  # requests sent; the next one is requests[sent % len(requests)]

    def connectionMade(self):
        if self.token is None:
            self.ready.callback(None)
        else:
            self.transport.write(packets.AUTHENTICATE.encode(1, {"token": self.token}))

    def dataReceived(self, data):
        if not self.ready.called:
            frame = packets.decode_frame(data)
            if frame.message is packets.AUTHENTICATED:
                self.ready.callback(None)
            else:
                self.ready.errback(RuntimeError(f"authentication failed: {frame.message.name} {frame.body}"))
            return
        data = self._pending + data
        count, left = divmod(len(data), self.reply_size)
        if count and data[2:4] != self.expected_id:
            raise RuntimeError(f"unexpected reply: {packets.decode_payload(data[2:2 + self.reply_size - 2])}")
        self._pending = data[len(data) - left:] if left else b""
        self.replies += count
        if self.running:
            for _ in range(count):
                self.send()

    def send(self):
        self.transport.write(self.requests[self.sent % len(self.requests)])
        self.sent += 1


async def connect_loads(reactor, arguments, connection=Load):
    """A generator's C{connection}s, connected and (given tokens) authenticated, for C{arguments.mode}."""
    tokens = json.load(open(arguments.tokens)) if arguments.tokens else [None] * arguments.connections
    if arguments.mode == "move":
        requests, reply = MOVES, MOVED
    else:
        requests, reply = [PING], PING if arguments.tokens is None else PONG
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", arguments.port, timeout=10)
    loads = []
    for token in tokens:
        load = connection(token, requests, len(reply))
        load.expected_id = reply[2:4]
        await connectProtocol(endpoint, load)
        loads.append(load)
    await gather([load.ready for load in loads])
    return loads


async def generate(reactor, arguments):
    """A load generator process: connect, report ready, run from "go" for the given seconds, report replies."""
    loads = await connect_loads(reactor, arguments)
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    for load in loads:
        load.running = True
        load.send()
    await task.deferLater(reactor, arguments.seconds, lambda: None)
    replies = sum(load.replies for load in loads)
    for load in loads:
        load.running = False
    print("done", json.dumps({"replies": replies}), flush=True)
    for load in loads:
        load.transport.loseConnection()


async def raw_evalsha(reactor, arguments):
    """The move script through the router, as many callers as clients, no game server."""
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    router = RedisCluster.from_settings(reactor, random.Random(2), settings.redis)
    router.startService()
    await router.refresh()
    move = Inventory(router, load_tables(settings.tables.path), reactor, random.Random(3)).scripts["move"]
    users = json.load(open(arguments.users))
    await move(data_keys(users[0]), [2, 0, 1])
    await move(data_keys(users[0]), [2, 1, 0])
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    stop_at = reactor.seconds() + arguments.seconds
    done = 0

    async def caller(user_id):
        nonlocal done
        keys, slots = data_keys(user_id), (0, 1)
        while reactor.seconds() < stop_at:
            await move(keys, [2, *slots])
            slots = slots[::-1]
            done += 1

    await gather([caller(u) for u in users])
    print("done", json.dumps({"replies": done}), flush=True)
    await router.stopService()


def echo(reactor, port):
    """A bare Twisted echo server."""
    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    factory = protocol.Factory.forProtocol(Echo)
    factory.noisy = False
    return TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory).addCallback(
        lambda _: defer.Deferred())


async def listening(reactor, port, seconds=30):
    """Wait until something accepts connections on C{port}."""
    for _ in range(int(seconds * 10)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            await task.deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError(f"nothing listens on {port}")


async def rate(reactor, generators, seconds):
    """Replies per second of a set of started children, from one "go"."""
    await gather([g.ready for g in generators])
    say(generators, "go")
    await gather([g.done for g in generators])
    return sum(g.result["replies"] for g in generators) / seconds


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def restore_sessions(reactor, router, users, issued):
    """
    Put every user back as a measurement starts: a game connection that
    closes ends its session, and the raw phase moves items, so each phase
    starts from the same live state, once the game server has let the last
    phase's users go (their leave would end the sessions claimed here).
    """
    for _ in range(300):
        if not sum(await gather([router.execute("EXISTS", presence_key(u)) for u in users])):
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    else:
        raise RuntimeError("the game server did not let the users go")
    await gather([router.transaction([("HDEL", tab_key(u, 2), 1), ("HSET", tab_key(u, 2), 0, "301:0:1")])
                  for u in users])
    live = LiveStore(router)
    await gather([live.claim_session(u, i.jti, 3600) for u, i in zip(users, issued)])


async def main(reactor, quick):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    clients = 1000 if quick else 2000
    seconds = 5.0 if quick else 15.0
    router, work, public, users, issued = await live_players(reactor, settings, clients, {(2, 0): Item(301, 0, 1)})
    # One server process per core on every side, each with its share of the
    # clients, driven by a load generator of its own.
    cores = len(os.sched_getaffinity(0))
    shares = [{"tokens": tokens, "users": users_file} for tokens, users_file in zip(
        write_shares(work, "tokens", [i.token for i in issued], cores), write_shares(work, "users", users, cores))]
    me = [os.path.abspath(__file__)]

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    prefix = f"bench{random.getrandbits(32):x}"
    game_ports, echo_ports = [free_port() for _ in range(cores)], [free_port() for _ in range(cores)]
    servers = [start(reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME, "--game-listen",
                     f"tcp:{port}:interface=127.0.0.1", "--game-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                     "--tokens-public-key", public, "--sync-prefix", prefix, "--game-udp-port", "0",
                     # No ping pushes during a run: replies are then all of one size.
                     "--game-ping-interval", "60", "--game-idle-timeout", "120",
                     executable=twistd, reports=False) for port in game_ports]
    servers += [start(reactor, *me, "--echo", str(port), reports=False) for port in echo_ports]
    for port in game_ports + echo_ports:
        await listening(reactor, port)

    def generators(ports, mode, with_tokens):
        return [start(reactor, *me, "--generate", "--port", str(port), "--mode", mode, "--seconds", str(seconds),
                      *(["--tokens", share["tokens"]] if with_tokens else ["--connections", str(clients // cores)]))
                for port, share in zip(ports, shares)]

    results = {"echo_ping": await rate(reactor, generators(echo_ports, "ping", False), seconds)}
    await restore_sessions(reactor, router, users, issued)
    results["game_ping"] = await rate(reactor, generators(game_ports, "ping", True), seconds)
    await restore_sessions(reactor, router, users, issued)
    results["raw_move"] = await rate(reactor, [
        start(reactor, *me, "--raw", "--users", share["users"], "--seconds", str(seconds)) for share in shares], seconds)
    await restore_sessions(reactor, router, users, issued)
    results["game_move"] = await rate(reactor, generators(game_ports, "move", True), seconds)
    for process in servers:
        process.transport.signalProcess("TERM")
    await gather([process.exited for process in servers])
    await forget_players(reactor, router, settings, users, prefix)

    ping_ratio = results["game_ping"] / results["echo_ping"]
    move_ratio = results["game_move"] / results["raw_move"]
    # On shared cores a move costs at least a game ping (the client and the
    # framing) plus a raw call (the router and Redis): the rate it would have
    # with nothing more, to read the ratio against.
    move_bound = 1 / (1 / results["game_ping"] + 1 / results["raw_move"])
    print(json.dumps({"clients": clients, "seconds": seconds, "server_processes": cores,
                      **{k: round(v) for k, v in results.items()}, "move_bound": round(move_bound),
                      "ping_ratio": round(ping_ratio, 3), "move_ratio": round(move_ratio, 3),
                      "move_ratio_bound": round(move_bound / results["raw_move"], 3)}, indent=1))
    print(json.dumps({
        "metric": "game_ops_requests_per_second",
        "value": round(results["game_move"]),
        "baseline": round(results["raw_move"]),
        "unit": "requests/s with one request in flight per client",
        "ping_ratio": round(ping_ratio, 3),
        "move_ratio": round(move_ratio, 3),
        "move_of_bound": round(results["game_move"] / move_bound, 3),
        "ratio": round(min(ping_ratio, move_ratio), 3),
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="1,000 clients for 5 s a measurement")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["ping", "move"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--users", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.echo:
        task.react(lambda reactor: echo(reactor, arguments.echo))
    elif arguments.generate:
        task.react(lambda reactor: defer.ensureDeferred(generate(reactor, arguments)))
    elif arguments.raw:
        task.react(lambda reactor: defer.ensureDeferred(raw_evalsha(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick)))
