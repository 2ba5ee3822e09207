"""
Sync: users' live data written back from Redis to MySQL, batched, at least
once, never backwards.

Game servers (and the checkpointer) put a job, "sync user N", on one of
several Redis Streams (C{sync:jobs:{tag}}, the tags chosen so the shards spread
over the slot space and so over the masters).  Every session server reads all
shards through one consumer group.  A batch of jobs becomes one MySQL
transaction; its entries are acknowledged only after the commit, and a user's
live keys are removed only after the commit and only if nobody is online with
them and they have not changed since (L{LiveStore.evict}).  Each user's data
carries a version, so an older snapshot never overwrites a newer one.

A worker that dies leaves its jobs pending; others claim them with
C{XAUTOCLAIM} once they have been idle C{claim_idle} seconds.  While MySQL or
Redis is unavailable a batch is retried with backoff and nothing is
acknowledged, so nothing is lost.  A batch that fails otherwise (an error
reply, corrupt live data, a bug) is tried again in halves, so one bad user
holds back no one else; a job that still fails alone is left pending for
such a claim, and once delivered C{max_deliveries} times it is moved to its
shard's dead-letter stream (C{sync:dead:{tag}}) with the error, for an
operator.  Its user stays live and listed, so the checkpointer queues them
again: setting a job aside loses no data.  A consumer group Redis lost
(C{NOGROUP}: a flush, a failover to a replica that missed it) is created
again.  Every C{checkpoint_interval} one session server per shard enqueues
every live user of it (C{sync:live:{tag}}), which writes long sessions back
without ending them and sweeps up users whose game server died (their
session expires, and the next sync removes their keys).
"""

import socket

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from dreamraid.services.database import MYSQL_UNAVAILABLE
from dreamraid.services.deferreds import gather, pass_after
from dreamraid.services.failurelog import REDIS_ERRORS, FailureLog
from dreamraid.services.livestore import EVICTED
from dreamraid.services.rediscluster import SLOTS, RedisClusterError, key_slot

GROUP = "sync"
# Jobs kept in each shard's dead-letter stream, at most (about: Redis trims whole nodes).
DEAD_LETTERS_KEPT = 10_000
# What the sync retries with backoff: the stores are out of reach for now.
UNAVAILABLE = (RedisClusterError, *MYSQL_UNAVAILABLE)


def shard_tags(count):
    """
    C{count} hash tags, the i-th in the i-th C{count}-th of the slot space, so
    the shards spread over the masters as the slots do.
    """
    tags = []
    for shard in range(count):
        low, high = shard * SLOTS // count, (shard + 1) * SLOTS // count
        tags.append(next(tag for tag in (f"s{shard}.{k}" for k in range(1_000_000)) if low <= key_slot(tag) < high))
    return tags


class SyncQueue:
    """Where sync jobs and the live users of each shard are kept; game servers enqueue through this."""

    def __init__(self, router, clock, shards, prefix="sync"):
        self._router = router
        self._clock = clock
        self.tags = shard_tags(shards)
        self.streams = [f"{prefix}:jobs:{{{tag}}}" for tag in self.tags]
        self.live_sets = [f"{prefix}:live:{{{tag}}}" for tag in self.tags]
        self.checkpoint_locks = [f"{prefix}:checkpoint:{{{tag}}}" for tag in self.tags]
        self.dead_letters = [f"{prefix}:dead:{{{tag}}}" for tag in self.tags]

    async def backlog(self):
        """C{(jobs not yet acknowledged, age in seconds of the oldest, or 0)} over every shard."""
        jobs, oldest_ms = 0, None
        for stream in self.streams:
            if not await self._router.execute("EXISTS", stream):
                continue
            replies = await self._router.execute("XINFO", "GROUPS", stream, route=stream)
            groups = [dict(zip(g[::2], g[1::2])) for g in replies]
            info = next((g for g in groups if g[b"name"] == GROUP.encode()), None)
            first = None
            if info is None:
                # The group is gone (until a worker creates it again): every entry waits.
                jobs += await self._router.execute("XLEN", stream)
                entries = await self._router.execute("XRANGE", stream, "-", "+", "COUNT", 1)
                first = entries[0][0] if entries else None
            else:
                pending, lag = info[b"pending"], info.get(b"lag")
                # Redis cannot always tell how many wait unread (before 7.0, or with entries deleted past
                # the group's position, as after the group is made again): then every entry counts, since
                # acknowledged ones are deleted.
                jobs += pending + lag if lag is not None else await self._router.execute("XLEN", stream)
                if pending:
                    first = (await self._router.execute("XPENDING", stream, GROUP))[1]
                elif lag != 0:
                    entries = await self._router.execute("XRANGE", stream, b"(" + info[b"last-delivered-id"], "+",
                                                         "COUNT", 1)
                    first = entries[0][0] if entries else None
            if first is not None:
                ms = int(first.split(b"-")[0])
                oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        age = 0.0 if oldest_ms is None else max(0.0, self._clock.seconds() - oldest_ms / 1000)
        return jobs, age

    def shard_of(self, user_id):
        return user_id % len(self.tags)

    def enqueue(self, user_id, reason):
        """Ask for the user's live data to be written to MySQL (C{reason}: logout, checkpoint, ...); a Deferred."""
        stream = self.streams[self.shard_of(user_id)]
        return self._router.execute("XADD", stream, "*", "user", user_id, "reason", reason)

    def mark_live(self, user_id):
        """Note that the user's data is live, for the checkpointer; a Deferred."""
        live = self.live_sets[self.shard_of(user_id)]
        return self._router.execute("ZADD", live, int(self._clock.seconds()), user_id)

    def forget_live(self, shard, user_ids):
        """The users of C{shard} no longer have live data; a Deferred."""
        return self._router.execute("ZREM", self.live_sets[shard], *user_ids)


def thd_write_snapshots(connection, profiles):
    """
    Write the snapshots newer than MySQL's copy, in the caller's transaction:
    the profile row, the slots that changed (upserted), emptied slots
    removed, best scores raised.  The ids of the users written.

    The users' rows are locked first (in id order, so two batches never
    deadlock), and their stored slots are read and compared, so a checkpoint
    of a user who changed one slot writes one row.
    """
    if not profiles:
        return []
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, data_version FROM users WHERE id IN ({_ints(p.user_id for p in profiles)}) "
                       "ORDER BY id FOR UPDATE")
        stored = dict(cursor.fetchall())
        newer = [p for p in profiles if p.user_id in stored and p.version > stored[p.user_id]]
        if not newer:
            return []
        # Every value below is an int, written into the SQL as a literal:
        # PyMySQL escapes each parameter in Python, which costs more than
        # MariaDB takes to apply the batch.
        ids = [p.user_id for p in newer]
        id_list = _ints(ids)
        cases = [
            f"{column} = CASE id " + " ".join("WHEN %d THEN %d" % (p.user_id, value(p)) for p in newer) + " END"
            for column, value in (("level", lambda p: p.level), ("exp", lambda p: p.exp),
                                  ("data_version", lambda p: p.version))
        ]
        cursor.execute(f"UPDATE users SET {', '.join(cases)}, synced_at = CURRENT_TIMESTAMP(3) "
                       f"WHERE id IN ({id_list})")
        # One row per user (PyMySQL parses each value in Python: 500 rows
        # cost far less than the 4,000 of one per slot).
        cursor.execute("SELECT user_id, GROUP_CONCAT(CONCAT_WS(':', tab, slot, item_code, enhancement, count)) "
                       f"FROM inventory WHERE user_id IN ({id_list}) GROUP BY user_id")
        stored_slots = {}
        for user_id, slots in cursor.fetchall():
            for text in slots.split(","):
                tab, slot, code, enhancement, count = map(int, text.split(":"))
                stored_slots[user_id, tab, slot] = (code, enhancement, count)
        changed = []
        for p in newer:
            for (tab, slot), item in p.items.items():
                where = (p.user_id, tab, slot)
                if stored_slots.pop(where, None) != item:
                    changed.append(where + item)
        if changed:
            cursor.execute(
                "INSERT INTO inventory (user_id, tab, slot, item_code, enhancement, count) VALUES "
                + ",".join("(%d,%d,%d,%d,%d,%d)" % row for row in changed)
                + " ON DUPLICATE KEY UPDATE "
                "item_code = VALUES(item_code), enhancement = VALUES(enhancement), count = VALUES(count)"
            )
        if stored_slots:
            # The user_id list keeps it a primary-key range even for one
            # row (a lone row constructor scans the table, locking every row).
            cursor.execute(f"DELETE FROM inventory WHERE user_id IN ({_ints({u for u, _, _ in stored_slots})}) "
                           "AND (user_id, tab, slot) IN ("
                           + ",".join("(%d,%d,%d)" % where for where in stored_slots) + ")")
        scores = [(p.user_id, p.best) for p in newer if p.best > 0]
        if scores:
            cursor.execute(
                "INSERT INTO best_scores (user_id, score) VALUES "
                + ",".join("(%d,%d)" % score for score in scores)
                + " ON DUPLICATE KEY UPDATE "
                "achieved_at = IF(VALUES(score) > score, CURRENT_TIMESTAMP(3), achieved_at), "
                "score = GREATEST(score, VALUES(score))"
            )
        return ids


def _ints(values):
    """A comma-separated SQL list of ints (C{%d} refuses anything else)."""
    return ",".join("%d" % value for value in values)


class MysqlSnapshotStore:
    """Writes snapshots through a L{dreamraid.services.database.Database}'s pool, one transaction per call."""

    def __init__(self, database):
        self._database = database

    def write(self, profiles):
        """A Deferred of the ids written (see L{thd_write_snapshots})."""
        return self._database.run(thd_write_snapshots, profiles)


class SyncWorker(Service):
    """
    One session server's sync consumer: reads every shard, writes batches,
    acknowledges, evicts, claims jobs of dead consumers and checkpoints.
    Every loop carries on after a failure (L{FailureLog}).

    @ivar counters: batches, users written, jobs acknowledged, users
        evicted, retries, jobs claimed, checkpoint jobs queued, consumer
        groups created again after Redis lost them, batches that failed
        other than by an outage, jobs moved to a dead-letter stream.
    """

    _log = Logger()

    def __init__(self, router, queue, live, snapshots, clock, settings, consumer=None):
        self._router = router
        self._queue = queue
        self._live = live
        self._snapshots = snapshots
        self._clock = clock
        self._settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.counters = dict.fromkeys(
            ("batches", "written", "acked", "evicted", "retries", "claimed", "checkpoints", "groups_recreated",
             "batches_failed", "dead_lettered"), 0)
        self.largest_batch = 0
        self._failures = FailureLog(self._log, clock, (*REDIS_ERRORS, *MYSQL_UNAVAILABLE))
        self._loop = None
        self._sleeping = None
        self._next_claim = 0.0
        self._checkpoints = None

    def startService(self):
        super().startService()
        self._next_claim = self._clock.seconds() + self._settings.claim_interval
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self._log.failure("sync worker stopped by an error", f))
        self._checkpoints = task.LoopingCall(self._checkpoint)
        self._checkpoints.clock = self._clock
        self._checkpoints.start(self._settings.checkpoint_interval, now=False)

    def stopService(self):
        super().stopService()
        if self._checkpoints.running:
            self._checkpoints.stop()
        if self._sleeping is not None and not self._sleeping.called:
            self._sleeping.cancel()
        return self._loop

    # -- the loop ------------------------------------------------------------------

    async def _run(self):
        """
        Read jobs and sync them, up to C{batches_in_flight} batches at once, so
        one batch's MySQL transaction overlaps the next one's Redis work.  A
        user in two batches at once is safe: the older snapshot loses on
        version, and only the newest can unload the user.
        """
        await self._until_done("sync: cannot create the consumer groups", self._create_groups, Exception)
        in_flight = set()
        try:
            while self.running:
                jobs = await self._until_done("sync: cannot read jobs", self._read, Exception)
                if jobs is None:
                    return
                if not jobs and not await self._sleep(self._settings.batch_wait):
                    return
                for batch_jobs in self._batches(jobs):
                    while len(in_flight) >= self._settings.batches_in_flight:
                        await defer.DeferredList(list(in_flight), fireOnOneCallback=True, fireOnOneErrback=True)
                    batch = defer.Deferred.fromCoroutine(self._sync(batch_jobs))
                    in_flight.add(batch)
                    batch.addBoth(pass_after, in_flight.discard, batch)
        finally:
            await defer.DeferredList(list(in_flight))

    def _batches(self, jobs):
        """C{jobs} split into batches of at most C{batch_users} users (a user's jobs stay together)."""
        by_user = {}
        for job, user in jobs.items():
            by_user.setdefault(user, {})[job] = user
        users = list(by_user)
        size = self._settings.batch_users
        for start in range(0, len(users), size):
            yield {job: user for user in users[start:start + size] for job, user in by_user[user].items()}

    async def _until_done(self, what, work, retried=UNAVAILABLE):
        """
        C{await work()} until it succeeds, pausing longer after each failure
        of a C{retried} kind (others are raised); C{None} once stopped.
        """
        failures = 0
        while self.running:
            try:
                return await work()
            except retried:
                if not self.running:
                    return None
                failures += 1
                self.counters["retries"] += 1
                self._failures.failed(what)
            pause = min(self._settings.retry_backoff_max, self._settings.retry_backoff * 2 ** (failures - 1))
            if not await self._sleep(pause):
                return None
        return None

    async def _sleep(self, seconds):
        """Wait C{seconds} on the injected clock; C{False} if the service stopped meanwhile."""
        self._sleeping = task.deferLater(self._clock, seconds, lambda: None)
        try:
            await self._sleeping
        except defer.CancelledError:
            return False
        finally:
            self._sleeping = None
        return self.running

    async def _create_groups(self):
        for stream in self._queue.streams:
            try:
                await self._router.execute("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
            except txredisapi.ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise

    async def _read(self):
        """
        C{{(shard, entry id): user id}} of new jobs, and of claimed ones when
        a claim is due, from every shard that answered.  A shard's failure
        is raised only when no other shard handed over a job; otherwise it
        is logged and the shard read again next time, so jobs already
        delivered are synced at once, not left for a claim.  If Redis lost
        the consumer group (C{NOGROUP}), it is created again.
        """
        jobs, failures = await self._read_jobs()
        if not failures:
            return jobs
        lost = [f for f in failures if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOGROUP")]
        if lost:
            self._failures.failed("sync: the consumer group is gone, creating it again", lost[0])
            await self._create_groups()
            self.counters["groups_recreated"] += 1
            return jobs
        if not jobs:
            failures[0].raiseException()
        self._failures.failed("sync: cannot read jobs from a shard", failures[0])
        return jobs

    async def _read_jobs(self):
        """The jobs L{_read} returns, and the failures of the shards that failed."""
        per_shard = -(-self._settings.batch_users // len(self._queue.streams))
        jobs, failures = await self._per_shard(
            lambda stream: self._router.execute("XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", per_shard,
                                                "STREAMS", stream, ">"),
            lambda reply: [entry for _, entries in reply or () for entry in entries])
        if self._clock.seconds() >= self._next_claim:
            self._next_claim = self._clock.seconds() + self._settings.claim_interval
            idle_ms = int(self._settings.claim_idle * 1000)
            claimed, claim_failures = await self._per_shard(
                lambda stream: self._router.execute("XAUTOCLAIM", stream, GROUP, self.consumer, idle_ms, "0-0",
                                                    "COUNT", per_shard),
                lambda reply: reply[1])
            self.counters["claimed"] += len(claimed)
            jobs.update(claimed)
            failures += claim_failures
        return jobs, failures

    async def _per_shard(self, call, entries_of):
        """
        C{call(stream)} on every shard at once: the jobs in the entries
        C{entries_of(reply)} of those that answered, and the failures of
        the others.
        """
        outcomes = await defer.DeferredList([call(stream) for stream in self._queue.streams], consumeErrors=True)
        jobs, failures = {}, []
        for shard, (answered, reply) in enumerate(outcomes):
            if answered:
                jobs.update(_jobs(shard, entries_of(reply)))
            else:
                failures.append(reply)
        return jobs, failures

    # -- one batch -----------------------------------------------------------------

    async def _sync(self, jobs):
        """
        Write the users of C{jobs} in one transaction, then acknowledge and
        evict.  Unavailability is retried; any other failure splits the
        batch in halves, each synced on its own, down to single users
        (L{_failed_alone}).
        """
        users = sorted({user for user in jobs.values() if user is not None})
        try:
            written = await self._until_done("sync: cannot write a batch to MySQL", lambda: self._write(users))
            if written is None:
                return
            profiles, ids = written
            self.counters["batches"] += 1
            self.counters["written"] += len(ids)
            self.largest_batch = max(self.largest_batch, len(users))
            await self._until_done("sync: cannot acknowledge jobs", lambda: self._acknowledge(jobs))
        except Exception:
            self.counters["batches_failed"] += 1
            if len(users) < 2:
                await self._failed_alone(jobs, Failure())
                return
            self._failures.failed("sync: a batch failed; syncing it again in halves")
            half = set(users[:len(users) // 2])
            for part in (True, False):
                await self._sync({job: user for job, user in jobs.items() if (user in half) is part})
            return
        await self._evict(users, profiles)

    async def _failed_alone(self, jobs, failure):
        """
        The jobs of one user failed by C{failure}: those delivered
        C{max_deliveries} times go to their shard's dead-letter stream (the
        stream names the user; the log line, at most once a minute, does
        not), the rest stay pending until claimed.
        """
        for (shard, entry), user in jobs.items():
            stream = self._queue.streams[shard]
            try:
                pending = await self._router.execute("XPENDING", stream, GROUP, entry, entry, 1)
                if not pending:
                    continue  # another worker synced it meanwhile
                [[_, _, _, deliveries]] = pending
                if deliveries < self._settings.max_deliveries:
                    self._failures.failed("sync: a user's job failed; it stays pending until claimed", failure)
                    continue
                await self._router.transaction([
                    ("XADD", self._queue.dead_letters[shard], "MAXLEN", "~", DEAD_LETTERS_KEPT, "*",
                     "user", user if user is not None else "", "job", entry, "deliveries", deliveries,
                     "error", f"{type(failure.value).__name__}: {failure.value}"),
                    ("XACK", stream, GROUP, entry),
                    ("XDEL", stream, entry),
                ])
            except Exception:
                self._failures.failed("sync: cannot set a failing job aside; it stays pending")
                continue
            self.counters["dead_lettered"] += 1
            self._failures.failed(f"sync: a user's job failed {deliveries} times; moved to the dead-letter "
                                  f"stream {self._queue.dead_letters[shard]}", failure)

    async def _write(self, users):
        snapshots = await gather([self._live.snapshot(user) for user in users])
        profiles = {user: profile for user, profile in zip(users, snapshots) if profile is not None}
        ids = await self._snapshots.write(list(profiles.values()))
        return profiles, ids

    async def _acknowledge(self, jobs):
        by_shard = {}
        for shard, entry in jobs:
            by_shard.setdefault(shard, []).append(entry)
        calls = []
        for shard, entries in by_shard.items():
            stream = self._queue.streams[shard]
            calls.append(self._router.execute("XACK", stream, GROUP, *entries))
            calls.append(self._router.execute("XDEL", stream, *entries))
        await gather(calls)
        self.counters["acked"] += len(jobs)

    async def _evict(self, users, profiles):
        """Remove the live keys of users now safe in MySQL and offline; a failure is left to the next checkpoint."""
        try:
            outcomes = await gather([
                self._live.evict(user, profiles[user].version) for user in users if user in profiles])
            gone = [user for user in users if user not in profiles]
            gone += [user for user, outcome in zip([u for u in users if u in profiles], outcomes)
                     if outcome == EVICTED]
            by_shard = {}
            for user in gone:
                by_shard.setdefault(self._queue.shard_of(user), []).append(user)
            await gather([self._queue.forget_live(shard, ids) for shard, ids in by_shard.items()])
            self.counters["evicted"] += len(gone)
        except Exception:
            self._failures.failed("sync: cannot evict synced users (the next checkpoint will)")

    # -- checkpoints ---------------------------------------------------------------

    async def _checkpoint(self):
        """Enqueue every live user of each shard whose checkpoint lock this worker wins; a failed shard is skipped."""
        hold_ms = max(1, int(self._settings.checkpoint_interval * 1000 * 0.9))
        for shard, lock in enumerate(self._queue.checkpoint_locks):
            try:
                if await self._router.execute("SET", lock, self.consumer, "NX", "PX", hold_ms) is None:
                    continue
                users = await self._router.execute("ZRANGE", self._queue.live_sets[shard], 0, -1)
                await self._enqueue_checkpoints(users)
            except Exception:
                self._failures.failed("sync: checkpoint of a shard skipped")

    async def _enqueue_checkpoints(self, users):
        """
        A checkpoint job for each of C{users} (of one shard, so one master),
        half the router's in-flight cap at a time, so a large shard neither
        overflows the master's waiting line nor crowds out other calls.  A
        chunk that fails in part is logged and the round goes on; one that
        fails entirely ends the shard's round.
        """
        chunk = max(1, self._router.max_in_flight // 2)
        for start in range(0, len(users), chunk):
            outcomes = await defer.DeferredList(
                [self._queue.enqueue(int(user), "checkpoint") for user in users[start:start + chunk]],
                consumeErrors=True)
            failures = [outcome for queued, outcome in outcomes if not queued]
            self.counters["checkpoints"] += len(outcomes) - len(failures)
            if failures:
                self._failures.failed("sync: checkpoint jobs not queued", failures[0])
                if len(failures) == len(outcomes):
                    return


def _jobs(shard, entries):
    """C{{(shard, entry id): user id}}; a claimed entry that was deleted meanwhile has no fields (C{None})."""
    jobs = {}
    for entry, fields in entries:
        values = dict(zip(fields[::2], fields[1::2])) if fields else {}
        user = values.get(b"user")
        jobs[shard, entry] = int(user) if user is not None else None
    return jobs
