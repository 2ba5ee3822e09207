"""Scripted players against a real session server and game server, directly and through the fault proxy that cuts them."""

import collections
import gc
import random

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.trial.unittest import TestCase

from dreamraid import bots
from dreamraid.bots import Bot, main, run_bots, session_address
from dreamraid.client import GameClient, OutcomeUnknown, Raid, RemoteError
from dreamraid.client.reconnect import BACKOFF_CAP
from dreamraid.client.results import Enhanced, Hunted, Player, Rank, SlotItem
from dreamraid.protocols import packets
from tests.test_client_reconnect import FIGHT, FOUND, HEARTBEAT, USER, FakeServer
from dreamraid.errors import ErrorCode
from dreamraid.faultproxy import ABORT, FaultProxy, Faults
from tests.support import CONFIG
from tests.test_client_library import ServersCase


class BotsTests(ServersCase):

    async def test_four_bots_raid_and_are_ranked(self):
        """Four bots each hunt, enhance a granted weapon, clear a raid of two and log out; the board ranks them."""
        summary = await run_bots(reactor, ("127.0.0.1", self.session.port), 4, hunts=2)
        self.assertEqual([r.error for r in summary.reports], [""] * 4)
        self.assertEqual({r.raid for r in summary.reports}, {"cleared"})
        self.assertTrue(all(r.hunts == 2 and r.enhanced >= 1 for r in summary.reports))
        self.assertEqual(len({r.level for r in summary.reports}), 1)  # the same hunts: one level, one matchmaking group
        self.assertEqual(sum(r.score for r in summary.reports), 2 * 4)  # two raids, a boss of 4 HP each
        self.assertTrue(all((r.rank > 0) == (r.score > 0) for r in summary.reports))
        self.assertTrue(summary.ranking)
        self.assertEqual(summary.ranking, sorted(summary.ranking, key=lambda e: (e.rank, -e.score)))
        text = "\n".join(summary.lines())
        self.assertIn("bots: 4 played, 0 failed; raids: 4 players cleared, 0 failed, 0 unmatched", text)

    async def test_odd_bot_out_cancels_and_goes_on(self):
        """With raids of two, a lone bot is not matched: it cancels its ticket after the timeout and logs out."""
        summary = await run_bots(reactor, ("127.0.0.1", self.session.port), 1, hunts=1, queue_timeout=0.5)
        [report] = summary.reports
        self.assertEqual((report.raid, report.error), ("unmatched", ""))

    def test_session_address(self):
        self.assertEqual(session_address("10.0.0.5:7000", CONFIG), ("10.0.0.5", 7000))
        self.assertEqual(session_address(None, CONFIG), ("127.0.0.1", 9091))

    def test_bad_arguments_exit_with_usage(self):
        with self.assertRaises(SystemExit) as exited:
            main(["--session", "host:notaport"])
        self.assertEqual(exited.exception.code, 2)


class CutHuntGame:
    """
    A game client as a bot sees it, whose first hunt is cut by a drop: the
    server carried it out (C{landed}) or not; C{player} is what the client
    was told once back.
    """

    def __init__(self, landed):
        self.landed = landed
        self.player = Player(1, "bot", 1, 0)
        self.hunts = 0  # hunts the server carried out
        self.sent = 0

    async def hunt(self, monster):
        self.sent += 1
        if self.sent == 1:
            if self.landed:
                self.hunts += 1
                self.player = Player(1, "bot", 2, 1)  # as the resume tells it
            raise OutcomeUnknown("hunt")
        self.hunts += 1
        return Hunted(1, 1 + self.hunts, self.hunts, 1, ())

    async def my_rank(self):
        return Rank(0, 0)


class BotCutTests(TestCase):
    """What a bot does with a change a drop cut, on a fake client and a task.Clock."""

    def hunt_once(self, landed):
        clock = task.Clock()
        bot = Bot(clock, ("127.0.0.1", 1), "bot", 1, "hunt", 1.0)
        bot.game = CutHuntGame(landed)
        bot._told = (1, 0)
        d = defer.ensureDeferred(bot._hunt(3))
        clock.advance(0.25)
        return bot.game, self.successResultOf(d)

    def test_a_cut_hunt_that_landed_is_not_hunted_again(self):
        """The exp the server gave back moved: that hunt counts, and no second one is sent."""
        game, level = self.hunt_once(landed=True)
        self.assertEqual((game.sent, game.hunts, level), (1, 1, 2))

    def test_a_cut_hunt_that_did_not_land_is_hunted_again(self):
        game, level = self.hunt_once(landed=False)
        self.assertEqual((game.sent, game.hunts, level), (2, 1, 2))

    def test_other_refusals_still_stop_the_hunt(self):
        clock = task.Clock()
        bot = Bot(clock, ("127.0.0.1", 1), "bot", 1, "hunt", 1.0)
        bot.game = CutHuntGame(landed=False)

        async def refused(monster):
            raise RemoteError(ErrorCode.UNKNOWN_MONSTER, "no")
        bot.game.hunt = refused
        self.failureResultOf(defer.ensureDeferred(bot._hunt(9)), RemoteError)


class GivingUpGame(GameClient):
    """
    A real game client on an in-memory server, as a bot sees it: the steps
    before the raid answer at once, and next_raid gives raid r1 (with no UDP
    port), so the bot comes to wait on the raid's fight and result.
    """

    async def inventory(self):
        return [SlotItem(0, 0, 101, 0, 1)]

    async def enhance(self, slot):
        return Enhanced(slot, True, 1)

    async def queue_raid(self):
        return 1

    async def my_rank(self):
        return Rank(0, 0)

    async def next_raid(self, interface="127.0.0.1"):
        raid = Raid(self, FOUND)
        self._in_raid[raid.raid_id] = raid
        self._remember(raid.raid_id, "found")
        return raid


class BotGivesUpTests(TestCase):
    """A bot whose client gives up reconnecting mid-raid reports an error, and run_bots finishes; on a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.server = FakeServer(self.clock)
        self.game = GivingUpGame(self.clock, self.server.client, ("127.0.0.1", 9090), USER, rng=random.Random(3),
                                 heartbeat=HEARTBEAT, give_up_after=30)
        self.game.player = Player(USER, "bot", 1, 0)
        self.game._connect = lambda host, port: defer.fail(ConnectionRefusedError())
        self.stages = []
        games = [self.game]

        async def play(*args, **kwargs):
            if not games:
                raise ConnectError("the board reader: no server here")
            return games.pop()
        self.patch(bots, "play", play)

    def run_until_given_up(self, fought):
        summary = defer.ensureDeferred(run_bots(self.clock, ("127.0.0.1", 1), 1, hunts=0,
                                                progress=lambda name, stage: self.stages.append(stage)))
        self.assertIn("entered", self.stages)
        if fought:
            self.server.client.dataReceived(packets.RAID_FIGHT.encode(0, FIGHT))
            self.assertIn("fighting", self.stages)
        self.server.drop()
        for _ in range(10):
            self.clock.advance(BACKOFF_CAP)
        [report] = self.successResultOf(summary).reports
        self.assertEqual(self.stages[-1], "done")
        return report

    def test_giving_up_before_the_fight_is_the_bots_error(self):
        """The raid's fight and result waits fail with the give-up: the bot reports ConnectionClosed."""
        report = self.run_until_given_up(fought=False)
        self.assertTrue(report.error.startswith("ConnectionClosed"), report.error)
        self.assertEqual(report.raid, "")

    def test_giving_up_while_hitting_is_the_bots_error(self):
        """A hit after the give-up raises at once: the bot reports it, and the failed result is not left unhandled."""
        report = self.run_until_given_up(fought=True)
        self.assertTrue(report.error.startswith("ConnectionClosed"), report.error)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class BotsThroughCutsTests(ServersCase):
    """
    Bots whose game traffic (TCP and UDP) crosses the fault proxy, which
    resets every connection twice: once all are playing, once all are
    fighting.  The game server keeps a cut player away for 30 s.
    """

    timeout = 120
    BOTS, BOSS_HP = 8, 240
    game_options = ("--game-resume-grace", "30", "--raids-boss-hp", str(BOSS_HP))

    def proxied_route(self):
        """A fault proxy in front of the game server, TCP and UDP; the proxy, its TCP forwarder, and the route."""
        udp_host, _, udp_port = self.game.part("RaidHost").udp_address.rpartition(":")
        proxy = FaultProxy(reactor, random.Random(20), Faults())
        tcp = proxy.tcp(0, "127.0.0.1", self.game.port)
        udp = proxy.udp(0, udp_host, int(udp_port))
        proxy.startService()
        self.addCleanup(proxy.stopService)
        routes = {("tcp", ("127.0.0.1", self.game.port)): ("127.0.0.1", tcp.port),
                  ("udp", (udp_host, int(udp_port))): ("127.0.0.1", udp.port)}
        return proxy, tcp, lambda kind, address: routes.get((kind, address), address)

    async def test_bots_play_on_through_cuts_and_their_raids_clear(self):
        """
        Eight bots through the proxy: every connection is reset once all
        eight are logged in (hunting), and again once all eight are
        fighting their raids.  Each bot comes back by itself twice or more,
        none fails, each hunts its number of times (one level, one group),
        and all four raids clear with the boss's whole HP scored.
        """
        proxy, tcp, route = self.proxied_route()
        reached = collections.Counter()
        cuts = []

        def progress(name, stage):
            reached[stage] += 1
            if stage in ("entered", "fighting") and reached[stage] == self.BOTS:
                cuts.append(stage)
                reactor.callLater(0, proxy.cut, ABORT)
        summary = await run_bots(reactor, ("127.0.0.1", self.session.port), self.BOTS, hunts=3, route=route,
                                 progress=progress)
        text = "\n".join(summary.lines())
        self.assertEqual(cuts, ["entered", "fighting"], text)
        self.assertEqual([r.error for r in summary.reports], [""] * self.BOTS, text)
        self.assertEqual([r.raid for r in summary.reports], ["cleared"] * self.BOTS, text)
        self.assertTrue(all(r.reconnects >= 2 for r in summary.reports), text)
        self.assertEqual({r.hunts for r in summary.reports}, {3}, text)
        self.assertEqual(len({r.level for r in summary.reports}), 1, text)
        self.assertEqual(sum(r.score for r in summary.reports), self.BOTS // 2 * self.BOSS_HP, text)
        self.assertGreaterEqual(tcp.counters["accepted"], 3 * self.BOTS)  # each bot's first connection and two more
