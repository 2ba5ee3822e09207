"""
The JSON-lines log output (L{dreamraid.logs}): what a line holds for an event,
and a real `twistd --logger dreamraid.logs.json_lines dreamraid-game` whose
standard output is JSON, line by line.
"""

import io
import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dreamraid.logs import event_as_json_line, json_lines
from tests.support import ROOT, STACK_CONFIG, eventually, free_port, require_stack


class JSONLinesObserverTests(SynchronousTestCase):
    """L{json_lines} writes each event as one flat JSON object on a line of its own."""

    def setUp(self):
        self.out = io.StringIO()
        self.log = Logger(namespace="dreamraid.services.sample", observer=json_lines(self.out))

    def records(self):
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"), text)
        return [json.loads(line) for line in text.splitlines()]

    def test_observer(self):
        """What L{json_lines} makes is a twisted.logger observer, which twistd's --logger needs."""
        self.assertTrue(verifyObject(ILogObserver, json_lines(io.StringIO())))

    def test_fields_kept(self):
        """A line holds time, level, namespace, the formatted message and the event's own fields, no log_ keys."""
        self.log.warn("user {user_id} left raid {raid_id}: {error}", user_id=42, raid_id="r-7", error="gone",
                      scores={"42": 10}, members=[42, 43])
        [record] = self.records()
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "dreamraid.services.sample")
        self.assertEqual(record["message"], "user 42 left raid r-7: gone")
        self.assertEqual((record["user_id"], record["raid_id"], record["error"]), (42, "r-7", "gone"))
        self.assertEqual((record["scores"], record["members"]), ({"42": 10}, [42, 43]))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual([key for key in record if key.startswith("log_")], [])
        self.assertNotIn("traceback", record)

    def test_time_is_utc(self):
        """The time is the event's, in ISO 8601 UTC to the millisecond."""
        line = event_as_json_line({"log_time": 86400.25, "log_level": LogLevel.info, "log_namespace": "n",
                                   "log_format": "x"})
        self.assertEqual(json.loads(line)["time"], "1970-01-02T00:00:00.250Z")

    def test_failure_as_traceback(self):
        """A failure logged inside an except comes out as a traceback string, beside the event's fields."""
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("raid {raid_id} ended, but its end failed", raid_id="r-1")
        [record] = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "raid r-1 ended, but its end failed")
        self.assertEqual(record["raid_id"], "r-1")
        self.assertIn("Traceback", record["traceback"])
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_unserialisable_values_become_text(self):
        """Values JSON cannot hold (exceptions, objects, bytes, NaN) come out as their text; the line stays JSON."""

        class Peer:
            def __str__(self):
                return "IPv4Address(TCP, '127.0.0.1', 4000)"

        self.log.info("odd values", error=ConnectionRefusedError("refused"), bare=TimeoutError(), peer=Peer(),
                      raw=b"\x00ab", ratio=float("nan"), keyed={(1, 2): 3})
        [record] = self.records()
        self.assertEqual(record["error"], "ConnectionRefusedError: refused")
        self.assertEqual(record["bare"], "TimeoutError")
        self.assertEqual(record["peer"], "IPv4Address(TCP, '127.0.0.1', 4000)")
        self.assertEqual(record["raw"], "b'\\x00ab'")
        self.assertEqual(record["ratio"], "nan")
        self.assertEqual(record["keyed"], "{(1, 2): 3}")

    def test_one_line_per_event(self):
        """Each event is exactly one line, even when its message or a field holds newlines."""
        self.log.info("first\nsecond line", detail="a\nb")
        self.log.info("third")
        records = self.records()
        self.assertEqual(len(self.out.getvalue().splitlines()), 2)
        self.assertEqual([r["message"] for r in records], ["first\nsecond line", "third"])
        self.assertEqual(records[0]["detail"], "a\nb")

    def test_bad_format_still_a_line(self):
        """An event whose format names a missing field still gives a JSON line saying so."""
        self.log.info("user {user_id} entered")
        [record] = self.records()
        self.assertIn("Unable to format event", record["message"])

    def test_stdout_by_default(self):
        """With no file given, the lines go to the standard output of the moment the observer is made."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = json_lines()
        self.patch(sys, "stdout", io.StringIO())  # as twistd does once logging begins
        Logger(namespace="n", observer=observer).info("hello {user_id}", user_id=1)
        self.assertEqual(json.loads(out.getvalue())["user_id"], 1)


class _Output(protocol.ProcessProtocol):
    """A child's standard output and standard error, apart, and its end."""

    def __init__(self):
        self.out, self.err = b"", b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def records(self):
        """The complete lines of standard output so far, each parsed as JSON."""
        complete = self.out.decode()[:self.out.decode().rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines()]


class TwistdJSONLinesTests(TestCase):
    """`twistd --logger dreamraid.logs.json_lines dreamraid-game` logs JSON lines to its standard output."""

    def setUp(self):
        require_stack()

    async def run_game_server(self):
        port, http_port = free_port(), free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [twistd, "-n", "--pidfile=", "--logger", "dreamraid.logs.json_lines", "dreamraid-game",
                "--config", str(STACK_CONFIG), "--game-listen", f"tcp:{port}:interface=127.0.0.1",
                "--game-http-listen", f"tcp:{http_port}:interface=127.0.0.1", "--game-udp-port", "0"]
        child = _Output()
        reactor.spawnProcess(child, twistd, args, env=dict(os.environ), path=str(ROOT))
        self.addCleanup(lambda: child.ended if child.ended.called else self.stop(child))

        async def started():
            if child.ended.called:
                raise AssertionError(f"the server exited at start:\n{child.out.decode()}{child.err.decode()}")
            messages = [r["message"] for r in child.records()]
            return f"GameFactory starting on {port}" in messages and any(
                m.startswith("redis cluster: slot table from") for m in messages)

        await eventually(started)
        await self.stop(child)
        return child

    def stop(self, child):
        child.transport.signalProcess("TERM")
        return child.ended

    @defer.inlineCallbacks
    def test_game_server_logs_json_lines(self):
        """Every line it prints from start-up to shutdown is a JSON record, its own service's lines among them."""
        child = yield defer.Deferred.fromCoroutine(self.run_game_server())
        lines = child.out.decode().splitlines()
        self.assertTrue(child.out.endswith(b"\n"))
        records = [json.loads(line) for line in lines]
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record), record)
        starting = [r for r in records if r["message"].startswith("twistd ") and "starting up" in r["message"]]
        self.assertEqual(len(starting), 1, lines)
        self.assertEqual(starting[0]["level"], "info")
        slot_table = next(r for r in records if r["message"].startswith("redis cluster: slot table from"))
        self.assertEqual(slot_table["namespace"], "dreamraid.services.rediscluster.RedisCluster")
        self.assertIn("source", slot_table)
        self.assertEqual(records[-1]["message"], "Server Shut Down.")
        self.assertNotIn(b"Traceback", child.err)
