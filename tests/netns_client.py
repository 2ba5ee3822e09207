"""
A client that tests run on the second host (inside the network namespace
that C{scripts/netns.sh} makes, through C{ip netns exec}), telling the test
what happens to it one line at a time on stdout.

    python -m tests.netns_client probe HOST PORT [--timeout S]
        One TCP connect with a deadline: prints "connected", "refused" (the
        other side's kernel answered: the link works) or "failed <error>";
        exits 0 for the first two, 1 otherwise.

    python -m tests.netns_client play --session HOST:PORT --name N --password P
                                      [--register] [--party] [--raid] [--raid-interface ADDR]
                                      [--heartbeat S] [--heartbeat-timeout S]
        Logs in through the session server, enters the world, authenticates
        at the game server ("authenticated user=ID game=HOST:PORT"), creates a
        party if asked ("party CODE"), queues for a raid if asked and joins it
        over TCP and UDP ("raid ID host=HOST:PORT udp=HOST:PORT hp=N"), waits
        for the fight and hits once ("hit damage=N hp=N fight_hp=N"), then pings the game server every
        --heartbeat seconds ("pong MS") until a ping goes unanswered for
        --heartbeat-timeout seconds or the connection closes ("lost WHY");
        with --heartbeat 0 it pings once, then waits for the connection to
        close, which is all the client library notices by itself.
        Then it logs in again, with backoff, until it can ("reconnecting",
        "attempt failed WHY", "authenticated again user=ID game=HOST:PORT"),
        says what became of its party ("party CODE" or "no party") and of its
        raid, by hitting again ("raid kept hp=N" or "no raid CODE_NAME"),
        prints "ready" and waits for a line on stdin: "quit" logs out ("bye").

The client library has no heartbeat of its own today (it answers the
server's pings but never notices a silent server); the pings here are that
heartbeat, for the test.
"""

import argparse
import socket
import sys

from twisted.internet import defer, stdio, task
from twisted.protocols.basic import LineReceiver

from dreamraid.client import ConnectionClosed, RemoteError, play
from dreamraid.client.session import host_port
from dreamraid.protocols import packets


def say(*words):
    """One line for the test on stdout."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def probe(host, port, timeout):
    """A TCP connect to C{host:port} within C{timeout} seconds: 0 if the other side answered, 1 if not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        say("refused")
        return 0
    except OSError as e:
        say("failed", repr(e))
        return 1
    say("connected")
    return 0


async def heartbeat(reactor, connection, interval, timeout):
    """
    Ping every C{interval} seconds until a ping fails; why it failed.  With
    C{interval} 0, one ping and no more: then only what the library notices
    by itself (the connection closing).
    """
    nonce = 0
    while True:
        nonce += 1
        started = reactor.seconds()
        try:
            await connection.request(packets.PING, {"nonce": nonce}, timeout=timeout)
        except defer.TimeoutError:
            return f"no pong in {timeout} s"
        except ConnectionClosed as e:
            return str(e)
        say("pong", round((reactor.seconds() - started) * 1000, 1))
        if not interval:
            await connection.closed
            return str(ConnectionClosed(*(connection.close_reason or ())))
        await task.deferLater(reactor, interval, lambda: None)


async def raid_begun(client, interface):
    """Queue (the party, or alone), join the raid formed, wait for the fight and hit once: the raid's id."""
    await client.queue_raid()
    raid = await client.next_raid(interface=interface)
    found = raid.channel.server
    say("raid", raid.raid_id, "host={}:{}".format(*client.address), "udp={}:{}".format(*found), f"hp={raid.hp}")
    fight = await raid.fight()
    hit = await raid.hit()
    say("hit", f"damage={hit.damage}", f"hp={hit.hp}", f"fight_hp={fight.hp}")
    return raid.raid_id


async def login_until_done(reactor, args, deadline):
    """Log in and authenticate again, backing off from 0.2 s to at most 1 s, until it works or C{deadline}."""
    host, port = host_port(args.session)
    wait = 0.2
    while True:
        try:
            return await play(reactor, host, port, args.name, args.password)
        except Exception as e:
            if reactor.seconds() > deadline:
                raise
            say("attempt failed", repr(e))
        await task.deferLater(reactor, wait, lambda: None)
        wait = min(wait * 2, 1.0)


class _Commands(LineReceiver):
    """The test's commands on stdin: the first line (or the end of stdin) fires C{line}."""

    delimiter = b"\n"

    def __init__(self):
        self.line = defer.Deferred()

    def lineReceived(self, line):
        if not self.line.called:
            self.line.callback(line.decode().strip())

    def connectionLost(self, reason):
        if not self.line.called:
            self.line.callback("")


async def play_through_a_cut(reactor, args):
    host, port = host_port(args.session)
    commands = _Commands()
    stdio.StandardIO(commands, reactor=reactor)
    client = await play(reactor, host, port, args.name, args.password, register=args.register)
    say("authenticated", f"user={client.user_id}", "game={}:{}".format(*client.address))
    if args.party:
        say("party", (await client.create_party()).code)
    raid_id = None
    if args.raid:
        raid_id = await raid_begun(client, args.raid_interface)
    say("lost", await heartbeat(reactor, client.connection, args.heartbeat, args.heartbeat_timeout))
    client.connection.transport.abortConnection()
    say("reconnecting")
    client = await login_until_done(reactor, args, reactor.seconds() + args.reconnect_for)
    say("authenticated again", f"user={client.user_id}", "game={}:{}".format(*client.address))
    party = await client.my_party()
    say(*(("party", party.code) if party else ("no party",)))
    if raid_id is not None:
        try:
            _, hit = await client.request(packets.RAID_HIT, {"raid_id": raid_id})
            say("raid kept", f"hp={hit['hp']}")
        except RemoteError as e:
            say("no raid", getattr(e.code, "name", e.code))
    say("ready")
    if await commands.line == "quit":
        await client.logout()
        say("bye")
    client.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.netns_client")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    g = commands.add_parser("play")
    g.add_argument("--session", required=True)
    g.add_argument("--name", required=True)
    g.add_argument("--password", required=True)
    g.add_argument("--register", action="store_true")
    g.add_argument("--party", action="store_true")
    g.add_argument("--raid", action="store_true")
    g.add_argument("--raid-interface", default="0.0.0.0", help="address the raid's UDP channel binds")
    g.add_argument("--heartbeat", type=float, default=0.5)
    g.add_argument("--heartbeat-timeout", type=float, default=1.5)
    g.add_argument("--reconnect-for", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(args.host, args.port, args.timeout)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(play_through_a_cut(reactor, args)))


if __name__ == "__main__":
    sys.exit(main())
