"""
Processes of a benchmark run: each connects first and prints "ready", waits
for a "go" line on its standard input, and ends with "done" and a JSON
object; servers print nothing and are only started and ended.
"""

import json
import os
import random
import sys
import tempfile
from typing import NamedTuple

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

from dreamraid.config import load_settings
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import LiveStore, Profile, data_keys, raid_mark_key, raid_receipt_key, session_key
from dreamraid.services.matchmaking import matchmaking_keys
from dreamraid.services.presence import away_key, handoff_key, presence_key
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.sync import SyncQueue
from dreamraid.services.tokens import TokenIssuer, create_key_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A bench's thousands of clients come from one address and send as fast as
# they are answered: its game servers run without the abuse limits.
UNLIMITED_GAME = ("--game-rate-limits", "off", "--game-frame-rate", "off", "--game-connections-per-address", "0")


class Child(protocol.ProcessProtocol):
    """A process of the run: "ready", then "go", then "done {json}"."""

    def __init__(self, reports):
        self.ready, self.done, self.exited = defer.Deferred(), defer.Deferred(), defer.Deferred()
        self.reports = reports
        self.result = None
        self._buffer = b""

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            word, _, rest = line.decode().partition(" ")
            if word == "ready":
                self.ready.callback(None)
            elif word == "done":
                self.result = json.loads(rest)
                self.done.callback(None)

    def errReceived(self, data):
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason):
        self.exited.callback(None)
        for waiting in (self.ready, self.done) if self.reports else ():
            if not waiting.called:
                waiting.errback(RuntimeError(f"a bench process ended early: {reason.value}"))


def start(reactor, *args, executable=sys.executable, reports=True):
    """Start C{executable args} in the project root; its L{Child}."""
    child = Child(reports)
    reactor.spawnProcess(child, executable, [executable, *args], env=None, path=ROOT)
    return child



class CommandLines(LineReceiver):
    """
    A generator's standard input and output: each command line is answered
    by one JSON line (L{answer}); a failed command ends the process so the
    parent's wait fails too, and so does the end of its input.
    """

    delimiter = b"\n"

    def answer(self, deferred):
        """Send what C{deferred} fires with as a JSON line."""
        deferred.addCallbacks(lambda told: self.sendLine(json.dumps(told).encode()), _fail)

    def connectionLost(self, reason):
        # The run is over: leave the connections to the kernel.
        os._exit(0)


def _fail(failure):
    failure.printTraceback()
    os._exit(1)


def say(children, word):
    """Send C{word} as a line to every child."""
    for child in children:
        child.transport.write(word.encode() + b"\n")


class Players(NamedTuple):
    """Users a benchmark made live: a started router, the work directory, the token public key, ids and tokens."""

    router: RedisCluster
    work: str
    public_key: str
    users: list
    issued: list


async def live_players(reactor, settings, count, items, chunk=2000, level=1):
    """
    C{count} users of C{level} with C{items} loaded live in Redis, each with
    a login token (of a fresh key pair) that is their live session;
    L{Players}.
    They are loaded C{chunk} at a time: with every call sent at once, past
    about 10,000 users the last ones queued outlast the router's deadline.
    """
    work = tempfile.mkdtemp(prefix="dreamraid-bench-")
    private, public = os.path.join(work, "token.pem"), os.path.join(work, "token.pub")
    create_key_pair(private, public)
    tokens = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"),
                           {("tokens", "private_key"): private, ("tokens", "public_key"): public}).tokens
    issuer = TokenIssuer(tokens, reactor, random.SystemRandom())
    router = RedisCluster.from_settings(reactor, random.Random(1), settings.redis)
    router.startService()
    await router.refresh()
    live = LiveStore(router)
    users = [random.randrange(10**15, 10**16) for _ in range(count)]
    issued = [issuer.issue(u) for u in users]
    for first in range(0, count, chunk):
        part = slice(first, first + chunk)
        await gather([live.load(Profile(u, f"b{u % 10**8}", level, 0, 0, 0, dict(items))) for u in users[part]])
        await gather([live.claim_session(u, i.jti, 3600) for u, i in zip(users[part], issued[part])])
    return Players(router, work, public, users, issued)


def write_shares(work, name, values, count):
    """
    Deal C{values} into C{count} shares (every C{count}th one), each written
    as JSON to C{work/NAME<i>.json} for a child process; their paths.
    """
    paths = []
    for i in range(count):
        paths.append(os.path.join(work, f"{name}{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(values[i::count], f)
    return paths


async def forget_players(reactor, router, settings, users, sync_prefix, matchmaking_prefix=None, extra_keys=()):
    """
    Delete what a benchmark's users left in Redis (sessions, presence, away
    marks and handoff tickets, raid marks and receipts, data), its sync
    streams, if given its matchmaking keys, and C{extra_keys}, a chunk at a
    time; then stop the router.
    """
    for first in range(0, len(users), 2000):
        await gather([router.execute("DEL", session_key(u), presence_key(u), away_key(u), handoff_key(u),
                                     raid_mark_key(u), raid_receipt_key(u), *data_keys(u))
                      for u in users[first:first + 2000]])
    if matchmaking_prefix is not None:
        await gather([router.execute("DEL", key) for key in matchmaking_keys(matchmaking_prefix)])
    await gather([router.execute("DEL", key) for key in extra_keys])
    await gather([router.execute("DEL", s) for s in SyncQueue(router, reactor, settings.sync.shards, sync_prefix).streams])
    await router.stopService()
