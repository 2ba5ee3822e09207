"""
The session server's pieces that need no stack: schema migration parsing,
password hashes, shard tags, how sync jobs are cut into batches, the sync
worker's loops carrying on after failures (on a task.Clock, against a
scripted router), and the failure log those loops share.
"""

import inspect
import random

import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.services.accounts import PasswordHasher
from dreamraid.services.failurelog import FailureLog
from dreamraid.services.migrations import SCHEMA_PATH, MigrationError, load_migrations, parse_migrations
from dreamraid.services.rediscluster import SLOTS, ClusterUnavailable, RedisCluster, key_slot
from dreamraid.services.sync import SyncQueue, SyncWorker, shard_tags
from tests.storage import test_settings
from tests.support import log_lines


class MigrationParsingTests(SynchronousTestCase):

    def test_shipped_schema(self):
        """The shipped schema parses into migrations numbered from 1, the first creating the three tables."""
        migrations = load_migrations(SCHEMA_PATH)
        self.assertEqual([m.version for m in migrations], list(range(1, len(migrations) + 1)))
        created = [s.split()[2] for s in migrations[0].statements if s.startswith("CREATE TABLE")]
        self.assertEqual(created, ["users", "inventory", "best_scores"])

    def test_statements_split_at_line_ends_and_comments_dropped(self):
        """Statements end with a semicolon at a line end; comment lines are not sent."""
        [first, second] = parse_migrations(
            "-- migration 1: a\n-- a comment\nCREATE TABLE a (x INT);\nINSERT INTO a VALUES (';');\n"
            "-- migration 2: b\nDROP TABLE a;\n")
        self.assertEqual(first.statements, ("CREATE TABLE a (x INT)", "INSERT INTO a VALUES (';')"))
        self.assertEqual((second.version, second.name, second.statements), (2, "b", ("DROP TABLE a",)))

    def test_numbering_gaps_refused(self):
        """Migrations numbered out of order, or with a gap, are refused."""
        for text in ["-- migration 2: x\nSELECT 1;\n", "-- migration 1: x\nSELECT 1;\n-- migration 3: y\nSELECT 1;\n"]:
            with self.assertRaises(MigrationError):
                parse_migrations(text)


class PasswordHasherTests(SynchronousTestCase):

    def setUp(self):
        self.hasher = PasswordHasher(lambda f, *a: defer.maybeDeferred(f, *a), random.Random(1), 1024, 8, 1)

    def test_hash_verifies_only_its_password(self):
        """A hash verifies its password and no other; two hashes of one password differ (salt)."""
        stored = self.successResultOf(self.hasher.hash("correct horse"))
        self.assertTrue(stored.startswith("scrypt$1024$8$1$"))
        self.assertTrue(self.successResultOf(self.hasher.verify("correct horse", stored)))
        self.assertFalse(self.successResultOf(self.hasher.verify("correct horsE", stored)))
        self.assertNotEqual(stored, self.successResultOf(self.hasher.hash("correct horse")))

    def test_malformed_stored_hash_never_verifies(self):
        """A stored value that is not one of ours fails verification instead of raising."""
        for stored in ["", "x", "scrypt$a$b$c$d$e", "bcrypt$1024$8$1$AAAA$AAAA", "scrypt$1024$8$1$!!$!!"]:
            self.assertFalse(self.successResultOf(self.hasher.verify("password", stored)), stored)


class ShardTests(SynchronousTestCase):

    def test_each_tag_in_its_share_of_the_slots(self):
        """The i-th of n tags hashes into the i-th n-th of the slot space."""
        for count in (1, 3, 6, 16):
            for shard, tag in enumerate(shard_tags(count)):
                self.assertTrue(shard * SLOTS // count <= key_slot(tag) < (shard + 1) * SLOTS // count)


class BatchTests(SynchronousTestCase):

    def test_batches_hold_at_most_batch_users_and_keep_a_users_jobs_together(self):
        """Jobs are cut into batches of at most batch_users users; every job of one user is in one batch."""
        settings = test_settings(sync_batch_users="3").sync
        worker = SyncWorker(None, None, None, None, None, settings)
        jobs = {(i % 2, f"{i}-0"): user for i, user in enumerate([1, 2, 3, 1, 4, 5, 2, 6, 7, None])}
        batches = list(worker._batches(jobs))
        self.assertEqual([len({u for u in b.values()}) for b in batches], [3, 3, 2])
        self.assertEqual({k: v for b in batches for k, v in b.items()}, jobs)
        for user in (1, 2):
            self.assertEqual(sum(user in b.values() for b in batches), 1)


class ScriptedRouter:
    """
    The part of L{RedisCluster} the sync worker uses.  C{answer(*args)}
    gives each command's reply (a value, a Deferred, or it raises);
    C{sent} records the commands.
    """

    max_in_flight = 8

    def __init__(self, answer):
        self.sent = []
        self._answer = answer

    def execute(self, *args, timeout=None, route=None, replicas=0):
        self.sent.append(args)
        return defer.maybeDeferred(self._answer, *args)


def error_reply(text):
    """An error reply as the router hands it on (hiredis makes these)."""
    return txredisapi.ResponseError(text)


class SyncLoopTests(SynchronousTestCase):
    """The worker's read loop and checkpointer carry on after failures (the clock is driven, the router scripted)."""

    def setUp(self):
        self.clock = Clock()
        self.lines = log_lines(self)

    def test_scripted_router_matches_the_real_one(self):
        """The fake's execute has the router's signature, and the router has the in-flight cap the worker reads."""
        self.assertEqual(inspect.signature(ScriptedRouter.execute), inspect.signature(RedisCluster.execute))
        router = RedisCluster(self.clock, random.Random(1), [], connect_timeout=1, command_timeout=1, max_in_flight=8)
        self.assertEqual(router.max_in_flight, ScriptedRouter.max_in_flight)

    def start(self, answer, **sync):
        """A started worker on three shards with C{sync} settings, over a router that answers with C{answer}."""
        router = ScriptedRouter(answer)
        self.queue = SyncQueue(router, self.clock, 3, "unit")
        settings = test_settings(sync_shards="3", **{f"sync_{k}": str(v) for k, v in sync.items()}).sync
        worker = SyncWorker(router, self.queue, None, None, self.clock, settings)
        worker.startService()
        self.addCleanup(worker.stopService)
        return router, worker

    def sent(self, router, name):
        return [args for args in router.sent if args[0] == name]

    def test_read_loop_recreates_a_lost_group_and_outlives_a_bug(self):
        """NOGROUP creates the groups again; an unexpected error is logged with its traceback; reading goes on."""
        failures = [error_reply("NOGROUP No such key 'unit:jobs:{s0.0}' or consumer group 'sync'"), TypeError("bug")]

        def answer(*args):
            if args[0] == "XREADGROUP" and args[-2].startswith("unit:jobs:{s0.") and failures:
                raise failures.pop(0)  # one read round each
            return [b"0-0", [], []] if args[0] == "XAUTOCLAIM" else None

        router, worker = self.start(answer, batch_wait=0.05, retry_backoff=1, claim_interval=1000)
        self.assertEqual(len(self.sent(router, "XGROUP")), 6)  # at start, then again after NOGROUP
        self.assertEqual(worker.counters["groups_recreated"], 1)
        self.clock.advance(0.05)  # the next read: the bug
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(worker.counters["retries"], 1)
        reads = len(self.sent(router, "XREADGROUP"))
        self.clock.advance(1)  # after the backoff, reading again
        self.assertGreater(len(self.sent(router, "XREADGROUP")), reads)
        self.assertTrue(any(line.startswith("sync: the consumer group is gone, creating it again: NOGROUP")
                            for line in self.lines), self.lines)
        self.assertTrue(any(line.startswith("sync: cannot read jobs: unexpected error") for line in self.lines))

    def test_a_lost_group_is_made_again_beside_another_shards_error(self):
        """NOGROUP on one shard is acted on though a shard before it fails otherwise (WRONGTYPE) in the same read."""
        lost = [error_reply("NOGROUP No such key 'unit:jobs:{s2.0}' or consumer group 'sync'")]

        def answer(*args):
            if args[0] == "XREADGROUP" and args[-2] == self.queue.streams[0]:
                raise error_reply("WRONGTYPE Operation against a key holding the wrong kind of value")
            if args[0] == "XREADGROUP" and args[-2] == self.queue.streams[2] and lost:
                raise lost.pop()
            return [b"0-0", [], []] if args[0] == "XAUTOCLAIM" else None

        router, worker = self.start(answer, batch_wait=0.05, retry_backoff=1, claim_interval=1000)
        self.assertEqual(worker.counters["groups_recreated"], 1)
        self.assertEqual(len(self.sent(router, "XGROUP")), 6)  # at start, then again after NOGROUP

    def test_checkpoints_paced_within_the_in_flight_cap_and_past_failures(self):
        """
        A shard whose live set gets an error reply is skipped; the others'
        users are queued half the in-flight cap at a time, and a job
        refused with OOM does not stop the round.
        """
        users = {1: [str(u * 3 + 1).encode() for u in range(10)], 2: [b"2", b"5"]}
        xadds = []

        def answer(*args):
            if args[0] == "ZRANGE":
                shard = self.queue.live_sets.index(args[1])
                if shard == 0:
                    raise error_reply("WRONGTYPE Operation against a key holding the wrong kind of value")
                return users[shard]
            if args[0] == "XADD":
                xadds.append(defer.Deferred())
                return xadds[-1]
            return {"XAUTOCLAIM": [b"0-0", [], []], "SET": b"OK"}.get(args[0])

        router, worker = self.start(answer, checkpoint_interval=10, batch_wait=60)
        self.clock.advance(10)
        most = 0
        while any(not d.called for d in xadds):
            waiting = [d for d in xadds if not d.called]
            most = max(most, len(waiting))
            waiting[0].errback(error_reply("OOM command not allowed when used memory > 'maxmemory'."))
            for d in waiting[1:]:
                d.callback(b"1-0")
        self.assertEqual(most, router.max_in_flight // 2)
        self.assertEqual(len(xadds), 12)
        self.assertEqual(worker.counters["checkpoints"], 12 - 4)  # one refused in each of the four chunks
        self.assertTrue(any(line.startswith("sync: checkpoint of a shard skipped: WRONGTYPE") for line in self.lines))
        self.assertEqual(len([line for line in self.lines if line.startswith("sync: checkpoint jobs not queued: OOM")]),
                         1)

    def test_checkpoint_round_of_a_shard_ends_when_a_chunk_fails_entirely(self):
        """A chunk whose every job fails (its master out of reach) ends that shard's round; the next shard goes on."""
        def answer(*args):
            if args[0] == "ZRANGE":
                shard = self.queue.live_sets.index(args[1])
                return [str(shard + 3 * k).encode() for k in range(9)]
            if args[0] == "XADD":
                if args[1] == self.queue.streams[0]:
                    raise ClusterUnavailable("no reply by the deadline")
                return b"1-0"
            return {"XAUTOCLAIM": [b"0-0", [], []], "SET": b"OK"}.get(args[0])

        router, worker = self.start(answer, checkpoint_interval=10, batch_wait=60)
        self.clock.advance(10)
        first = [args for args in self.sent(router, "XADD") if args[1] == self.queue.streams[0]]
        self.assertEqual(len(first), router.max_in_flight // 2)
        self.assertEqual(worker.counters["checkpoints"], 18)


class FailureLogTests(SynchronousTestCase):
    """L{FailureLog}: the first failure of a kind logged at once, repeats counted into a line a minute."""

    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.failures = FailureLog(Logger(observer=self.events.append), self.clock, every=60)

    def lines(self):
        return [(formatEvent(event), "log_failure" in event) for event in self.events]

    def test_repeats_are_counted_into_the_next_line(self):
        """The same failure every second: a line at once, then one a minute saying how many were not logged."""
        for _ in range(61):
            self.failures.failed("loop: a tick failed", Failure(ClusterUnavailable("down")))
            self.clock.advance(1)
        self.assertEqual(self.lines(), [("loop: a tick failed: down", False),
                                        ("loop: a tick failed: down (59 more like it in the last 60 s)", False)])
        self.assertEqual(self.events[-1]["count"], 60)

    def test_another_kind_or_work_is_logged_at_once(self):
        """A different error reply, or the same error in other work, gets its own line at once."""
        self.failures.failed("a", Failure(error_reply("OOM full")))
        self.failures.failed("a", Failure(error_reply("OOM still full")))
        self.failures.failed("a", Failure(error_reply("NOGROUP gone")))
        self.failures.failed("b", Failure(error_reply("OOM full")))
        self.assertEqual([line for line, _ in self.lines()], ["a: OOM full", "a: NOGROUP gone", "b: OOM full"])

    def test_unexpected_errors_carry_their_traceback(self):
        """An error that is not expected (a bug) is logged as a failure, traceback and all."""
        try:
            1 / 0
        except ZeroDivisionError:
            self.failures.failed("loop: a tick failed")
        [event] = self.events
        self.assertEqual(formatEvent(event), "loop: a tick failed: unexpected error")
        self.assertIsInstance(event["log_failure"].value, ZeroDivisionError)
