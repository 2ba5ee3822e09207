"""
Enter world and the sync back to MySQL, against the real Redis Cluster and
MariaDB: exact loading, write-back, eviction rules, versions, dead consumers,
a MariaDB outage, a consumer group Redis lost, a user whose sync keeps
failing, checkpoints and a thousand logouts at once.
"""

import random

from twisted.internet import defer, reactor, task

from dreamraid.services.database import MYSQL_UNAVAILABLE
from dreamraid.services.livestore import Item, Profile, data_keys, session_key
from dreamraid.services.loading import thd_load_profile
from dreamraid.services.sync import GROUP, MysqlSnapshotStore, SyncQueue, SyncWorker, thd_write_snapshots
from tests.storage import SessionServicesCase, sql, test_settings
from tests.support import eventually, stack, when_logged


class SyncCase(SessionServicesCase):
    """The session server's services, with helpers for sync."""

    async def setUp(self):
        await super().setUp()
        self.snapshots = MysqlSnapshotStore(self.database)

    async def enter(self, user_id):
        """Enter the world with a fresh token; the token's id."""
        issued = self.issuer.issue(user_id)
        entered = await self.world.enter(issued.token)
        self.assertEqual(entered.user_id, user_id)
        return issued.jti

    def mysql_profile(self, user_id):
        return self.database.pool.runWithConnection(thd_load_profile, user_id)

    def worker(self, **overrides):
        """A started sync worker with C{sync_*} overrides (seconds as text)."""
        settings = test_settings(**{f"sync_{k}": str(v) for k, v in overrides.items()},
                                 sync_prefix=self.settings.sync.prefix).sync
        worker = SyncWorker(self.router, self.queue, self.live, self.snapshots, reactor, settings)
        worker.startService()
        self.addCleanup(worker.stopService)
        return worker

    async def change(self, user_id, level, exp, items, removed=()):
        """Change the live data as a game server would: every change raises the version."""
        await self.router.transaction(
            [("HSET", data_keys(user_id)[0], "level", level, "exp", exp), ("HINCRBY", data_keys(user_id)[0], "version", 1)]
            + [("HSET", data_keys(user_id)[1 + tab], slot, f"{i.code}:{i.enhancement}:{i.count}")
               for (tab, slot), i in items.items()]
            + [("HDEL", data_keys(user_id)[1 + tab], slot) for tab, slot in removed])

    async def pending(self):
        """Jobs delivered to a consumer and not acknowledged, over all shards."""
        total = 0
        for stream in self.queue.streams:
            summary = await self.router.execute("XPENDING", stream, GROUP)
            total += summary[0]
        return total

    async def queued(self):
        """Jobs in the streams, read or not (acknowledged ones are deleted)."""
        return sum([await self.router.execute("XLEN", stream) for stream in self.queue.streams])

    async def live_keys(self, user_id):
        return sum([await self.router.execute("EXISTS", key) for key in data_keys(user_id)])


class EnterWorldTests(SyncCase):

    async def test_enter_world_loads_exactly_the_mysql_data(self):
        """Profile, every tab and the best score arrive in Redis as MySQL holds them; the jti is the live session."""
        items = {(0, 0): Item(101, 7, 1), (0, 49): Item(102, 0, 1), (1, 3): Item(201, 0, 12), (2, 0): Item(301, 0, 99)}
        user_id = await self.new_user(level=4, exp=9, best=77, items=items)
        jti = await self.enter(user_id)
        expected = await self.mysql_profile(user_id)
        self.assertEqual(expected.items, items)
        self.assertEqual((expected.level, expected.exp, expected.best), (4, 9, 77))
        self.assertEqual(await self.live.snapshot(user_id), expected)
        self.assertEqual(await self.router.execute("GET", session_key(user_id)), jti.encode())
        self.assertEqual(await self.router.execute("HLEN", data_keys(user_id)[3]), 1)

    async def test_entering_again_keeps_live_data_and_replaces_the_session(self):
        """A second enter world keeps the (newer) live data and makes the new token the live one."""
        user_id = await self.new_user()
        await self.enter(user_id)
        await self.change(user_id, 3, 5, {(1, 0): Item(7, 0, 2)})
        jti = await self.enter(user_id)
        self.assertEqual((await self.live.snapshot(user_id)).level, 3)
        self.assertEqual(await self.router.execute("GET", session_key(user_id)), jti.encode())


class SyncTests(SyncCase):

    async def test_changed_user_synced_then_unloaded(self):
        """Change, log out, enqueue: MySQL equals the live data, emptied slots are gone, the keys are removed."""
        user_id = await self.new_user(items={(0, 0): Item(1, 0, 1), (1, 1): Item(2, 0, 5)})
        jti = await self.enter(user_id)
        await self.change(user_id, 5, 3, {(0, 0): Item(1, 4, 1), (2, 9): Item(3, 0, 40)}, removed=[(1, 1)])
        await self.router.execute("HSET", data_keys(user_id)[0], "best", 55)
        live = await self.live.snapshot(user_id)
        self.assertTrue(await self.live.end_session(user_id, jti))
        await self.queue.enqueue(user_id, "logout")
        worker = self.worker()
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 1))
        self.assertEqual(await self.mysql_profile(user_id), live)
        self.assertEqual(await sql("SELECT data_version FROM users WHERE id = %s", (user_id,)), ((1,),))
        self.assertEqual(await self.live_keys(user_id), 0)
        self.assertEqual(await self.pending(), 0)
        self.assertEqual(await self.router.execute("ZSCORE", self.queue.live_sets[self.queue.shard_of(user_id)],
                                                   user_id), None)

    async def test_backlog_counts_unread_and_unacknowledged_jobs_and_ages_the_oldest(self):
        """Jobs count until acknowledged, read or not; the oldest's age comes from its stream id."""
        self.assertEqual(await self.queue.backlog(), (0, 0.0))
        for stream in self.queue.streams:
            await self.router.execute("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
        self.assertEqual(await self.queue.backlog(), (0, 0.0))
        for user_id in (1, 2, 3):  # three shards
            await self.queue.enqueue(user_id, "logout")
        [oldest] = await self.router.execute("XRANGE", self.queue.streams[self.queue.shard_of(1)], "-", "+", "COUNT", 1)
        queued_at = int(oldest[0].split(b"-")[0]) / 1000
        clock = task.Clock()
        clock.advance(queued_at + 7)
        backlog = SyncQueue(self.router, clock, self.settings.sync.shards, self.settings.sync.prefix).backlog
        jobs, age = await backlog()
        self.assertEqual(jobs, 3)
        self.assertAlmostEqual(age, 7.0, places=3)
        stream = self.queue.streams[self.queue.shard_of(1)]
        [[_, [(entry, _)]]] = await self.router.execute("XREADGROUP", "GROUP", GROUP, "test", "COUNT", 1,
                                                        "STREAMS", stream, ">")
        jobs, age = await backlog()
        self.assertEqual(jobs, 3)  # read, not acknowledged: still counted, still the oldest
        self.assertAlmostEqual(age, 7.0, places=3)
        await self.router.execute("XACK", stream, GROUP, entry)
        jobs, age = await backlog()
        self.assertEqual(jobs, 2)
        self.assertLessEqual(age, 7.0 + 1e-6)  # the next job may share the first one's millisecond

    async def test_stale_snapshot_never_overwrites(self):
        """A snapshot older than MySQL's version is skipped, whatever order the writes come in."""
        user_id = await self.new_user()
        newer = Profile(user_id, "n", 9, 40, 0, 7, {(0, 1): Item(5, 2, 1)})
        older = Profile(user_id, "n", 2, 1, 0, 5, {(0, 2): Item(6, 0, 1)})
        self.assertEqual(await self.database.pool.runWithConnection(thd_write_snapshots, [newer]), [user_id])
        self.assertEqual(await self.database.pool.runWithConnection(thd_write_snapshots, [older]), [])
        stored = await self.mysql_profile(user_id)
        self.assertEqual((stored.level, stored.exp, stored.version, stored.items), (9, 40, 7, newer.items))

    async def test_user_back_before_sync_keeps_live_data(self):
        """A user who enters again before the sync runs keeps the live data; the sync writes it but does not unload it."""
        user_id = await self.new_user()
        jti = await self.enter(user_id)
        await self.change(user_id, 6, 2, {(1, 4): Item(9, 0, 3)})
        await self.live.end_session(user_id, jti)
        await self.queue.enqueue(user_id, "logout")
        await self.enter(user_id)
        live = await self.live.snapshot(user_id)
        self.assertEqual(live.level, 6)
        worker = self.worker()
        await eventually(lambda: defer.succeed(worker.counters["acked"] >= 1))
        self.assertEqual(await self.mysql_profile(user_id), live)
        self.assertEqual(await self.live.snapshot(user_id), live)
        self.assertEqual(worker.counters["evicted"], 0)

    async def test_dead_consumer_jobs_are_claimed(self):
        """Jobs read by a consumer that died without acking are claimed by a live worker and synced."""
        users = [await self.new_user() for _ in range(5)]
        expected = {}
        for user_id in users:
            jti = await self.enter(user_id)
            await self.change(user_id, 2, user_id % 7, {(2, 0): Item(300, 0, user_id % 50 + 1)})
            expected[user_id] = await self.live.snapshot(user_id)
            await self.live.end_session(user_id, jti)
            await self.queue.enqueue(user_id, "logout")
        dead = 0
        for stream in self.queue.streams:
            await self.router.execute("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
            reply = await self.router.execute("XREADGROUP", "GROUP", GROUP, "dead", "COUNT", 100, "STREAMS", stream, ">")
            dead += sum(len(entries) for _, entries in reply or ())
        self.assertEqual(dead, 5)
        worker = self.worker(claim_idle=0.3, claim_interval=0.1)
        await eventually(lambda: defer.succeed(worker.counters["acked"] >= 5))
        self.assertEqual(worker.counters["claimed"], 5)
        for user_id in users:
            self.assertEqual(await self.mysql_profile(user_id), expected[user_id])
        self.assertEqual(await self.pending(), 0)

    async def test_checkpoint_writes_live_users_without_unloading(self):
        """The checkpointer syncs a user who stays online; the live data stays in Redis."""
        user_id = await self.new_user()
        await self.enter(user_id)
        await self.change(user_id, 8, 1, {(0, 3): Item(44, 1, 1)})
        live = await self.live.snapshot(user_id)
        worker = self.worker(checkpoint_interval=0.2)
        await eventually(lambda: defer.ensureDeferred(self.mysql_version(user_id)))
        self.assertEqual(await self.mysql_profile(user_id), live)
        self.assertEqual(await self.live.snapshot(user_id), live)
        self.assertGreaterEqual(worker.counters["checkpoints"], 1)

    async def mysql_version(self, user_id):
        [(version,)] = await sql("SELECT data_version FROM users WHERE id = %s", (user_id,))
        return version > 0

    async def test_a_thousand_logouts_synced_in_batches(self):
        """1,000 users logging out at once are written in batches of at most batch_users, all of them exactly."""
        names = [f"k{random.getrandbits(76):x}" for _ in range(1000)]
        await sql("INSERT INTO users (name, password_hash) VALUES " + ",".join(["(%s, 'x')"] * 1000), names)
        rows = await sql("SELECT id FROM users WHERE name IN (" + ",".join(["%s"] * 1000) + ")", names)
        users = [user_id for (user_id,) in rows]
        self.assertEqual(len(users), 1000)
        sessions = await defer.gatherResults([defer.ensureDeferred(self.enter(u)) for u in users])
        await defer.gatherResults([defer.ensureDeferred(
            self.change(u, 1 + u % 15, u % 90, {(0, u % 50): Item(u % 1000, u % 11, 1), (2, 1): Item(3, 0, u % 99 + 1)}))
            for u in users])
        await defer.gatherResults([defer.ensureDeferred(self.live.end_session(u, jti))
                                   for u, jti in zip(users, sessions)])
        expected = await defer.gatherResults([defer.ensureDeferred(self.live.snapshot(u)) for u in users])
        await defer.gatherResults([self.queue.enqueue(u, "logout") for u in users])
        worker = self.worker(batch_users=200)
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 1000), timeout=60)
        self.assertEqual(worker.counters["written"], 1000)
        self.assertGreaterEqual(worker.counters["batches"], 5)
        self.assertLessEqual(worker.largest_batch, 200)
        stored = await defer.gatherResults([self.mysql_profile(u) for u in users])
        self.assertEqual(stored, expected)


class RedisErrorReplyTests(SyncCase):

    async def logged_out(self, user_id):
        """Change the user's live data and log them out, as a game server would; their snapshot."""
        jti = await self.enter(user_id)
        await self.change(user_id, 7, 3, {(0, 5): Item(55, 2, 1)})
        live = await self.live.snapshot(user_id)
        await self.live.end_session(user_id, jti)
        await self.queue.enqueue(user_id, "logout")
        return live

    async def test_a_destroyed_consumer_group_is_created_again(self):
        """The group is destroyed (as a flush or a failover can) while the worker runs; a later logout still lands."""
        worker = self.worker()

        async def groups_made():  # XGROUP CREATE ... MKSTREAM makes the stream and its group at once
            return all([await self.router.execute("EXISTS", stream) for stream in self.queue.streams])

        await eventually(groups_made)
        for stream in self.queue.streams:
            self.assertEqual(await self.router.execute("XGROUP", "DESTROY", stream, GROUP), 1)
        user_id = await self.new_user()
        live = await self.logged_out(user_id)
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 1))
        self.assertEqual(await self.mysql_profile(user_id), live)
        self.assertGreaterEqual(worker.counters["groups_recreated"], 1)
        self.assertEqual(await self.pending(), 0)

    async def test_jobs_read_beside_a_failing_shard_are_synced_at_once(self):
        """
        While every read of one shard fails (its stream replaced by a string:
        WRONGTYPE), a logout on another shard, handed over in the same
        reads, is synced at once, not left pending for a claim.
        """
        worker = self.worker(claim_idle=600)

        async def groups_made():
            return all([await self.router.execute("EXISTS", stream) for stream in self.queue.streams])

        await eventually(groups_made)
        user_id = await self.new_user()
        broken = self.queue.streams[(self.queue.shard_of(user_id) + 1) % len(self.queue.streams)]
        await self.router.execute("DEL", broken)
        await self.router.execute("SET", broken, "not a stream")
        self.addCleanup(lambda: self.router.execute("DEL", broken))
        logged = when_logged(self, "WRONGTYPE")
        live = await self.logged_out(user_id)
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 1), timeout=20)
        self.assertEqual(await self.mysql_profile(user_id), live)
        [pending, *_] = await self.router.execute("XPENDING", self.queue.streams[self.queue.shard_of(user_id)], GROUP)
        self.assertEqual((worker.counters["claimed"], pending), (0, 0))
        await logged

    async def test_backlog_counts_the_jobs_of_a_lost_group(self):
        """
        With no consumer group every job in the stream counts; so it does
        once the group is made again, when Redis cannot tell its lag.
        """
        stream = self.queue.streams[self.queue.shard_of(1)]
        entries = [await self.queue.enqueue(user_id, "logout") for user_id in (1, 7, 13)]  # one shard
        self.assertEqual([self.queue.shard_of(u) for u in (7, 13)], [self.queue.shard_of(1)] * 2)
        self.assertEqual((await self.queue.backlog())[0], 3)
        await self.router.execute("XDEL", stream, entries[1])
        await self.router.execute("XGROUP", "CREATE", stream, GROUP, "0")
        [group] = await self.router.execute("XINFO", "GROUPS", stream, route=stream)
        self.assertIsNone(dict(zip(group[::2], group[1::2]))[b"lag"])
        clock = task.Clock()
        clock.advance(int(entries[0].split(b"-")[0]) / 1000 + 3)
        jobs, age = await SyncQueue(self.router, clock, self.settings.sync.shards, self.settings.sync.prefix).backlog()
        self.assertEqual(jobs, 2)
        self.assertAlmostEqual(age, 3.0, places=3)

    async def test_a_failing_user_holds_back_no_one_and_is_set_aside(self):
        """
        A user whose live profile has the wrong type (WRONGTYPE) fails the
        batch they were read in: the batch is synced again in halves, so
        every other user in it lands, and the bad job, pending, is claimed
        again and on its C{max_deliveries}-th delivery moved to the
        dead-letter stream with the user and the error, and logged.
        """
        bad = random.randrange(10**15, 10**16)
        await self.router.execute("SET", data_keys(bad)[0], "not a hash")
        self.addCleanup(lambda: self.router.execute("DEL", data_keys(bad)[0]))
        await self.queue.enqueue(bad, "logout")
        users = [await self.new_user() for _ in range(4)]
        expected = {user_id: await self.logged_out(user_id) for user_id in users}
        halved = when_logged(self, "sync: a batch failed; syncing it again in halves")
        set_aside = when_logged(self, "sync: a user's job failed 2 times; moved to the dead-letter stream")
        worker = self.worker(max_deliveries=2, claim_idle=0.3, claim_interval=0.1)
        self.assertIn("WRONGTYPE", await halved)
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= len(users)))
        for user_id in users:
            self.assertEqual(await self.mysql_profile(user_id), expected[user_id])
        self.assertIn("WRONGTYPE", await set_aside)
        self.assertEqual((worker.counters["dead_lettered"], await self.pending(), await self.queued()), (1, 0, 0))
        shard = self.queue.shard_of(bad)
        [(_, fields)] = await self.router.execute("XRANGE", self.queue.dead_letters[shard], "-", "+")
        letter = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual((letter[b"user"], letter[b"deliveries"]), (str(bad).encode(), b"2"))
        self.assertTrue(letter[b"error"].startswith(b"ResponseError: WRONGTYPE"), letter)


class OutageTests(SyncCase):

    async def test_mariadb_down_for_twenty_seconds_loses_nothing(self):
        """Jobs that arrive while MariaDB is stopped stay pending, are retried, and are all synced after it returns."""
        users = [await self.new_user() for _ in range(40)]
        sessions = {u: await self.enter(u) for u in users}
        worker = self.worker(retry_backoff=0.2, retry_backoff_max=2)
        self.addCleanup(stack, "mysql-start")
        await stack("mysql-stop")
        stopped_at = reactor.seconds()
        expected = {}
        for i, user_id in enumerate(users):
            await self.change(user_id, 4, i, {(1, i): Item(10 + i, 0, i + 1)})
            expected[user_id] = await self.live.snapshot(user_id)
            await self.live.end_session(user_id, sessions[user_id])
            await self.queue.enqueue(user_id, "logout")
            retries = worker.counters["retries"]
            if reactor.seconds() - stopped_at < 20:
                await eventually(lambda: defer.succeed(worker.counters["retries"] > retries))
        await eventually(lambda: defer.succeed(reactor.seconds() - stopped_at >= 20 and worker.counters["retries"] > 0),
                         timeout=30)
        self.assertEqual(worker.counters["written"], 0)
        self.assertEqual(await self.queued(), 40)
        self.assertGreater(await self.pending(), 0)
        await stack("mysql-start")
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 40), timeout=60)
        for user_id in users:
            self.assertEqual(await self.mysql_profile(user_id), expected[user_id])
        self.assertEqual((await self.pending(), await self.queued()), (0, 0))
        # adbapi logs each broken connection it throws away ("Rollback failed").
        self.flushLoggedErrors(*MYSQL_UNAVAILABLE)
