"""
A raid's fight on a driven clock: the wait for ready with its grace, hits
with the minimum interval and server damage, the killing hit scoring only
what was left, clear and time-out, and (as a property) that HP never goes
below zero, its sequence only rises and the scores add up to the damage
done.
"""

from hypothesis import given, strategies as st
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.raids import Hit, Raid, Result, Stage, hit_damage
from tests.support import make_settings

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
