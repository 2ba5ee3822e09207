"""/metrics on both servers after a scripted session: the counters moved by exactly what the session did."""

import random

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from dreamraid import game_tap
from dreamraid.client import RemoteError, SessionClient
from dreamraid.client.game import GameClient
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.metrics import Metrics

from tests.support import RunningServer
from tests.test_client_library import ServersCase


async def fetch(server, path):
    """C{(status, body bytes)} of a GET on a server's HTTP port."""
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{server.http_port}{path}".encode())
    return response.code, await readBody(response)


async def scrape(server):
    """C{{(sample name, labels as a sorted tuple): value}} of a server's /metrics."""
    status, body = await fetch(server, "/metrics")
    assert status == 200, status
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


class MetricsTests(ServersCase):

    async def test_counters_after_a_scripted_session(self):
        game_before, session_before = await scrape(self.game), await scrape(self.session)

        session = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        self.addCleanup(session.close)
        name = f"m_{random.getrandbits(40):x}"
        await session.register(name, "correct horse")
        login = await session.login(name, "correct horse")
        with self.assertRaises(RemoteError):
            await session.login(name, "wrong password")
        world = await session.enter_world(login.token)
        game = await GameClient.login(reactor, world.host, world.port, login.token)
        self.addCleanup(game.close)
        await game.hunt(1)
        with self.assertRaises(RemoteError) as raised:
            await game.hunt(1)
        self.assertEqual(raised.exception.code, ErrorCode.HUNT_COOLDOWN)
        await game.inventory()

        game_after, session_after = await scrape(self.game), await scrape(self.session)

        def moved(before, after, name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)

        for message, count in (("authenticate", 1), ("hunt", 2), ("list_inventory", 1)):
            self.assertEqual(moved(game_before, game_after, "dreamraid_messages_received_total", message=message), count)
            self.assertEqual(moved(game_before, game_after, "dreamraid_request_seconds_count", message=message), count)
        for message, count in (("authenticated", 1), ("hunted", 1), ("inventory", 1)):
            self.assertEqual(moved(game_before, game_after, "dreamraid_messages_sent_total", message=message), count)
        self.assertEqual(moved(game_before, game_after, "dreamraid_errors_total", code="HUNT_COOLDOWN"), 1)
        self.assertEqual(game_after[("dreamraid_players", ())], 1)
        self.assertEqual(game_after[("dreamraid_connections", ())], 1)
        self.assertGreater(moved(game_before, game_after, "dreamraid_redis_call_seconds_count"), 0)

        for message, count in (("register", 1), ("login", 2), ("enter_world", 1)):
            self.assertEqual(moved(session_before, session_after, "dreamraid_messages_received_total",
                                   message=message), count)
        self.assertEqual(moved(session_before, session_after, "dreamraid_errors_total", code="WRONG_CREDENTIALS"), 1)
        self.assertEqual(moved(session_before, session_after, "dreamraid_messages_sent_total", message="logged_in"), 1)
        # register, two logins (each finds the user, the right one records it) and enter_world's load
        self.assertGreaterEqual(moved(session_before, session_after, "dreamraid_mysql_query_seconds_count"), 5)
        self.assertIn(("dreamraid_sync_backlog", ()), session_after)
        self.assertIn(("dreamraid_sync_oldest_job_seconds", ()), session_after)
        self.assertEqual(game_after[("dreamraid_matchmaking_queue", (("group", "1"),))], 0)
        for reason in ("forged", "replayed", "unknown", "rate_limited", "bad_position", "unsent"):
            self.assertIn(("dreamraid_udp_datagrams_dropped_total", (("reason", reason),)), game_after)

    async def test_metrics_off_serves_no_metrics(self):
        server = RunningServer(game_tap, "game", ["--tokens-public-key", self.public_key, "--game-metrics", "off"])
        server.start(self)
        await server.part("Players").when_listening()
        status, _ = await fetch(server, "/metrics")
        self.assertEqual(status, 404)


class BucketsTests(TestCase):
    """The lock-free histograms, as Prometheus reads them."""

    def test_exposed_as_a_cumulative_histogram(self):
        clock = Clock()
        metrics = Metrics(clock, "test")
        for seconds in (0.0002, 0.003, 0.003, 7.0):
            started = clock.seconds()
            clock.advance(seconds)
            metrics.answered(packets.PING, packets.PONG, started)
        samples = {(s.name, s.labels.get("le")): s.value
                   for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
                   for s in family.samples if s.labels.get("message") in ("ping", "pong")}
        self.assertEqual(samples[("dreamraid_request_seconds_bucket", "0.0005")], 1)
        self.assertEqual(samples[("dreamraid_request_seconds_bucket", "0.005")], 3)
        self.assertEqual(samples[("dreamraid_request_seconds_bucket", "2.5")], 3)
        self.assertEqual(samples[("dreamraid_request_seconds_bucket", "+Inf")], 4)
        self.assertEqual(samples[("dreamraid_request_seconds_count", None)], 4)
        self.assertAlmostEqual(samples[("dreamraid_request_seconds_sum", None)], 7.0062)
        self.assertEqual(samples[("dreamraid_messages_received_total", None)], 4)
        self.assertEqual(samples[("dreamraid_messages_sent_total", None)], 4)

    def test_bucket_edges_belong_to_the_bucket_below(self):
        metrics = Metrics(Clock(), "test")  # the clock reads 0
        for started in (-0.0005, -0.00050001, -0.001, -2.5, -2.50001):
            metrics.answered(packets.PING, packets.PONG, started)
        buckets = metrics.latency.children["ping"]
        self.assertEqual(buckets.cumulative()[:2], [("0.0005", 1), ("0.001", 3)])
        self.assertEqual(buckets.cumulative()[-2:], [("2.5", 4), ("+Inf", 5)])

    def test_replies_counted_by_message_whatever_request_they_answer(self):
        metrics = Metrics(Clock(), "test")
        for request, reply in ((packets.PING, packets.PONG), (packets.PING, None), (packets.PING, packets.WELCOME),
                               (packets.HELLO, packets.WELCOME), (packets.PING, packets.PONG)):
            metrics.answered(request, reply, 0.0)
        metrics.replied(packets.PONG)
        samples = {(s.name, s.labels.get("message")): s.value
                   for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
                   for s in family.samples}
        self.assertEqual(samples[("dreamraid_messages_sent_total", "pong")], 3)
        self.assertEqual(samples[("dreamraid_messages_sent_total", "welcome")], 2)
        self.assertEqual(samples[("dreamraid_messages_received_total", "ping")], 4)
        self.assertEqual(samples[("dreamraid_messages_received_total", "hello")], 1)
