"""
Scripted players: C{dreamraid-bots --players N --scenario raid} registers N
new accounts on the session server, logs each in, enters the world, hunts,
enhances a weapon, queues for a raid, fights it over TCP and UDP, reads the
ranking and logs out; then prints what happened.

Scenarios: C{raid} (all of the above) and C{hunt} (no raid).  A bot without
a weapon asks for one with the development grant when the game server
allows it, and otherwise enhances only a weapon a hunt dropped.  A bot that
no raid takes within C{--queue-timeout} seconds (an odd one out, with raids
of two) cancels and goes on.
"""

import argparse
import collections
import random
import sys
from typing import NamedTuple

from twisted.internet import defer, task
from twisted.internet.error import ConnectError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from dreamraid.client import ConnectionClosed, OutcomeUnknown, RaidEndedAway, RaidNotStarted, RemoteError, play
from dreamraid.client.game import as_advertised
from dreamraid.client.session import host_port, listen_address
from dreamraid.config import ConfigError, DEFAULT_PATH, load_settings
from dreamraid.errors import ErrorCode

WEAPON = 101  # the bronze sword of the shipped tables
MONSTER = 3
EQUIPMENT_TAB = 0


class BotReport(NamedTuple):
    """What one bot did."""

    name: str
    level: int
    hunts: int
    enhanced: int  # the weapon's enhancement at the end, -1 with no weapon
    raid: str  # "cleared", "failed", "unmatched", "away" (it ended while the bot was cut off) or "" (not queued)
    score: int
    rank: int  # the place on the board after the raid, 0 if not on it
    error: str  # the failure that stopped the bot, or ""
    reconnects: int = 0  # times the client came back after its link dropped


class Bot:
    """
    One scripted player; the clock paces it as a person would be paced
    (cooldowns, hit interval).  Its client reconnects by itself after a
    drop; a change cut by the drop (L{OutcomeUnknown}) is looked at before
    it is tried again: a hunt is done again only if the player's exp, as the
    server gave it back, shows it did not land (so every bot still hunts
    its number of times and stays in one matchmaking group), a queue is
    sent again (already queued is fine), and a hit is simply not counted.

    C{progress(name, stage)}, if given, hears the bot reach each stage:
    C{"entered"} (logged in, playing), C{"fighting"} (its raid's fight
    began) and C{"done"}.
    """

    def __init__(self, reactor, session, name, hunts, scenario, queue_timeout, route=as_advertised, progress=None):
        self._reactor = reactor
        self._session = session
        self.name = name
        self._hunts = hunts
        self._scenario = scenario
        self._queue_timeout = queue_timeout
        self._route = route
        self._progress = progress or (lambda name, stage: None)
        self.game = None
        self.reconnects = 0
        self._told = None  # (level, exp) as the server last told it

    def _wait(self, seconds):
        return task.deferLater(self._reactor, seconds, lambda: None)

    def _came_back(self, *_):
        self.reconnects += 1

    async def run(self):
        """Play the scenario; a L{BotReport}, with C{error} set if something went wrong."""
        level, hunts, enhanced, raid, score, rank = 1, 0, -1, "", 0, 0
        try:
            host, port = self._session
            self.game = await play(self._reactor, host, port, self.name, f"pw-{self.name}", register=True,
                                   route=self._route)
            self.game.on("resumed", self._came_back)
            self.game.on("entered_again", self._came_back)
            self._told = (self.game.player.level, self.game.player.exp)
            self._progress(self.name, "entered")
            # Every bot hunts the same kind, so they reach the same level and
            # so the same matchmaking group.
            for _ in range(self._hunts):
                level = await self._hunt(MONSTER)
                hunts += 1
            enhanced = await self._enhance()
            if self._scenario == "raid":
                raid, score = await self._raid()
                rank = (await self.game.my_rank()).rank
            await self._logout()
            return BotReport(self.name, level, hunts, enhanced, raid, score, rank, "", self.reconnects)
        except Exception as e:  # a bot reports whatever stopped it; the others play on
            if self.game is not None:
                self.game.close()
            return BotReport(self.name, level, hunts, enhanced, raid, score, rank, f"{type(e).__name__}: {e}",
                             self.reconnects)
        finally:
            self._progress(self.name, "done")

    async def _hunt(self, monster):
        """Hunt once (waiting out the cooldown; again if a drop cut it before it landed); the level after."""
        while True:
            try:
                hunted = await self.game.hunt(monster)
                self._told = (hunted.level, hunted.exp)
                return hunted.level
            except RemoteError as e:
                if e.code is not ErrorCode.HUNT_COOLDOWN:
                    raise
            except OutcomeUnknown:
                await self.game.my_rank()  # a read: answered once the client is back, with the player as it is now
                now = (self.game.player.level, self.game.player.exp)
                if now != self._told:  # the exp moved: the hunt landed
                    self._told = now
                    return now[0]
            await self._wait(0.25)

    async def _weapons(self):
        return [i for i in await self.game.inventory() if i.tab == EQUIPMENT_TAB]

    async def _enhance(self):
        """Enhance the first weapon twice (granting one if allowed); its enhancement, or -1 with none."""
        weapons = await self._weapons()
        while not weapons:
            try:
                weapons = await self.game.grant(WEAPON, 1)
            except RemoteError as e:
                if e.code is not ErrorCode.GRANT_DISABLED:
                    raise
                return -1
            except OutcomeUnknown:
                weapons = await self._weapons()  # granted or not: look
        slot = weapons[0].slot
        enhancement = weapons[0].enhancement
        for _ in range(2):
            try:
                enhancement = (await self.game.enhance(slot)).enhancement
            except RemoteError as e:
                if e.code is not ErrorCode.MAX_ENHANCEMENT:
                    raise
            except OutcomeUnknown:
                enhancement = next(w.enhancement for w in await self._weapons() if w.slot == slot)
        return enhancement

    async def _until_landed(self, request, landed_code):
        """
        Make C{request()} until it lands: a change cut by a drop
        (OutcomeUnknown) is made again, and the refusal C{landed_code} says
        an earlier one had landed.
        """
        while True:
            try:
                await request()
                return
            except RemoteError as e:
                if e.code is not landed_code:
                    raise
                return
            except OutcomeUnknown:
                continue

    def _queue(self):
        return self._until_landed(self.game.queue_raid, ErrorCode.ALREADY_QUEUED)

    def _cancel_queue(self):
        return self._until_landed(self.game.cancel_queue, ErrorCode.NOT_QUEUED)

    async def _next_raid(self):
        """The raid, once matched and ready; a raid_ready cut by a drop is sent again when the raid is found again."""
        while True:
            try:
                return await self.game.next_raid()
            except OutcomeUnknown:
                continue  # resumed in the raid, the player is told of it again

    async def _raid(self):
        """Queue, fight until the boss falls or time runs out; (how it ended, this bot's score)."""
        await self._queue()
        found = defer.Deferred.fromCoroutine(self._next_raid())
        found.addTimeout(self._queue_timeout, self._reactor)
        try:
            raid = await found
        except defer.TimeoutError:
            await self._cancel_queue()
            return "unmatched", 0
        except RaidNotStarted:
            return "failed", 0
        ended = defer.Deferred.fromCoroutine(raid.result())
        began = defer.Deferred.fromCoroutine(raid.fight())
        began.addCallback(lambda fight: self._progress(self.name, "fighting"))
        # A raid whose host stops before the fight sends only its result.
        either = defer.DeferredList([began, ended], fireOnOneCallback=True)
        began.addErrback(lambda failure: None)  # a raid lost, a client that gave up: the result says so too
        await either
        try:
            while not ended.called:
                try:
                    await raid.hit()
                except RemoteError as e:
                    if e.code not in (ErrorCode.HIT_TOO_SOON, ErrorCode.RAID_NOT_FIGHTING, ErrorCode.NOT_IN_RAID):
                        raise
                except OutcomeUnknown:
                    pass  # landed or not, the next hit goes on
                raid.move(random.uniform(0, 10), random.uniform(0, 10))
                await self._wait(0.2)
        except Exception:
            # What stopped the hits (a client that gave up: ConnectionClosed) is the bot's error, not the result's.
            if not ended.called:
                ended.cancel()
            ended.addErrback(lambda failure: None)
            raise
        try:
            outcome = await ended
        except RaidEndedAway:
            return "away", 0
        return ("cleared" if outcome.cleared else "failed"), outcome.score

    async def _logout(self):
        """Log out; a link that drops meanwhile ends the session all the same (the server lets the player go)."""
        try:
            await self.game.logout()
        except ConnectionClosed:
            self.game.close()


class Summary(NamedTuple):
    reports: list
    ranking: list  # RankEntry, the board's top after the bots played

    def lines(self):
        count = collections.Counter(r.raid for r in self.reports if r.raid)
        failed = [r for r in self.reports if r.error]
        yield (f"bots: {len(self.reports)} played, {len(failed)} failed; raids: {count['cleared']} players cleared, "
               f"{count['failed']} failed, {count['unmatched']} unmatched"
               + (f", {count['away']} ended while cut off" if count["away"] else "")
               + (f"; reconnected {sum(r.reconnects for r in self.reports)} times"
                  if any(r.reconnects for r in self.reports) else ""))
        for r in self.reports:
            weapon = f"+{r.enhanced}" if r.enhanced >= 0 else "none"
            yield (f"  {r.name:<20} level {r.level:>2}  hunts {r.hunts}  weapon {weapon:<4}  "
                   f"raid {r.raid or '-':<9} score {r.score:>3}  rank {r.rank or '-'}"
                   + (f"  error: {r.error}" if r.error else ""))
        yield "ranking:"
        for entry in self.ranking:
            yield f"  {entry.rank:>3}. {entry.name:<20} {entry.score}"


async def run_bots(reactor, session, players, scenario="raid", hunts=3, queue_timeout=45.0, route=as_advertised,
                   progress=None):
    """
    Run C{players} bots against the session server at C{session} (host,
    port); a L{Summary}.  C{route} is the game clients' (docs/client.md: to
    play through a proxy); C{progress} hears each bot's stages (L{Bot}).
    """
    tag = f"{random.getrandbits(32):08x}"
    bots = [Bot(reactor, session, f"bot_{tag}_{i}", hunts, scenario, queue_timeout, route, progress)
            for i in range(players)]
    reports = await defer.gatherResults([defer.Deferred.fromCoroutine(b.run()) for b in bots])
    ranking = []
    try:
        reader = await play(reactor, *session, f"bot_{tag}_board", f"pw-bot_{tag}_board", register=True)
        ranking = await reader.ranking(1, 10)
        await reader.logout()
    except (RemoteError, ConnectionClosed, ConnectError):
        pass  # the summary says the board could not be read: it is empty
    return Summary(reports, ranking)


async def wait_for(reactor, host, port, seconds):
    """Wait until something accepts connections at host:port (the servers may still be starting)."""
    for _ in range(int(seconds * 4)):
        try:
            connection = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=1), Protocol())
            connection.transport.loseConnection()
            return
        except ConnectError:
            await task.deferLater(reactor, 0.25, lambda: None)
    raise SystemExit(f"dreamraid-bots: nothing answers at {host}:{port}")


def session_address(text, config):
    """C{(host, port)} from C{host:port}, or the session server's listen address in the configuration."""
    return host_port(text) if text else listen_address(load_settings(config).session.listen)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dreamraid-bots", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--players", type=int, default=4, help="how many bots (default 4)")
    parser.add_argument("--scenario", choices=["raid", "hunt"], default="raid")
    parser.add_argument("--hunts", type=int, default=3, help="hunts per bot (default 3)")
    parser.add_argument("--session", help="the session server, host:port (default: from the configuration)")
    parser.add_argument("--config", default=str(DEFAULT_PATH), help="the configuration file")
    parser.add_argument("--queue-timeout", type=float, default=45.0,
                        help="seconds a bot waits for a raid (default 45: past the 30 s the matchmaking widens after)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the session server to start")
    arguments = parser.parse_args(argv)
    try:
        session = session_address(arguments.session, arguments.config)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))

    async def run(reactor):
        if arguments.wait:
            await wait_for(reactor, *session, arguments.wait)
        summary = await run_bots(reactor, session, arguments.players, arguments.scenario, arguments.hunts,
                                 arguments.queue_timeout)
        for line in summary.lines():
            print(line, flush=True)
        if any(r.error for r in summary.reports):
            raise SystemExit(1)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
