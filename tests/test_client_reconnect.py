"""
The client library stays connected by itself: backoff between attempts,
the heartbeat that finds a silent server, a resume after a drop with its
events, requests cut by the drop (reads sent again, others OutcomeUnknown);
all on in-memory transports and a task.Clock.
"""

import random

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dreamraid.client import ConnectionClosed, GameClient, OutcomeUnknown, Raid
from dreamraid.client.connection import ClientProtocol
from dreamraid.client.reconnect import BACKOFF_CAP, Backoff
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver

HEARTBEAT = (5.0, 5.0)
USER = 7


class _Frames(FrameReceiver):
    def __init__(self):
        self.frames = []

    def frameReceived(self, frame):
        self.frames.append(frame)


class AbortableTransport(StringTransport):
    """A StringTransport whose abort closes the connection as a real one would."""

    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()

    def loseConnection(self):
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))


class FakeServer:
    """The server end of one in-memory client connection: reads the client's requests and answers them."""

    def __init__(self, clock):
        self.client = ClientProtocol(clock, heartbeat=HEARTBEAT)
        self.transport = AbortableTransport()
        self.transport.protocol = self.client
        self.client.makeConnection(self.transport)
        self._reader = _Frames()
        self._read = 0

    def requests(self):
        """Every frame the client sent so far, as (message name, request id, body)."""
        data = self.transport.value()
        self._reader.dataReceived(data[self._read:])
        self._read = len(data)
        return [(m.name, i, b) for m, i, b in self._reader.frames]

    def last(self, name):
        return [r for r in self.requests() if r[0] == name][-1]

    def reply(self, message, request_id, body):
        self.client.dataReceived(message.encode(request_id, body))

    def error(self, request_id, code):
        self.client.dataReceived(packets.error_frame(request_id, code))

    def drop(self):
        self.transport.loseConnection()


FOUND = {"raid_id": "r1", "host": "127.0.0.1:9090", "ticket": "t1", "udp": "127.0.0.1:9090", "raid_number": 5,
         "member": 0, "key": "11" * 16, "members": [{"user_id": USER}, {"user_id": 8}]}
RESULT = {"raid_id": "r1", "cleared": True, "score": 12, "team_score": 30, "exp_gained": 12, "level": 5, "best": 12,
          "changed": []}
FIGHT = {"raid_id": "r1", "hp": 30, "sequence": 0, "deadline_ms": 1_000_000}


def resumed_body(raid_id=""):
    return {"user_id": USER, "name": "alice", "level": 3, "exp": 9, "party_code": "K3XQ7", "queued_group": 0,
            "raid_id": raid_id, "boss_hp": 0, "ms_left": 0, "score": 0}


class BackoffTests(TestCase):
    """The delays between reconnect attempts."""

    def test_delays_grow_with_jitter_and_are_capped_at_ten_seconds(self):
        backoff = Backoff(random.Random(5))
        delays = [backoff.delay(n) for n in range(12)]
        for n, delay in enumerate(delays):
            ceiling = min(BACKOFF_CAP, 0.5 * 2 ** n)
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (n, delay))
        self.assertEqual(BACKOFF_CAP, 10.0)
        self.assertTrue(all(d <= 10.0 for d in delays))
        self.assertTrue(delays[-1] >= 5.0)

    def test_the_jitter_comes_from_the_random_source_given(self):
        same = [Backoff(random.Random(1)).delay(3) for _ in range(2)]
        self.assertEqual(same[0], same[1])
        spread = {Backoff(random.Random(seed)).delay(3) for seed in range(20)}
        self.assertGreater(len(spread), 10)  # clients cut at once do not come back at once

    def test_a_huge_attempt_number_is_still_capped(self):
        self.assertLessEqual(Backoff(random.Random(2)).delay(10_000), BACKOFF_CAP)


class HeartbeatTests(TestCase):
    """The client's heartbeat finds a server that went silent."""

    def setUp(self):
        self.clock = task.Clock()
        self.server = FakeServer(self.clock)

    def test_a_silent_server_is_pinged_then_the_link_aborted(self):
        self.clock.advance(4.9)
        self.assertEqual(self.server.requests(), [])
        self.clock.advance(0.2)
        [(name, _, _)] = self.server.requests()
        self.assertEqual(name, "ping")
        self.clock.advance(4.9)
        self.assertFalse(self.server.transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.server.transport.aborted)
        self.assertTrue(self.server.client.closed.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_answered_ping_keeps_the_link(self):
        self.clock.advance(5.0)
        _, request_id, body = self.server.last("ping")
        self.clock.advance(1.0)
        self.server.reply(packets.PONG, request_id, body)
        self.clock.advance(4.5)
        self.assertFalse(self.server.transport.aborted)
        self.assertEqual(len(self.server.requests()), 1)  # the answer started the idle time over

    def test_anything_heard_puts_the_ping_off(self):
        for _ in range(5):
            self.clock.advance(4.0)
            self.server.client.dataReceived(packets.PING.encode(0, {"nonce": 1}))  # a server ping
        self.assertEqual([r for r in self.server.requests() if r[0] == "ping"], [])


class ReconnectingClientCase(TestCase):
    """A game client on a fake server and a task.Clock, whose next connects give C{servers}."""

    def setUp(self):
        self.clock = task.Clock()
        self.first = FakeServer(self.clock)
        self.client = GameClient(self.clock, self.first.client, ("127.0.0.1", 9090), USER, rng=random.Random(3),
                                 heartbeat=HEARTBEAT)
        self.client.token = "the-token"
        self.servers = []  # what the next connects give: FakeServers, or exceptions
        self.connects = []
        self.client._connect = self._connect
        self.events = []
        for event in ("reconnecting", "resumed", "entered_again", "reconnect_failed"):
            self.client.on(event, lambda *args, event=event: self.events.append((event, *args)))

    def _connect(self, host, port):
        self.connects.append((host, port))
        given = self.servers.pop(0)
        if isinstance(given, Exception):
            return defer.fail(given)
        return defer.succeed(given.client)

    def next_attempt(self):
        """Let the backoff before the pending reconnect attempt pass (the last reconnecting event's delay)."""
        self.clock.advance(self.events[-1][2])

    def resume_on(self, server, raid_id=""):
        """Let the pending reconnect attempt reach C{server} and answer its resume (kept in raid C{raid_id})."""
        self.servers.append(server)
        self.next_attempt()
        name, request_id, body = server.last("resume")
        self.assertEqual(body, {"token": "the-token", "user_id": 0, "ticket": ""})
        server.reply(packets.RESUMED, request_id, resumed_body(raid_id))


class ReconnectTests(ReconnectingClientCase):
    """A dropped game connection comes back by itself and resumes the player."""

    def test_a_drop_reconnects_resumes_and_fires_the_events_in_order(self):
        again = FakeServer(self.clock)
        self.first.drop()
        self.servers.append(ConnectionRefusedError())  # the first attempt fails: backoff, then again
        self.next_attempt()
        self.resume_on(again)
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "reconnecting", "resumed"])
        self.assertEqual([e[1] for e in self.events[:2]], [1, 2])
        resumed = self.events[2][1]
        self.assertEqual((resumed.player.name, resumed.party_code), ("alice", "K3XQ7"))
        self.assertIs(self.client.connection, again.client)
        self.assertEqual(self.connects, [("127.0.0.1", 9090)] * 2)

    def test_the_heartbeat_drop_reconnects_too(self):
        self.clock.advance(5.0)  # silent server: a ping...
        self.clock.advance(5.1)  # ...unanswered: the link is aborted
        self.assertTrue(self.first.transport.aborted)
        self.resume_on(FakeServer(self.clock))
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "resumed"])

    def test_a_change_in_flight_fails_with_outcome_unknown_and_is_not_sent_again(self):
        hunted = self.client.hunt(1)
        d = defer.ensureDeferred(hunted)
        self.first.drop()
        failure = self.failureResultOf(d, OutcomeUnknown)
        self.assertIsInstance(failure.value, ConnectionClosed)
        self.assertIn("hunt", str(failure.value))
        again = FakeServer(self.clock)
        self.resume_on(again)
        self.assertEqual([r[0] for r in again.requests()], ["resume"])

    def test_a_read_in_flight_is_sent_again_once_resumed(self):
        d = defer.ensureDeferred(self.client.inventory())
        self.assertEqual(self.first.requests()[-1][0], "list_inventory")
        self.first.drop()
        self.assertNoResult(d)
        again = FakeServer(self.clock)
        self.resume_on(again)
        name, request_id, _ = again.requests()[-1]
        self.assertEqual(name, "list_inventory")
        again.reply(packets.INVENTORY, request_id, {"items": [
            {"tab": 1, "slot": 0, "item_code": 201, "enhancement": 0, "count": 2}]})
        [item] = self.successResultOf(d)
        self.assertEqual(item.item_code, 201)

    def test_a_request_made_while_reconnecting_waits_for_the_resume(self):
        self.first.drop()
        d = defer.ensureDeferred(self.client.hunt(1))
        again = FakeServer(self.clock)
        self.resume_on(again)
        name, request_id, body = again.requests()[-1]
        self.assertEqual((name, body), ("hunt", {"monster": 1}))
        again.reply(packets.HUNTED, request_id, {"exp_gained": 1, "level": 2, "exp": 1, "levels_gained": 1,
                                                 "changed": []})
        self.assertEqual(self.successResultOf(d).level, 2)

    def test_an_expired_session_without_relogin_is_surfaced(self):
        d = defer.ensureDeferred(self.client.my_rank())
        self.first.drop()
        again = FakeServer(self.clock)
        self.servers.append(again)
        self.next_attempt()
        _, request_id, _ = again.last("resume")
        again.error(request_id, ErrorCode.RESUME_EXPIRED)
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "reconnect_failed"])
        self.assertEqual(self.events[-1][1].code, ErrorCode.RESUME_EXPIRED)
        self.assertIsInstance(self.failureResultOf(d, ConnectionClosed).value, ConnectionClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_expired_session_enters_again_through_relogin(self):
        async def relogin():
            return "127.0.0.1", 9191, "new-token"
        self.client._relogin = relogin
        self.first.drop()
        refused, fresh = FakeServer(self.clock), FakeServer(self.clock)
        self.servers += [refused, fresh]
        self.next_attempt()
        _, request_id, _ = refused.last("resume")
        refused.error(request_id, ErrorCode.RESUME_EXPIRED)
        name, request_id, body = fresh.last("authenticate")
        self.assertEqual(body, {"token": "new-token"})
        fresh.reply(packets.AUTHENTICATED, request_id, {"user_id": USER, "name": "alice", "level": 3, "exp": 9})
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "entered_again"])
        self.assertEqual((self.client.address, self.client.token), (("127.0.0.1", 9191), "new-token"))

    def test_a_kick_or_a_logout_or_a_close_is_not_reconnected(self):
        self.first.client.dataReceived(packets.error_frame(0, ErrorCode.LOGGED_IN_ELSEWHERE))
        self.first.drop()
        self.assertEqual((self.events, self.clock.getDelayedCalls()), ([], []))

    def test_close_stops_a_reconnect_under_way(self):
        d = defer.ensureDeferred(self.client.inventory())
        self.first.drop()
        self.client.close()
        self.failureResultOf(d, ConnectionClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([e[0] for e in self.events], ["reconnecting"])

    def test_a_listener_may_close_the_client(self):
        self.client.on("reconnecting", lambda attempt, delay: self.client.close())
        self.first.drop()
        self.assertEqual([e[0] for e in self.events], ["reconnecting"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_it_gives_up_after_a_while(self):
        self.client._give_up_after = 30
        self.first.drop()
        self.servers += [ConnectionRefusedError()] * 20
        for _ in range(10):
            self.clock.advance(BACKOFF_CAP)
        self.assertEqual(self.events[-1][0], "reconnect_failed")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RaidAcrossAResumeTests(ReconnectingClientCase):
    """
    The application's L{Raid} across a drop: pushes the server sends on the
    new connection before its resumed reply are not lost, and a raid_fight
    told again after the resume reaches a raid that missed it, once.
    """

    def setUp(self):
        super().setUp()
        self.raid = Raid(self.client, FOUND)
        self.client._in_raid["r1"] = self.raid
        self.client._remember("r1", "found")

    def resume_with_pushes_first(self, *pushes):
        """Drop, and resume on a server that pushes C{pushes} (message, body) before its resumed reply."""
        self.first.drop()
        again = FakeServer(self.clock)
        self.servers.append(again)
        self.next_attempt()
        _, request_id, _ = again.last("resume")
        for message, body in pushes:
            again.client.dataReceived(message.encode(0, body))
        again.reply(packets.RESUMED, request_id, resumed_body("r1"))
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "resumed"])
        return again

    def test_a_result_pushed_before_the_resumed_reply_reaches_the_raid(self):
        """The raid cleared while away: its result, pushed right after the resume took the player, reaches result()."""
        result = defer.ensureDeferred(self.raid.result())
        self.resume_with_pushes_first((packets.RAID_RESULT, RESULT))
        told = self.successResultOf(result)
        self.assertEqual((told.raid_id, told.score), ("r1", 12))

    def test_a_fight_missed_while_away_reaches_the_raid_once(self):
        """
        The fight began while the player was away: the raid_fight told
        after the resume reaches fight(); told yet again, it is dropped.
        """
        fight = defer.ensureDeferred(self.raid.fight())
        again = self.resume_with_pushes_first()
        again.client.dataReceived(packets.RAID_FIGHT.encode(0, {**FIGHT, "hp": 21}))
        self.assertEqual(self.successResultOf(fight).hp, 21)
        again.client.dataReceived(packets.RAID_FIGHT.encode(0, {**FIGHT, "hp": 20}))
        self.assertNoResult(defer.ensureDeferred(self.raid.fight()))

    def test_a_fight_heard_before_the_drop_is_not_told_twice(self):
        """The raid_fight the server tells again after a resume is dropped if this client heard the fight already."""
        self.first.client.dataReceived(packets.RAID_FIGHT.encode(0, FIGHT))
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.raid.fight())).hp, 30)
        again = self.resume_with_pushes_first()
        again.client.dataReceived(packets.RAID_FIGHT.encode(0, {**FIGHT, "hp": 21}))
        self.assertEqual(self.client._pushes, [])


class GivingUpTests(ReconnectingClientCase):
    """
    Once the client gives up reconnecting (after a plain TCP loss, which
    would otherwise call for a resume), nothing waits for a return that will
    not come: raid waits, pushes awaited and requests all raise
    L{ConnectionClosed}, and no timer is left behind.
    """

    def setUp(self):
        super().setUp()
        self.client._give_up_after = 30
        self.raid = Raid(self.client, FOUND)
        self.client._in_raid["r1"] = self.raid
        self.client._remember("r1", "found")

    def give_up(self):
        self.first.drop()
        self.servers += [ConnectionRefusedError()] * 20
        for _ in range(10):
            self.clock.advance(BACKOFF_CAP)
        self.assertEqual(self.events[-1][0], "reconnect_failed")

    def test_raid_waits_and_awaited_pushes_fail(self):
        """A raid's fight() and result() and a push awaited before the give-up raise ConnectionClosed."""
        fight = defer.ensureDeferred(self.raid.fight())
        result = defer.ensureDeferred(self.raid.result())
        change = defer.ensureDeferred(self.client.next_party_change())
        self.give_up()
        for waiting in (fight, result, change):
            self.failureResultOf(waiting, ConnectionClosed)
        self.assertNotIn("r1", self.client._in_raid)
        self.assertEqual(self.client._waiters, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_begun_after_the_give_up_fail_at_once(self):
        """A raid wait, a push awaited and a request (a read or a change) made after the give-up raise at once."""
        self.give_up()
        self.failureResultOf(defer.ensureDeferred(self.raid.result()), ConnectionClosed)
        self.failureResultOf(defer.ensureDeferred(self.raid.fight()), ConnectionClosed)
        self.failureResultOf(self.client.next_push(packets.PARTY_CHANGED.name), ConnectionClosed)
        self.failureResultOf(defer.ensureDeferred(self.client.my_rank()), ConnectionClosed)
        hunt = self.failureResultOf(defer.ensureDeferred(self.client.hunt(1)), ConnectionClosed)
        self.assertNotIsInstance(hunt.value, OutcomeUnknown)  # never sent
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_result_wait_after_a_resume_is_cancelled_by_the_give_up(self):
        """Resumed in no raid, then cut again for good before RESULT_AFTER_RESUME: the raid fails, its wait is gone."""
        result = defer.ensureDeferred(self.raid.result())
        self.first.drop()
        again = FakeServer(self.clock)
        self.servers.append(again)
        self.next_attempt()
        _, request_id, _ = again.last("resume")
        again.reply(packets.RESUMED, request_id, resumed_body(""))
        self.assertIn("r1", self.client._result_waits)
        self.client._give_up_after = 0  # the first failed attempt gives up, well within RESULT_AFTER_RESUME
        again.drop()
        self.servers.append(ConnectionRefusedError())
        self.next_attempt()
        self.assertEqual(self.events[-1][0], "reconnect_failed")
        self.assertEqual(self.client._result_waits, {})
        self.assertIsInstance(self.failureResultOf(result, ConnectionClosed).value, ConnectionClosed)
        self.assertFalse(self.raid.lost)  # not RaidEndedAway: the client cannot know
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_application_hears_of_the_give_up_before_its_waits_fail(self):
        """reconnect_failed comes first, so a loop that awaits pushes again on a failure can stop."""
        heard = []
        self.client.next_push(packets.PARTY_CHANGED.name).addErrback(
            lambda failure: heard.append(("wait failed", [e[0] for e in self.events][-1])))
        self.give_up()
        self.assertEqual(heard, [("wait failed", "reconnect_failed")])

    def test_a_hundred_waits_at_once_all_fail(self):
        """A hundred requests waiting for the return and a hundred pushes awaited all fail with the give-up."""
        self.first.drop()
        requests = [defer.ensureDeferred(self.client.hunt(1)) for _ in range(100)]
        pushes = [self.client.next_push(packets.PARTY_CHANGED.name) for _ in range(100)]
        self.servers += [ConnectionRefusedError()] * 20
        for _ in range(10):
            self.clock.advance(BACKOFF_CAP)
        for waiting in requests + pushes:
            self.failureResultOf(waiting, ConnectionClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
