"""
A raid's fight on a driven clock: the wait for ready with its grace, hits
with the minimum interval and server damage, the killing hit scoring only
what was left, clear and time-out, and (as a property) that HP never goes
below zero, its sequence only rises and the scores add up to the damage
done; and, against the real Redis Cluster, a host setting a raid up and
ending a cleared one through Redis failures.
"""

import random

from hypothesis import given, strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.inventory import SlotItem
from dreamraid.services.livestore import profile_key, raid_mark_key, raid_receipt_key, tab_key
from dreamraid.services.presence import Presence, presence_key
from dreamraid.services.raidhost import RETRY_MAX, RaidHost
from dreamraid.services.raids import Hit, Raid, Result, Stage, hit_damage
from dreamraid.services.ranking import Ranking
from tests.storage import test_settings
from tests.support import eventually, log_lines, make_settings
from tests.test_matchmaking import MatchmakerCase

SETTINGS = make_settings().raids


class RaidTests(SynchronousTestCase):

    def raid(self, damage=None, settings=SETTINGS):
        self.clock = task.Clock()
        self.events = []
        raid = Raid("r1", damage or {1: 4, 2: 3}, settings, self.clock,
                    lambda event, body: self.events.append((event, body)))
        raid.start()
        return raid

    def refused(self, code, call, *args):
        with self.assertRaises(RequestRefused) as raised:
            call(*args)
        self.assertEqual(raised.exception.code, code)

    def test_damage(self):
        """1 + level // 3 + the enhancement of equipment slot 0."""
        self.assertEqual([hit_damage(level, 0) for level in (1, 2, 3, 15)], [1, 1, 2, 6])
        self.assertEqual(hit_damage(5, 10), 12)

    def test_fight_begins_when_all_are_ready(self):
        raid = self.raid()
        self.refused(ErrorCode.RAID_NOT_FIGHTING, raid.hit, 1)
        self.refused(ErrorCode.NOT_IN_RAID, raid.ready, 3)
        raid.ready(1)
        self.assertIs(raid.stage, Stage.WAITING)
        self.clock.advance(3)
        raid.ready(2)
        self.assertIs(raid.stage, Stage.FIGHTING)
        self.assertEqual(raid.deadline, 3 + SETTINGS.time_limit)
        self.assertEqual(self.events, [("fight", {"hp": 30, "sequence": 0, "deadline": raid.deadline,
                                                  "ready": [1, 2]})])
        self.clock.advance(SETTINGS.ready_grace)
        self.assertEqual(len(self.events), 1)

    def test_after_the_grace_the_fight_begins_with_who_is_there(self):
        raid = self.raid()
        raid.ready(2)
        self.clock.advance(SETTINGS.ready_grace)
        self.assertIs(raid.stage, Stage.FIGHTING)
        self.assertEqual(self.events[0][1]["ready"], [2])
        self.assertEqual(raid.hit(1).damage, 4)

    def test_hits_interval_and_the_killing_hit(self):
        """Hits are hit_interval apart per player; the killing hit scores only the HP left; cleared."""
        raid = self.raid({1: 7, 2: 5})
        raid.ready(1)
        raid.ready(2)
        self.assertEqual(raid.hit(1), Hit(7, 23, 1))
        self.refused(ErrorCode.HIT_TOO_SOON, raid.hit, 1)
        self.assertEqual(raid.hit(2), Hit(5, 18, 2))
        for _ in range(2):
            self.clock.advance(SETTINGS.hit_interval)
            raid.hit(1)
        self.assertEqual(raid.hp, 4)
        self.assertEqual(raid.hit(2), Hit(4, 0, 5))
        self.assertIs(raid.stage, Stage.CLEARED)
        self.assertEqual(self.events[-1], ("ended", Result(True, {1: 21, 2: 9}, 30)))
        self.assertEqual([body["sequence"] for event, body in self.events if event == "hp"], [1, 2, 3, 4, 5])
        self.clock.advance(SETTINGS.hit_interval)
        self.refused(ErrorCode.RAID_NOT_FIGHTING, raid.hit, 1)
        self.clock.advance(SETTINGS.time_limit)
        self.assertEqual(len([e for e, _ in self.events if e == "ended"]), 1)

    def test_time_out_fails_with_every_score_zero(self):
        raid = self.raid()
        raid.ready(1)
        raid.ready(2)
        raid.hit(1)
        self.clock.advance(SETTINGS.time_limit - 0.01)
        self.assertIs(raid.stage, Stage.FIGHTING)
        self.clock.advance(0.01)
        self.assertIs(raid.stage, Stage.FAILED)
        self.assertEqual(self.events[-1], ("ended", Result(False, {1: 0, 2: 0}, 0)))

    @given(st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.floats(0, 1)), max_size=60),
           st.dictionaries(st.sampled_from([1, 2, 3]), st.integers(1, 12), min_size=1))
    def test_hp_and_scores_stay_consistent(self, moves, damage):
        """Whatever the hits and pauses: HP in 0..boss_hp, sequence rising, scores summing to the damage done."""
        raid = self.raid(damage)
        for user_id in damage:
            raid.ready(user_id)
        sequence = 0
        for user_id, pause in moves:
            self.clock.advance(pause)
            try:
                hit = raid.hit(user_id)
            except RequestRefused as e:
                self.assertIn(e.code, (ErrorCode.NOT_IN_RAID, ErrorCode.HIT_TOO_SOON, ErrorCode.RAID_NOT_FIGHTING))
                continue
            self.assertGreater(hit.sequence, sequence)
            sequence = hit.sequence
            self.assertTrue(0 <= hit.hp < SETTINGS.boss_hp)
            if raid.stage is not Stage.FAILED:
                self.assertEqual(sum(raid.scores.values()), SETTINGS.boss_hp - raid.hp)
        ended = [body for event, body in self.events if event == "ended"]
        self.assertLessEqual(len(ended), 1)
        if ended and ended[0].cleared:
            self.assertEqual(ended[0].team_score, SETTINGS.boss_hp)


class NobodyHere:
    """The host's players when none is connected to its process: results go out through presence only."""

    def connection_of(self, user_id):
        return None

    def when_asked_to_place(self, place_again):
        pass


class RaidEndTests(MatchmakerCase):
    """A host on a driven clock, against the real Redis Cluster: its lease loop and the end of a raid."""

    def raid_host(self, presence, ranking, matchmaker):
        settings = test_settings(raids_matchmaking_prefix=self.prefix, raids_hit_interval="0").raids
        host = RaidHost(self.router, presence, NobodyHere(), self.inventory, ranking, matchmaker, self.clock,
                        random.Random(3), settings, "127.0.0.1:9090")
        host.startService()
        self.addCleanup(host.stopService)
        return host

    async def listening_presence(self):
        """
        A presence of the test's own, subscribed, and the matchmakers' from
        now on (as a game server's host and matchmaker share one); it and the
        list of C{(event, body)} pushed through it.
        """
        presence = self.presence = Presence(self.router, f"test-raid-end-{random.getrandbits(40):x}", 30, 900)
        told = []
        subscription = presence.listen(lambda user_id, jti: None,
                                       lambda users, event, body, holder=None: told.append((event, body)))
        self.addCleanup(subscription.stop)
        await subscription.when_subscribed()
        return presence, told

    def ranking(self):
        ranking = Ranking(self.router, f"testranking{random.getrandbits(40):x}")
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in (ranking.board, ranking.names)]))
        return ranking

    async def queued_players(self, presence, matchmaker):
        """Two new users held by C{presence}'s server and queued (solo) for a raid of two."""
        players = [await self.new_user() for _ in range(2)]
        for user_id in players:
            self.addCleanup(lambda u=user_id: self.router.execute(
                "DEL", presence_key(u), raid_mark_key(u), raid_receipt_key(u)))
            await self.router.execute("SET", presence_key(user_id), presence.server_id)
            await matchmaker.enqueue(user_id)
        return players

    async def test_the_lease_loop_carries_on_after_an_error_reply(self):
        """
        A lease renewal that Redis answers with an error (WRONGTYPE: the
        leases key has the wrong type) is logged; once the key is right, the
        next tick renews the lease.
        """
        lines = log_lines(self)
        leases = f"{{{self.prefix}}}:leases"
        await self.router.execute("SET", leases, "not a sorted set")
        self.raid_host(self.presence, Ranking(self.router, "testranking-unused"), self.matchmaker())
        await eventually(lambda: defer.succeed(any("cannot renew the lease" in line for line in lines)))
        await self.router.execute("DEL", leases)
        self.clock.advance(1)
        await eventually(lambda: self.router.execute("ZSCORE", leases, self.presence.server_id))

    async def test_a_pay_refused_by_redis_is_retried_and_silences_nobody(self):
        """
        A raid is cleared while Redis answers one player's pay with an error
        (their raid mark has the wrong type): the other is paid, and the host
        tries again after a pause on its clock until Redis takes it.  Each
        is paid once, the board has both scores, both are free to queue,
        and a player whose result cannot be pushed keeps nobody else from
        hearing theirs, which says what is stored.
        """
        lines = log_lines(self)
        presence, told = await self.listening_presence()
        ranking = self.ranking()
        matchmaker = self.matchmaker()
        refused, unheard = players = await self.queued_players(presence, matchmaker)
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, ranking, matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(any(f"raid {formed.raid_id} hosted" in line for line in lines)))
        await self.router.execute("DEL", raid_mark_key(refused))
        await self.router.execute("HSET", raid_mark_key(refused), "not", "a raid id")
        await self.router.execute("DEL", presence_key(unheard))
        await self.router.execute("HSET", presence_key(unheard), "not", "a server id")
        for user_id in players:
            host.ready(user_id, formed.raid_id)
        scores, turn = dict.fromkeys(players, 0), 0
        while True:
            hit = host.hit(players[turn % 2], formed.raid_id)
            scores[players[turn % 2]] += hit.damage
            if hit.hp == 0:
                break
            turn += 1

        await eventually(lambda: defer.succeed(any(f"paying user {refused} failed" in line for line in lines)))
        await eventually(lambda: self.router.execute("EXISTS", raid_mark_key(unheard)).addCallback(lambda n: n == 0))
        self.assertEqual(await self.router.execute("HGET", profile_key(refused), "exp"), b"0")
        await self.router.execute("DEL", raid_mark_key(refused))
        await self.router.execute("SET", raid_mark_key(refused), formed.raid_id)
        self.clock.advance(RETRY_MAX)
        await eventually(lambda: defer.succeed("raid_result" in dict(told)
                                               and any(f"tell user {unheard}" in line for line in lines)))
        [result] = [body for event, body in told if event == "raid_result"]
        self.assertEqual((result["cleared"], result["score"], result["exp_gained"], result["best"]),
                         (True, scores[refused], scores[refused], scores[refused]))
        self.assertEqual(sorted(SlotItem(**item) for item in result["changed"]), await self.inventory.list(refused))
        for user_id in players:
            profile = await self.live.snapshot(user_id)
            self.assertEqual((profile.exp, profile.best, profile.version), (scores[user_id],) * 2 + (1,))
            self.assertEqual((await ranking.own(user_id)).score, scores[user_id])
            await matchmaker.enqueue(user_id)  # refused (ALREADY_QUEUED) while still in the raid

    async def test_a_failed_raid_tells_each_player_their_level_and_best(self):
        """
        A raid that runs out of time pays nothing, and its result says each
        player's level and best score as they stand (not 0, which would read
        as a best of 0).
        """
        lines = log_lines(self)
        presence, told = await self.listening_presence()
        matchmaker = self.matchmaker()
        players = await self.queued_players(presence, matchmaker)
        for user_id, level, best in zip(players, (4, 1), (17, 0)):
            await self.router.execute("HSET", profile_key(user_id), "level", level, "best", best)
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, self.ranking(), matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(any(f"raid {formed.raid_id} hosted" in line for line in lines)))
        for user_id in players:
            host.ready(user_id, formed.raid_id)
        host.hit(players[0], formed.raid_id)
        self.clock.advance(SETTINGS.time_limit)
        await eventually(lambda: defer.succeed(len([e for e, _ in told if e == "raid_result"]) == 2))
        results = sorted((b["level"], b["best"], b["cleared"], b["score"], b["exp_gained"], b["changed"])
                         for e, b in told if e == "raid_result")
        self.assertEqual(results, [(1, 0, False, 0, 0, []), (4, 17, False, 0, 0, [])])

    async def test_a_raid_whose_setup_fails_frees_its_players_at_once(self):
        """
        Redis refuses the read of one player's weapon (WRONGTYPE) as the
        host sets a raid up: the raid is not kept, both players' raid marks
        are off, both are free to queue again at once, and both are told
        the raid failed.
        """
        lines = log_lines(self)
        presence, told = await self.listening_presence()
        matchmaker = self.matchmaker()
        players = await self.queued_players(presence, matchmaker)
        await self.router.execute("SET", tab_key(players[1], 0), "not a hash")
        self.addCleanup(lambda: self.router.execute("DEL", tab_key(players[1], 0)))
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, self.ranking(), matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(len([e for e, _ in told if e == "raid_result"]) == 2))
        self.assertTrue(any(f"raid {formed.raid_id}: cannot set it up (WRONGTYPE" in line for line in lines), lines)
        self.assertEqual(len(host), 0)
        self.assertEqual([(body["cleared"], body["level"]) for event, body in told if event == "raid_result"],
                         [(False, 1), (False, 1)])
        self.assertNotIn("raid_found", dict(told))
        for user_id in players:
            self.assertEqual(await self.router.execute("EXISTS", raid_mark_key(user_id)), 0)
            await matchmaker.enqueue(user_id)  # ALREADY_QUEUED if the raid still held them

    async def test_a_player_who_cannot_be_told_is_left_out_of_the_raid(self):
        """
        Redis refuses the presence read of one player (WRONGTYPE) as the host
        tells them where their raid is: the other is told, the raid starts,
        and after the ready grace its fight begins with the player who came.
        """
        lines = log_lines(self)
        presence, told = await self.listening_presence()
        matchmaker = self.matchmaker()
        came, unheard = await self.queued_players(presence, matchmaker)
        await self.router.execute("DEL", presence_key(unheard))
        await self.router.execute("HSET", presence_key(unheard), "not", "a server id")
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, self.ranking(), matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(any(f"raid {formed.raid_id} hosted" in line for line in lines)))
        self.assertTrue(any(f"cannot tell user {unheard} where it is (WRONGTYPE" in line for line in lines), lines)
        [(event, found)] = told
        self.assertEqual((event, found["member"], found["members"]), ("raid_found", 0, [came, unheard]))
        host.ready(came, formed.raid_id)
        self.clock.advance(SETTINGS.ready_grace)
        self.assertEqual(host.hit(came, formed.raid_id).damage, hit_damage(1, 0))

    async def test_a_raid_ended_by_another_server_is_dropped(self):
        """
        The host's lease lapses and another server's check ends its raid:
        at the raid's next renewal the host drops it (a hit is refused),
        takes the players' raid marks off and tells them it failed.
        """
        lines = log_lines(self)
        presence, told = await self.listening_presence()
        matchmaker = self.matchmaker()
        players = await self.queued_players(presence, matchmaker)
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, self.ranking(), matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(any(f"raid {formed.raid_id} hosted" in line for line in lines)))
        await self.router.execute("ZADD", f"{{{self.prefix}}}:leases", 0, presence.server_id)
        self.assertEqual(await self.matchmaker(seed=2).reap(), [(formed.raid_id, players)])

        def renewed():
            self.clock.advance(0.1)  # the host renews a tenth of its raids each tick
            return defer.succeed(len(host) == 0)

        await eventually(renewed)
        self.assertTrue(any(f"raid {formed.raid_id}: ended by another server" in line for line in lines), lines)
        with self.assertRaises(RequestRefused) as refused:
            host.hit(players[0], formed.raid_id)
        self.assertEqual(refused.exception.code, ErrorCode.NOT_IN_RAID)

        async def unmarked():
            return not any([await self.router.execute("EXISTS", raid_mark_key(u)) for u in players])

        await eventually(unmarked)
        await eventually(lambda: defer.succeed(len([e for e, _ in told if e == "raid_result"]) == 2))
        self.assertEqual({(b["raid_id"], b["cleared"]) for e, b in told if e == "raid_result"},
                         {(formed.raid_id, False)})

    async def test_a_raid_ended_elsewhere_during_its_setup_is_not_started(self):
        """
        Another server ends the raid while its host is still offering its
        players their handoff tickets: once the offers return, the host does
        not start the raid (its ready timer would find no raid).
        """
        presence, told = await self.listening_presence()
        offers = []
        presence.offer_place = lambda user_id, ticket, ttl, expected=None: offers.append(defer.Deferred()) or offers[-1]
        matchmaker = self.matchmaker()
        await self.queued_players(presence, matchmaker)
        [formed] = await matchmaker.run_pass()
        host = self.raid_host(presence, self.ranking(), matchmaker)
        host.host(formed)
        await eventually(lambda: defer.succeed(len(offers) == 2))
        await self.router.execute("ZADD", f"{{{self.prefix}}}:leases", 0, presence.server_id)
        await self.matchmaker(seed=2).reap()

        def renewed():
            self.clock.advance(0.1)
            return defer.succeed(len(host) == 0)

        await eventually(renewed)
        for offer in offers:  # the place offered, the host finds the raid ended and tells no one where it is
            offer.callback((presence.server_id, False))
        self.clock.advance(SETTINGS.ready_grace)  # a started raid's fight would begin here, and fail
        self.assertEqual(len(host), 0)
