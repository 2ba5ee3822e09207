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
                                      [--heartbeat-idle S] [--heartbeat-answer S]
        A player through the client library, nothing by hand: it logs in
        through the session server, enters the world and authenticates at
        the game server with the library's heartbeat (--heartbeat-idle and
        --heartbeat-answer, the library's own by default) and reconnect on
        ("authenticated user=ID game=HOST:PORT"), creates a party if asked
        ("party CODE"), queues for a raid if asked, joins it over TCP and
        UDP ("raid ID host=HOST:PORT udp=HOST:PORT hp=N"), waits for the
        fight and hits once ("hit damage=N hp=N fight_hp=N").  It then says
        "playing" and waits for the library to lose the connection and get
        the player back, printing its events as they come: "lost WHY" (the
        connection it lost, and the reason the server gave for closing it,
        if one came), "reconnecting attempt=N delay=S" before each attempt,
        then "resumed user=ID party=CODE raid=ID hp=N score=N" (what the
        server kept), or "entered again ..." (the session was gone) or
        "reconnect failed WHY" (the library gave up; the client exits 1).
        In a raid it then waits until the raid's UDP channel hears the boss
        under its new key ("udp again hp=N"), hits until the boss is down
        ("hits count=N damage=N hp=0"), waits for the last HP datagram
        ("udp hp=0") and for the result ("result cleared=B score=N
        team_score=N exp_gained=N level=N best=N").  Last it reads its party
        ("party CODE" or "no party"), prints "ready" and waits for a line on
        stdin: "quit" logs out ("bye").
"""

import argparse
import socket
import sys

from twisted.internet import defer, stdio, task
from twisted.protocols.basic import LineReceiver

from dreamraid.client import play
from dreamraid.client.connection import HEARTBEAT_ANSWER, HEARTBEAT_IDLE
from dreamraid.client.session import host_port


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


async def raid_begun(client, interface):
    """Queue (the party, or alone), join the raid formed, wait for the fight and hit once: the L{Raid}."""
    await client.queue_raid()
    raid = await client.next_raid(interface=interface)
    found = raid.channel.server
    say("raid", raid.raid_id, "host={}:{}".format(*client.address), "udp={}:{}".format(*found), f"hp={raid.hp}")
    fight = await raid.fight()
    hit = await raid.hit()
    say("hit", f"damage={hit.damage}", f"hp={hit.hp}", f"fight_hp={fight.hp}")
    return raid


def back_again(client):
    """
    Print the library's reconnect events as they come; a Deferred that
    fires once the player is back (resumed or entered again) and fails if
    the library gave up.
    """
    back, lost = defer.Deferred(), client.connection

    def reconnecting(attempt, delay):
        if attempt == 1:
            reason = lost.close_reason
            say("lost", "closed by the server:" if reason else "closed without a reason from the server",
                *([getattr(reason[0], "name", reason[0])] if reason else []))
        say("reconnecting", f"attempt={attempt}", f"delay={delay:.2f}")

    def resumed(record):
        say("resumed", f"user={record.player.user_id}", f"party={record.party_code or '-'}",
            f"raid={record.raid_id or '-'}", f"hp={record.boss_hp}", f"score={record.score}")
        back.callback(record)

    def entered_again(player):
        say("entered again", f"user={player.user_id}")
        back.callback(None)

    def failed(error):
        say("reconnect failed", repr(error))
        back.errback(error)

    client.on("reconnecting", reconnecting)
    client.on("resumed", resumed)
    client.on("entered_again", entered_again)
    client.on("reconnect_failed", failed)
    return back


def heard_under_a_new_key(channel):
    """A Deferred of the first boss HP the raid's UDP channel hears under a key other than today's."""
    heard, key = defer.Deferred(), channel.key

    def on_hp(hp, _):
        if channel.key != key and not heard.called:
            channel.on_hp = None
            heard.callback(hp)
    channel.on_hp = on_hp
    return heard


async def fight_on(raid):
    """After the resume: hit until the boss is down, then the raid's result and its last HP datagram."""
    count = damage = 0
    hp = raid.hp
    while hp > 0:
        hit = await raid.hit()
        count, damage, hp = count + 1, damage + hit.damage, hit.hp
    say("hits", f"count={count}", f"damage={damage}", f"hp={hp}")
    say("udp", f"hp={await raid.channel.when_hp(lambda hp: hp == 0)}")  # before the result closes the channel
    result = await raid.result()
    say("result", f"cleared={result.cleared}", f"score={result.score}", f"team_score={result.team_score}",
        f"exp_gained={result.exp_gained}", f"level={result.level}", f"best={result.best}")


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
    client = await play(reactor, host, port, args.name, args.password, register=args.register, reconnect=True,
                        heartbeat=(args.heartbeat_idle, args.heartbeat_answer))
    say("authenticated", f"user={client.user_id}", "game={}:{}".format(*client.address))
    if args.party:
        say("party", (await client.create_party()).code)
    raid = await raid_begun(client, args.raid_interface) if args.raid else None
    back = back_again(client)
    heard = heard_under_a_new_key(raid.channel) if raid is not None else None
    say("playing")
    try:
        await back
    except Exception:
        client.close()
        return 1
    if raid is not None:
        say("udp again", f"hp={await heard}")
        await fight_on(raid)
    party = await client.my_party()
    say(*(("party", party.code) if party else ("no party",)))
    say("ready")
    if await commands.line == "quit":
        await client.logout()
        say("bye")
    client.close()
    return 0


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
    g.add_argument("--heartbeat-idle", type=float, default=HEARTBEAT_IDLE,
                   help="seconds of silence before the library pings the server")
    g.add_argument("--heartbeat-answer", type=float, default=HEARTBEAT_ANSWER,
                   help="seconds the library then waits for the answer before it takes the link for dead")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(args.host, args.port, args.timeout)

    async def run(reactor):
        code = await play_through_a_cut(reactor, args)
        if code:
            raise SystemExit(code)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    sys.exit(main())
