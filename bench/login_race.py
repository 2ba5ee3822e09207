"""
Password guesses raced from one address against the login throttle: how
many passwords a session server checks, and how long it takes, when N
connections from one address each write K wrong passwords for one account in
one write, all in the same turn of the reactor (issue 19's figure: 40 x 5).

Starts its own session server (twistd C{dreamraid-session} on free loopback
ports, the shipped settings with a fresh key pair and sync and ranking key
prefixes of its own), registers one account, clears this address's login
count, sends the guesses and times them from the first write to the last
reply.  A guess answered C{WRONG_CREDENTIALS} had its password checked;
C{LOGIN_THROTTLED} did not.  The shipped per-connection limit (login=1/5)
lets each connection's 5 guesses through.  Needs the local stack
(C{scripts/stack.sh up}); the Redis keys it made are deleted at the end.
The last line printed is the JSON result.

    python bench/login_race.py [--connections 40] [--guesses 5]
"""

import argparse
import collections
import json
import os
import random
import sys
import tempfile

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from bench.children import ROOT, forget_players, start
from bench.game_ops import free_port, listening
from dreamraid.client import connect
from dreamraid.config import load_settings
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.deferreds import gather
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.tokens import create_key_pair

PASSWORD = "correct horse"
ANSWER_TIMEOUT = 60  # seconds: a run never hangs


class Guesser(FrameReceiver):
    """One connection: writes its guesses in one write; a Deferred of each answer's outcome name."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._waiting = {}

    def guesses(self, name, count):
        """The frames of C{count} wrong passwords for C{name}, and a Deferred of each answer."""
        frames, answers = [], []
        for request_id in range(1, count + 1):
            frames.append(packets.LOGIN.encode(request_id, {"name": name, "password": f"wrong-{request_id:03}"}))
            answers.append(self._waiting.setdefault(request_id, defer.Deferred()).addTimeout(ANSWER_TIMEOUT,
                                                                                               self._reactor))
        return b"".join(frames), answers

    def frameReceived(self, frame):
        if frame.request_id == 0 and frame.message is packets.PING:
            self.transport.write(packets.PONG.encode(0, frame.body))
        elif frame.request_id in self._waiting:
            told = ErrorCode(frame.body["code"]).name if frame.message is packets.ERROR else frame.message.name
            self._waiting.pop(frame.request_id).callback(told)

    def codecErrorReceived(self, error):
        raise RuntimeError(f"undecodable reply: {error}")


async def stop(reactor, server, seconds=10):
    """End the server with SIGTERM, or SIGKILL if it is still there after C{seconds}."""
    server.transport.signalProcess("TERM")
    for _ in range(seconds * 10):
        if server.exited.called:
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    server.transport.signalProcess("KILL")
    await server.exited


async def main(reactor, arguments):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    work = tempfile.mkdtemp(prefix="login-race-")
    private, public = os.path.join(work, "token.pem"), os.path.join(work, "token.pub")
    create_key_pair(private, public)
    tag = f"{random.getrandbits(32):08x}"
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = start(reactor, "-n", "--pidfile=", "dreamraid-session",
                   "--session-listen", f"tcp:{port}:interface=127.0.0.1",
                   "--session-http-listen", f"tcp:{free_port()}:interface=127.0.0.1",
                   "--tokens-private-key", private, "--tokens-public-key", public,
                   "--sync-prefix", f"race{tag}", "--sync-ranking-prefix", f"raceranking{tag}",
                   executable=twistd, reports=False)
    router = RedisCluster.from_settings(reactor, random.Random(), settings.redis)
    router.startService()
    users = []
    try:
        await router.refresh()
        await listening(reactor, port)
        sys.stderr.write(f"session server on {port}; registering one account\n")
        name = f"race_{tag}"
        client = await connect(reactor, "127.0.0.1", port)
        _, registered = await client.request(packets.REGISTER, {"name": name, "password": PASSWORD},
                                             timeout=ANSWER_TIMEOUT)
        client.close()
        users.append(registered["user_id"])
        await router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))
        guessers = await gather([connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Guesser(reactor))
                                 for _ in range(arguments.connections)])
        writes, answers = [], []
        for guesser in guessers:
            data, answered = guesser.guesses(name, arguments.guesses)
            writes.append((guesser, data))
            answers.extend(answered)
        sys.stderr.write(f"{arguments.connections} connections x {arguments.guesses} guesses\n")
        started = reactor.seconds()
        for guesser, data in writes:
            guesser.transport.write(data)
        told = collections.Counter(await gather(answers))
        seconds = reactor.seconds() - started
        for guesser in guessers:
            guesser.transport.loseConnection()
        result = {
            "connections": arguments.connections, "guesses": len(answers),
            "checked": told["WRONG_CREDENTIALS"], "throttled": told["LOGIN_THROTTLED"],
            "other": {k: v for k, v in told.items() if k not in ("WRONG_CREDENTIALS", "LOGIN_THROTTLED")},
            "seconds": round(seconds, 3),
            "limits": {"per_account": settings.accounts.failures_per_account,
                       "per_address": settings.accounts.failures_per_address},
        }
        await gather([router.execute("DEL", key) for key in (
            LoginThrottle.address_key("127.0.0.1"), LoginThrottle.account_key(name),
            f"raceranking{tag}:board", f"raceranking{tag}:names")])
    finally:
        await stop(reactor, server)
        await forget_players(reactor, router, settings, users, f"race{tag}")
    print(json.dumps(result))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--connections", type=int, default=40, help="connections from 127.0.0.1 (default 40)")
    parser.add_argument("--guesses", type=int, default=5, help="wrong passwords each writes at once (default 5)")
    return parser.parse_args()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parse_arguments())))
