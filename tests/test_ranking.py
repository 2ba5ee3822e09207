"""
The ranking board against the real Redis Cluster and MariaDB: pages and
one's own rank with shared ranks, scores that only rise, the board loaded
back from MySQL at start and after Redis lost it, and both requests over a
game server's TCP.
"""

import random

from twisted.internet import task

from dreamraid import game_tap
from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.services.ranking import BoardLoader, Entry, OwnRank, Ranking
from tests.storage import SessionServicesCase
from tests.support import RunningServer, eventually


class RankingTests(SessionServicesCase):

    async def setUp(self):
        await super().setUp()
        self.ranking = Ranking(self.router, self.settings.sync.ranking_prefix)
        self.addCleanup(lambda: self.router.execute("DEL", self.ranking.board))
        self.addCleanup(lambda: self.router.execute("DEL", self.ranking.names))

    async def test_pages_and_own_rank_share_ranks_for_equal_scores(self):
        """250 users with many equal scores: pages in order with competition ranks, own ranks agree."""
        rng = random.Random(4)
        scores = [(10**15 + i, f"p{i}", rng.randrange(1, 60)) for i in range(250)]
        await self.ranking.record(scores)
        best_first = sorted(scores, key=lambda s: -s[2])
        pages = []
        for first in (1, 101, 201, 301):
            pages += await self.ranking.page(first, 100)
        self.assertEqual(len(pages), 250)
        self.assertEqual([e.score for e in pages], [s for _, _, s in best_first])
        for position, entry in enumerate(pages, 1):
            self.assertEqual(entry.rank, 1 + sum(1 for _, _, s in scores if s > entry.score))
            self.assertEqual(entry.name, f"p{entry.user_id - 10**15}")
            self.assertLessEqual(entry.rank, position)
            self.assertEqual(await self.ranking.own(entry.user_id), OwnRank(entry.rank, entry.score))
        self.assertEqual(await self.ranking.own(10**15 + 999), OwnRank(0, 0))
        self.assertEqual(await self.ranking.page(251, 5), [])
        for first, count in ((0, 10), (1, 0), (1, 101)):
            with self.assertRaises(RequestRefused) as raised:
                await self.ranking.page(first, count)
            self.assertEqual(raised.exception.code, ErrorCode.BAD_RANGE)

    async def test_scores_only_rise(self):
        """A lower score leaves the best one; a higher one replaces it and moves the user up."""
        await self.ranking.record([(1, "one", 10), (2, "two", 20)])
        await self.ranking.record([(1, "one", 5)])
        self.assertEqual(await self.ranking.own(1), OwnRank(2, 10))
        await self.ranking.record([(1, "one", 25)])
        self.assertEqual(await self.ranking.page(1, 2), [Entry(1, 1, "one", 25), Entry(2, 2, "two", 20)])

    async def test_board_loaded_back_from_mysql_at_start_and_when_lost(self):
        """The loader fills an empty board from best_scores, leaves a present one alone, and refills a lost one."""
        users = {await self.new_user(best=score): score for score in (40, 30, 30, 7)}
        clock = task.Clock()
        loader = BoardLoader(self.ranking, self.database, clock, 60, chunk=2)
        loader.startService()
        self.addCleanup(loader.stopService)
        loaded = await loader.check()
        self.assertGreaterEqual(loaded, len(users))
        for user_id, score in users.items():
            self.assertEqual((await self.ranking.own(user_id)).score, score)
        self.assertEqual(await loader.check(), 0)

        await loader.checking  # the check at start, so it cannot put the board back after the loss below
        await self.router.execute("DEL", self.ranking.board)
        clock.advance(60)

        async def reloaded():
            return [(await self.ranking.own(u)).score for u in users] == list(users.values())

        await eventually(reloaded)

    async def test_requests_over_tcp(self):
        """ranking_page and my_rank over a game server's TCP, and bad_range."""
        await self.ranking.record([(5, "alice", 50), (6, "bob", 40), (7, "carol", 40)])
        server = RunningServer(game_tap, "game", [
            "--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
            "--sync-ranking-prefix", self.settings.sync.ranking_prefix]).start(self)
        user_id = await self.new_user()
        await self.ranking.record([(user_id, "me", 45)])
        issued = self.issuer.issue(user_id)
        await self.world.enter(issued.token)
        client = await server.client(self)
        await client.request(packets.AUTHENTICATE, {"token": issued.token})
        _, page = await client.request(packets.RANKING_PAGE, {"first": 2, "count": 3})
        self.assertEqual(page, {"entries": [{"rank": 2, "user_id": user_id, "score": 45},
                                            {"rank": 3, "user_id": 7, "score": 40},
                                            {"rank": 3, "user_id": 6, "score": 40}],
                                "names": "me carol bob"})
        _, own = await client.request(packets.MY_RANK, {})
        self.assertEqual(own, {"rank": 2, "score": 45})
        with self.assertRaises(RemoteError) as raised:
            await client.request(packets.RANKING_PAGE, {"first": 1, "count": 101})
        self.assertEqual(raised.exception.code, ErrorCode.BAD_RANGE)
