"""
The cluster router without a cluster: command encoding, where keys are,
parsing CLUSTER SLOTS, and deadlines driven by a fake clock against nodes
that never answer.
"""

import random

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.services.rediscluster import (
    TICK, ClusterUnavailable, CrossSlotError, DeadlineExceeded, RedisCluster,
    _describe_changes, _Node, encode_command, parse_cluster_slots,
)
from dreamraid.services.rediscommands import UnknownCommand, command_keys


class EncodeTests(SynchronousTestCase):

    def test_resp_of_every_argument_type(self):
        self.assertEqual(
            encode_command(("SET", b"k\xff", 12, 1.5, "é")),
            b"*5\r\n$3\r\nSET\r\n$2\r\nk\xff\r\n$2\r\n12\r\n$3\r\n1.5\r\n$2\r\n\xc3\xa9\r\n",
        )

    def test_subclasses_and_buffers(self):
        """Subclasses of str and int and other byte buffers encode as their base type."""
        class Name(str):
            pass

        class Count(int):
            pass

        self.assertEqual(encode_command((Name("GET"), Count(7), bytearray(b"ab"), memoryview(b"c"))),
                         b"*4\r\n$3\r\nGET\r\n$1\r\n7\r\n$2\r\nab\r\n$1\r\nc\r\n")

    def test_other_types_refused(self):
        """None and bools are refused: Redis has no such values, and True as "1" would be a guess."""
        for value in (None, True, [1]):
            with self.assertRaises(TypeError):
                encode_command(("SET", "k", value))


class CommandKeysTests(SynchronousTestCase):

    def test_fixed_positions(self):
        self.assertEqual(command_keys("GET", ("GET", "a")), ["a"])
        self.assertEqual(command_keys("MSET", ("MSET", "a", 1, "b", 2)), ["a", "b"])
        self.assertEqual(command_keys("BLPOP", ("BLPOP", "a", "b", 0)), ["a", "b"])
        self.assertEqual(command_keys("XGROUP", ("XGROUP", "CREATE", "s", "g", "$")), ["s"])
        self.assertEqual(command_keys("PING", ("PING",)), [])

    def test_movable_keys(self):
        self.assertEqual(command_keys("EVALSHA", ("EVALSHA", "sha", 2, "a", "b", "x")), ["a", "b"])
        self.assertEqual(command_keys("ZUNIONSTORE", ("ZUNIONSTORE", "d", 2, "a", "b")), ["d", "a", "b"])
        self.assertEqual(
            command_keys("XREADGROUP", ("XREADGROUP", "GROUP", "g", "c", "BLOCK", 5,
                                        "STREAMS", "s1", "s2", ">", ">")),
            ["s1", "s2"],
        )

    def test_unknown_command_refused(self):
        with self.assertRaises(UnknownCommand):
            command_keys("NOSUCH", ("NOSUCH", "a"))


class TopologyTests(SynchronousTestCase):

    def test_parse_cluster_slots(self):
        reply = [
            [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
            [5461, 16383, [b"", 7001, b"id1"]],
        ]
        ranges, replicas = parse_cluster_slots(reply, ("10.0.0.9", 7001))
        self.assertEqual(ranges, {(0, 5460): ("127.0.0.1", 7000), (5461, 16383): ("10.0.0.9", 7001)})
        self.assertEqual(replicas, {("127.0.0.1", 7003)})

    def test_changes_described_as_ranges(self):
        a, b = _Node(("h", 1)), _Node(("h", 2))
        old = [a] * 10 + [None] * 16374
        new = [a] * 5 + [b] * 5 + [b] * 16374
        self.assertEqual(_describe_changes(old, new), ["slots 5-9: h:1 -> h:2", "slots 10-16383: nobody -> h:2"])


class DeadlineTests(SynchronousTestCase):
    """Nodes that never answer: every call still ends, by its deadline."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.router = RedisCluster(self.clock, random.Random(3), [("10.0.0.1", 7000)],
                                   connect_timeout=1.0, command_timeout=0.5)
        self.router.startService()

    def ended_at(self, d):
        ended = []
        d.addBoth(lambda result: ended.append((self.clock.seconds(), result)))
        while not ended and self.clock.seconds() < 10:
            self.clock.advance(TICK / 2)
        self.assertTrue(ended, "the call never ended")
        return ended[0]

    def test_no_topology_fails_by_deadline(self):
        """With no node reachable the call is retried, then fails by its deadline."""
        when, result = self.ended_at(self.router.execute("GET", "k"))
        self.assertLessEqual(when, 0.5 + TICK)
        self.assertIsInstance(result.value, ClusterUnavailable)
        self.assertGreater(self.router.counters["retries"], 0)

    def test_connection_that_never_opens_fails_by_deadline(self):
        """A master whose connection never completes: DeadlineExceeded at the deadline."""
        self.router._install({(0, 16383): ("10.0.0.2", 7000)}, set(), ("10.0.0.2", 7000))
        when, result = self.ended_at(self.router.execute("GET", "k", timeout=0.3))
        self.assertTrue(0.3 <= when <= 0.3 + TICK, when)
        self.assertIsInstance(result.value, DeadlineExceeded)

    def test_cross_slot_refused_without_connecting(self):
        connecting = len(self.clock.tcpClients)
        with self.assertRaises(CrossSlotError):
            self.router.execute("DEL", "a", "b")
        self.assertEqual(len(self.clock.tcpClients), connecting)

    def test_stop_fails_pending_calls_and_leaves_no_timers(self):
        pending = self.router.execute("GET", "k")
        stopped = self.router.stopService()
        self.assertIsInstance(self.failureResultOf(pending).value, ClusterUnavailable)
        self.successResultOf(stopped)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
