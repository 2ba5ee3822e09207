"""
The cluster router against the real 6-node Redis Cluster: routing,
redirects during a live slot migration, pipelines, transactions, scripts,
cancellation, backpressure, and the faults (SIGSTOP, kill -9, planned
failover).  Fault tests put the cluster back as they found it.
"""

import collections
import random
import signal

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

import txredisapi

from dreamraid.services.rediscluster import (
    ClusterBusy, ClusterUnavailable, CrossSlotError, DeadlineExceeded, OutcomeUnknown,
    RedisCluster, Script, TransactionAborted, key_slot,
)
from tests import cluster
from tests.support import eventually, free_port, require_stack, stack


class ClusterTestCase(TestCase):
    """Starts routers on the local cluster and stops them after each test."""

    timeout = 120

    def setUp(self):
        require_stack()
        self.routers = []

    async def tearDown(self):
        for started in self.routers:
            await started.stopService()

    async def router(self, cls=RedisCluster, **overrides):
        started = cluster.router(cls, **overrides)
        self.routers.append(started)
        await started.refresh()
        return started


class RoutingTests(ClusterTestCase):

    async def test_discovers_past_dead_startup_nodes(self):
        """Startup nodes that refuse connections are skipped; the table matches CLUSTER SLOTS."""
        dead = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
        started = RedisCluster(reactor, random.Random(1), dead + cluster.NODES[-1:],
                               connect_timeout=1.0, command_timeout=1.0)
        started.startService()
        self.routers.append(started)
        await started.refresh()
        self.assertEqual(len(started.masters()), 3)
        for key in ["a", "b{x}", "user:1", "{u:7}inventory"]:
            self.assertEqual(started.node_for(key), await cluster.master_of(key))

    async def test_commands_reach_the_right_master(self):
        """Writes and reads over all three masters; bytes come back as written."""
        router = await self.router()
        keys = [f"route:{i}" for i in range(300)]
        self.assertEqual(len({router.node_for(k) for k in keys}), 3)
        await defer.gatherResults([router.execute("SET", k, k.encode() + b"\xff") for k in keys])
        values = await defer.gatherResults([router.execute("GET", k) for k in keys])
        self.assertEqual(values, [k.encode() + b"\xff" for k in keys])
        for key in keys[:5]:
            direct = await cluster.node_command(router.node_for(key), "GET", key)
            self.assertEqual(direct, key.encode() + b"\xff")

    async def test_cross_slot_refused_before_sending(self):
        """A multi-key command or transaction over two slots fails at once and sends nothing."""
        router = await self.router()
        self.assertNotEqual(key_slot("cross:a"), key_slot("cross:b"))
        with self.assertRaises(CrossSlotError):
            router.execute("MGET", "cross:a", "cross:b")
        with self.assertRaises(CrossSlotError):
            router.pipeline([("GET", "x"), ("DEL", "cross:a", "cross:b")])
        with self.assertRaises(CrossSlotError):
            await router.transaction([("SET", "cross:a", 1), ("SET", "cross:b", 1)])
        self.assertEqual(router.counters["errors"], 0)
        # With a hash tag the same keys share a slot and go through.
        await router.execute("MSET", "{cross}:a", 1, "{cross}:b", 2)
        self.assertEqual(await router.execute("MGET", "{cross}:a", "{cross}:b"), [b"1", b"2"])

    async def test_transaction_in_one_slot(self):
        """MULTI/EXEC runs atomically on the slot's master; a refused command aborts it all."""
        router = await self.router()
        await router.execute("DEL", "{tx}:n", "{tx}:s")
        replies = await router.transaction([("INCR", "{tx}:n"), ("SET", "{tx}:s", "v"), ("INCR", "{tx}:n")])
        self.assertEqual(replies, [1, b"OK", 2])
        with self.assertRaises(TransactionAborted):
            await router.transaction([("INCR", "{tx}:n"), ("INCR", "{tx}:n", "too", "many")])
        self.assertEqual(await router.execute("GET", "{tx}:n"), b"2")

    async def test_script_loaded_once_called_by_sha(self):
        """A script's first call meets NOSCRIPT after SCRIPT FLUSH, loads it, and answers."""
        router = await self.router()
        script = Script(router, "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        key = "{script}:n"
        await router.execute("DEL", key)
        await cluster.node_command(router.node_for(key), "SCRIPT", "FLUSH")
        self.assertEqual(await script([key], [5]), 5)
        self.assertEqual(router.counters["noscript"], 1)
        self.assertEqual(await script([key], [5]), 10)
        self.assertEqual(router.counters["noscript"], 1)

    async def test_redis_errors_reach_the_caller(self):
        """An error reply that is not about routing is the caller's, unchanged and not retried."""
        router = await self.router()
        await router.execute("SET", "wrongtype", "x")
        with self.assertRaises(txredisapi.ResponseError) as raised:
            await router.execute("LPUSH", "wrongtype", "y")
        self.assertIn("WRONGTYPE", str(raised.exception))
        self.assertEqual(router.counters["retries"], 0)

    async def test_blocking_calls_reuse_a_dedicated_connection(self):
        """Blocking calls that end normally hand their connection to the next one; none uses the shared one."""
        router = await self.router()
        key = "{blocking}:list"
        await router.execute("DEL", key)
        await router.execute("RPUSH", key, "a", "b")
        first = await router.execute_blocking("BLPOP", key, 1, block=1.0)
        [idle] = router._idle_dedicated[router.node_for(key)]
        second = await router.execute_blocking("BLPOP", key, 1, block=1.0)
        self.assertEqual((first, second), ([key.encode(), b"a"], [key.encode(), b"b"]))
        self.assertEqual(router._idle_dedicated[router.node_for(key)], [idle])
        self.assertIsNone(await router.execute_blocking("BLPOP", key, 0.05, block=0.05))

    async def test_unreplicated_write_holds_up_no_other_call(self):
        """
        A write that waits for more replicas than exist reports OutcomeUnknown
        before its deadline, on a dedicated connection: plain calls to the
        same master meanwhile finish first, and nothing is dropped as hung.
        """
        router = await self.router(command_timeout=1.0)
        key = "{wait}:k"
        ended = []
        waiting = router.execute("SET", key, "durable", replicas=3)
        waiting.addErrback(lambda f: ended.append(f.value))
        self.assertEqual(await router.execute("SET", key + ":plain", "x"), b"OK")
        self.assertEqual(await router.execute("GET", key), b"durable")
        self.assertEqual(ended, [])
        await eventually(lambda: defer.succeed(ended))
        [error] = ended
        self.assertIsInstance(error, OutcomeUnknown)
        self.assertIn("1 of 3 replicas have it", str(error))
        self.assertEqual(router.counters["deadlines"], 0)
        self.assertEqual(len(router._idle_dedicated[router.node_for(key)]), 1)
        self.assertEqual(await router.execute("SET", key, "again", replicas=1), b"OK")
        self.assertEqual(len(router._idle_dedicated[router.node_for(key)]), 1)

    async def test_subscription_hears_publishes(self):
        """A subscription connects to its channel's master and hears what is published there."""
        router = await self.router()
        heard = []
        subscription = router.subscribe(["{news}:a"], lambda channel, message: heard.append((channel, message)))
        self.assertEqual(await subscription.when_subscribed(), router.node_for("{news}:a"))
        self.assertEqual(await router.publish("{news}:a", "hello"), 1)
        await eventually(lambda: defer.succeed(heard == [(b"{news}:a", b"hello")]))

    async def test_cancelled_call_never_gets_another_calls_reply(self):
        """Cancel every third of 3,000 GETs: the others each get their own key's value."""
        router = await self.router()
        keys = [f"cancel:{i % 7}:{i}" for i in range(3000)]
        await router.pipeline([("SET", k, k) for k in keys])
        calls = [router.execute("GET", k) for k in keys]
        for call in calls[::3]:
            call.cancel()
        results = await defer.DeferredList(calls, consumeErrors=True)
        for i, (ok, value) in enumerate(results):
            if i % 3 == 0:
                self.assertFalse(ok)
                value.trap(defer.CancelledError)
            else:
                self.assertEqual(value, keys[i].encode())
        # The connection is still in step: new calls get their own replies.
        self.assertEqual(await router.execute("GET", keys[0]), keys[0].encode())

    async def test_in_flight_cap_holds_under_ten_thousand_calls(self):
        """10,000 concurrent calls never put more than the cap in flight at one master, and all succeed."""
        peaks = collections.Counter()

        class Watched(RedisCluster):
            def _send(self, call, node, protocol):
                super()._send(call, node, protocol)
                peaks[node.address] = max(peaks[node.address], node.in_flight)

        router = await self.router(Watched, max_in_flight=25, max_waiting=10000)
        calls = [router.execute("INCR", f"cap:{i % 100}") for i in range(10000)]
        await defer.gatherResults(calls)
        self.assertEqual(max(peaks.values()), 25)
        total = await defer.gatherResults([router.execute("GET", f"cap:{i}") for i in range(100)])
        self.assertGreaterEqual(sum(int(v) for v in total), 10000)

    async def test_full_waiting_line_refuses(self):
        """Beyond the cap and the waiting line, calls fail at once with ClusterBusy."""
        router = await self.router(max_in_flight=1, max_waiting=5)
        calls = [router.execute("INCR", "{busy}") for _ in range(20)]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual(sum(ok for ok, _ in results), 6)
        for ok, value in results:
            if not ok:
                value.trap(ClusterBusy)


class MigrationTests(ClusterTestCase):

    async def test_live_slot_migration(self):
        """
        ASK while the slot migrates (table unchanged), TRYAGAIN for a split
        multi-key read, MOVED once it is done (table repointed), a stale
        router's pipeline keeps its order, a stale router's transaction is
        aborted whole and repointed, and no write is lost or misplaced.
        """
        router = await self.router()
        stale = await self.router()
        stale_transactions = await self.router()
        a, b, c = "{mig}:a", "{mig}:b", "{mig}:c"
        slot = key_slot(a)
        source = router.node_for(a)
        target = next(m for m in router.masters() if m != source)
        await router.execute("DEL", a, b, c)
        await router.execute("MSET", a, "va", b, "vb")
        try:
            await cluster.begin_migration(slot, source, target)
            await cluster.node_command(source, "MIGRATE", target[0], target[1], "", 0, 5000, "KEYS", a)

            self.assertEqual(await router.execute("GET", a), b"va")
            self.assertEqual(router.counters["ask"], 1)
            self.assertEqual(await router.execute("GET", b), b"vb")
            self.assertEqual(await router.execute("SET", c, "vc"), b"OK")
            self.assertEqual(router.counters["ask"], 2)
            self.assertEqual(router.node_for(a), source)
            with self.assertRaises(ClusterUnavailable):
                await router.execute("MGET", a, b, timeout=0.3)
            self.assertGreaterEqual(router.counters["tryagain"], 1)

            await cluster.migrate_keys(slot, source, target)
            await cluster.finish_migration(slot, target)
            self.assertEqual(await router.execute("GET", b), b"vb")
            self.assertGreaterEqual(router.counters["moved"], 1)
            self.assertEqual(router.node_for(a), target)

            with self.assertRaises(TransactionAborted):
                await stale_transactions.transaction([("GET", a), ("SET", c, "changed")])
            self.assertEqual(stale_transactions.node_for(a), target)
            self.assertEqual(await stale_transactions.transaction([("GET", c)]), [b"vc"])

            others = [f"pipe:{i}" for i in range(6)]
            commands = [("SET", others[0], 0), ("GET", a), ("SET", others[1], 1), ("GET", c),
                        ("GET", others[0]), ("GET", b), ("GET", others[1])]
            results = await stale.pipeline(commands)
            self.assertEqual(results, [b"OK", b"va", b"OK", b"vc", b"0", b"vb", b"1"])
            self.assertGreaterEqual(stale.counters["moved"], 1)
            self.assertEqual(await cluster.node_command(target, "MGET", a, b, c), [b"va", b"vb", b"vc"])
            self.assertEqual(await cluster.node_command(source, "CLUSTER", "COUNTKEYSINSLOT", slot), 0)
        finally:
            await cluster.move_slot(slot, target, source)
        self.assertEqual(await router.execute("MGET", a, b, c), [b"va", b"vb", b"vc"])
        self.assertEqual(router.node_for(a), source)


class FaultTests(ClusterTestCase):
    """Each test breaks a master and restores the original layout afterwards."""

    timeout = 180

    async def tearDown(self):
        await super().tearDown()
        await cluster.restore()

    async def test_sigstop_master_calls_end_by_deadline(self):
        """A hung master fails its calls by their deadline; other masters are untouched; SIGCONT heals."""
        router = await self.router()
        victim = router.masters()[0]
        hung = cluster.keys_on(router, victim, 20, "stop")
        healthy = [k for k in (f"stop:other:{i}" for i in range(200)) if router.node_for(k) != victim][:20]
        cluster.signal_node(victim, signal.SIGSTOP)
        try:
            started = reactor.seconds()
            calls = [router.execute("GET", k, timeout=0.5) for k in hung]
            calls += [router.execute("SET", k, 1, timeout=0.5) for k in hung]
            served = await defer.gatherResults([router.execute("SET", k, 1, timeout=0.5) for k in healthy])
            self.assertEqual(served, [b"OK"] * len(healthy))
            results = await defer.DeferredList(calls, consumeErrors=True)
            elapsed = reactor.seconds() - started
        finally:
            cluster.signal_node(victim, signal.SIGCONT)
        self.assertLess(elapsed, 0.5 + 0.2)
        for i, (ok, value) in enumerate(results):
            self.assertFalse(ok)
            value.trap(OutcomeUnknown if i >= len(hung) else DeadlineExceeded)
        self.assertEqual(await router.execute("SET", hung[0], "back"), b"OK")

    async def test_planned_failover_is_invisible(self):
        """
        CLUSTER FAILOVER under steady traffic: zero errors; a script missing
        from the promoted replica is reloaded; a blocked XREADGROUP resumes on
        the new master and the group's pending entries are all still there.
        """
        router = await self.router()
        # Not the shard the kill test fails over: masters refuse a second
        # vote for one shard within two node timeouts.
        victim = router.masters()[1]
        replica = await cluster.replica_of(victim)
        key = cluster.keys_on(router, victim, 1, "planned")[0]
        stream = key + ":stream"
        script = Script(router, "return redis.call('INCR', KEYS[1])")
        await router.execute("DEL", key, stream)
        self.assertEqual(await script([key]), 1)
        # Script caches are not replicated: a replica that was never a
        # master with this script loaded lacks it (flushed here so earlier
        # runs on this cluster do not matter).
        await cluster.node_command(replica, "SCRIPT", "FLUSH")
        await router.execute("XGROUP", "CREATE", stream, "g", "0", "MKSTREAM")
        added = [await router.execute("XADD", stream, "*", "n", i) for i in range(3)]
        await router.execute("XREADGROUP", "GROUP", "g", "c1", "STREAMS", stream, ">")
        blocked = router.execute_blocking(
            "XREADGROUP", "GROUP", "g", "c1", "BLOCK", 20000, "STREAMS", stream, ">", block=20.0)

        errors, done, stopping = [], [0], []
        traffic_keys = [f"steady:{i}" for i in range(30)]

        async def traffic(k):
            while not stopping:
                try:
                    await router.execute("SET", k, done[0])
                    await router.execute("GET", k)
                    done[0] += 1
                except Exception as e:
                    errors.append(e)

        flows = [defer.ensureDeferred(traffic(k)) for k in traffic_keys]
        await eventually(lambda: defer.succeed(done[0] > 100))
        await cluster.failover_to(replica)
        before = done[0]
        await eventually(lambda: defer.succeed((router.node_for(key) == replica and done[0] > before + 300)))
        stopping.append(True)
        await defer.gatherResults(flows)
        self.assertEqual(errors, [])

        self.assertEqual(await cluster.node_command(replica, "SCRIPT", "EXISTS", script.sha), [0])
        noscript = router.counters["noscript"]
        self.assertEqual(await script([key]), 2)
        self.assertEqual(router.counters["noscript"], noscript + 1)

        new_id = await router.execute("XADD", stream, "*", "n", 3)
        [[_, entries]] = await blocked
        self.assertEqual([entry[0] for entry in entries], [new_id])
        pending = await router.execute("XPENDING", stream, "g")
        self.assertEqual(pending[0], 4)
        claimed = await router.execute("XAUTOCLAIM", stream, "g", "c2", 0, "0")
        self.assertEqual([entry[0] for entry in claimed[1]], added + [new_id])
        self.assertEqual(await router.execute("XACK", stream, "g", *added, new_id), 4)

    async def test_kill_master_under_writes(self):
        """
        kill -9 of a master under a steady stream of replicated writes: calls
        in the window fail fast or succeed, traffic resumes by itself after
        the promotion, a subscription comes back, and every write reported
        done is readable after the node returns as a replica.
        """
        router = await self.router(command_timeout=1.0)
        victim = router.masters()[0]
        victim_tags = [k.split("{")[1].rstrip("}") for k in cluster.keys_on(router, victim, 3, "kill")]
        other_tags = [k.split("{")[1].rstrip("}") for k in
                      (f"kill:{{o{i}}}" for i in range(100)) if router.node_for(k) != victim][:6]
        tags = victim_tags + other_tags
        channel = cluster.keys_on(router, victim, 1, "news")[0]
        heard = []
        subscription = router.subscribe([channel], lambda _, message: heard.append(message))
        self.assertEqual(await subscription.when_subscribed(), victim)

        acknowledged, failures, slow, stopping = {}, collections.Counter(), [], []

        async def writer():
            i = 0
            while not stopping:
                key, value = f"kill:{{{tags[i % len(tags)]}}}:{i}", str(i).encode()
                started = reactor.seconds()
                try:
                    await router.execute("SET", key, value, replicas=1)
                    acknowledged[key] = value
                except ClusterUnavailable as e:
                    failures[type(e).__name__] += 1
                    if reactor.seconds() - started > 1.0 + 0.1:
                        slow.append(reactor.seconds() - started)
                i += 1

        writing = defer.ensureDeferred(writer())
        # Whatever fails below, the writer stops with the test (an endless writer hangs the whole run).
        self.addCleanup(lambda: stopping.append(True) or writing)
        await eventually(lambda: defer.succeed(len(acknowledged) > 200))
        cluster.signal_node(victim, signal.SIGKILL)
        killed_at = len(acknowledged)
        probe = f"kill:{{{victim_tags[0]}}}:probe"
        survivor = next(a for a in cluster.NODES if a != victim)

        async def promoted():
            return await cluster.master_of(probe, asked=survivor) != victim

        await eventually(promoted, timeout=30)

        async def resumed():
            try:
                return await router.execute("SET", probe, "after") == b"OK"
            except ClusterUnavailable:
                return False

        await eventually(resumed, timeout=30)
        self.assertNotEqual(router.node_for(probe), victim)

        async def heard_again():
            try:
                await router.publish(channel, "after failover")
            except ClusterUnavailable:
                return False
            return b"after failover" in heard

        await eventually(heard_again, timeout=30)
        self.assertGreaterEqual(subscription.reconnects, 1)

        await stack("ensure")

        async def rejoined_as_replica():
            try:
                return "slave" in (await cluster.cluster_nodes(victim))[victim][0]
            except Exception:
                return False

        await eventually(rejoined_as_replica, timeout=60)
        back = len(acknowledged)
        await eventually(lambda: defer.succeed(
            any(k.startswith(f"kill:{{{victim_tags[0]}}}") for k in list(acknowledged)[back:])), timeout=60)
        stopping.append(True)
        await writing

        self.assertGreater(killed_at, 200)
        self.assertEqual(slow, [])
        self.assertLessEqual(set(failures), {"OutcomeUnknown", "DeadlineExceeded", "ClusterUnavailable"})
        keys = list(acknowledged)
        values = await defer.gatherResults([router.execute("GET", k) for k in keys])
        lost = [k for k, v in zip(keys, values) if v != acknowledged[k]]
        self.assertEqual(lost, [])
