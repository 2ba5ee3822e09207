"""
How the client library gets back in when a dropped session can no longer be
resumed: L{Relogin} refreshes with the newest refresh token (keeping each
rotated one), enters the world and hands the game client the new token; the
password is asked for only when the refresh is refused or its reply was lost;
logout revokes the login.  Also what a client back after a drop makes of the
raids it had open.  All on fakes and a task.Clock.
"""

import random

from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from dreamraid.client import ConnectionClosed, GameClient, RaidEndedAway, Relogin, RemoteError
from dreamraid.client.game import RESULT_AFTER_RESUME
from dreamraid.client.game import Raid
from dreamraid.client.results import Login
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from tests.test_client_reconnect import HEARTBEAT, USER, FakeServer, ReconnectingClientCase, resumed_body


def login(n):
    return Login(USER, f"access-{n}", 600, f"refresh-{n}", 2_592_000)


class FakeSessionServer:
    """
    The session server as a L{Relogin} sees it: each connect gives a
    session whose refresh rotates C{refresh-N} to C{refresh-N+1} (each token
    served once), or answers as C{refusals} says for a token.  Answers come
    at once, or, with C{held}, only when the test fires them.
    """

    def __init__(self, held=False):
        self.held = held
        self.spent = set()
        self.revoked = []
        self.refusals = {}  # refresh token -> exception to raise
        self.logins = []  # (name, password)
        self.calls = []  # (request, argument) in the order made
        self.pending = []  # held answers: (Deferred, value)
        self.connects = 0
        self.unreachable = 0  # how many connects fail before one succeeds

    def connect(self):
        self.connects += 1
        if self.unreachable:
            self.unreachable -= 1
            return defer.fail(ConnectionRefusedError())
        return defer.succeed(FakeSession(self))

    def answer(self, value):
        if not self.held:
            return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)
        d = defer.Deferred()
        self.pending.append((d, value))
        return d

    def release(self):
        """Fire the held answers, in order, until none is left."""
        while self.pending:
            d, value = self.pending.pop(0)
            d.errback(value) if isinstance(value, Exception) else d.callback(value)


class FakeSession:
    def __init__(self, server):
        self.server = server
        self.closed = False

    def refresh(self, token):
        server = self.server
        server.calls.append(("refresh", token))
        if token in server.refusals:
            return server.answer(server.refusals[token])
        if token in server.spent:
            return server.answer(RemoteError(ErrorCode.REFRESH_REFUSED, "reused"))
        server.spent.add(token)
        return server.answer(login(int(token.split("-")[1]) + 1))

    def login(self, name, password):
        self.server.calls.append(("login", password))
        self.server.logins.append((name, password))
        return self.server.answer(login(100 + len(self.server.logins)))

    def enter_world(self, token):
        self.server.calls.append(("enter_world", token))
        return defer.succeed(type("World", (), {"user_id": USER, "host": "10.0.0.1", "port": 9090})())

    def revoke(self, token):
        self.server.calls.append(("revoke", token))
        self.server.revoked.append(token)
        return defer.succeed(None)

    def close(self):
        self.closed = True


class ReloginTests(TestCase):
    """L{Relogin} on its own: what it sends, what it keeps, when it asks for the password."""

    def relogin(self, server, password_callback=None, route=lambda kind, address: address):
        return Relogin(server.connect, "alice", login(0), password_callback, route)

    def test_refreshes_with_the_newest_token_and_enters_the_world(self):
        """Each relogin refreshes with the token the last one got, and enters the world with the new access token."""
        server = FakeSessionServer()
        relogin = self.relogin(server, route=lambda kind, address: ("127.0.0.1", 19090))
        self.assertEqual(self.successResultOf(relogin()), ("127.0.0.1", 19090, "access-1"))
        self.assertEqual(self.successResultOf(relogin()), ("127.0.0.1", 19090, "access-2"))
        self.assertEqual(server.calls, [("refresh", "refresh-0"), ("enter_world", "access-1"),
                                        ("refresh", "refresh-1"), ("enter_world", "access-2")])
        self.assertEqual(relogin.refresh_token, "refresh-2")
        self.assertEqual(server.logins, [])

    def test_a_refused_refresh_without_a_password_callback_is_raised(self):
        server = FakeSessionServer()
        server.refusals["refresh-0"] = RemoteError(ErrorCode.REFRESH_REFUSED, "revoked")
        failure = self.failureResultOf(self.relogin(server)(), RemoteError)
        self.assertEqual(failure.value.code, ErrorCode.REFRESH_REFUSED)
        self.assertEqual(server.calls, [("refresh", "refresh-0")])

    def test_a_refused_refresh_falls_back_to_the_password(self):
        """The password callback (a Deferred here) logs in; its refresh token is the one kept for next time."""
        server = FakeSessionServer()
        server.refusals["refresh-0"] = RemoteError(ErrorCode.REFRESH_REFUSED, "expired")
        relogin = self.relogin(server, lambda: defer.succeed("correct horse"))
        self.assertEqual(self.successResultOf(relogin()), ("10.0.0.1", 9090, "access-101"))
        self.assertEqual(server.logins, [("alice", "correct horse")])
        self.successResultOf(relogin())
        self.assertEqual(server.calls[-2], ("refresh", "refresh-101"))

    def test_a_refresh_whose_reply_was_lost_is_never_sent_again(self):
        """The token may be spent: sending it again would revoke the login. Without a password, it is refused."""
        server = FakeSessionServer()
        server.refusals["refresh-0"] = ConnectionClosed()
        relogin = self.relogin(server)
        for _ in range(2):
            self.assertEqual(self.failureResultOf(relogin(), RemoteError).value.code, ErrorCode.REFRESH_REFUSED)
        self.assertEqual(server.calls, [("refresh", "refresh-0")])
        self.successResultOf(relogin.revoke())
        self.assertEqual(server.revoked, ["refresh-0"])  # its family is still revoked at logout

    def test_a_lost_refresh_reply_with_a_password_logs_in(self):
        server = FakeSessionServer()
        server.refusals["refresh-0"] = defer.TimeoutError()
        relogin = self.relogin(server, lambda: "correct horse")
        self.assertEqual(self.successResultOf(relogin())[2], "access-101")

    def test_an_unavailable_store_keeps_the_token(self):
        """UNAVAILABLE spent nothing: raised (the game client tries again), and the same token is tried next."""
        server = FakeSessionServer()
        server.refusals["refresh-0"] = RemoteError(ErrorCode.UNAVAILABLE, "down")
        relogin = self.relogin(server, lambda: self.fail("no password for an unavailable store"))
        self.assertEqual(self.failureResultOf(relogin(), RemoteError).value.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(relogin.refresh_token, "refresh-0")

    def test_an_unreachable_session_server_is_raised_and_nothing_is_spent(self):
        server = FakeSessionServer()
        server.unreachable = 1
        relogin = self.relogin(server)
        self.failureResultOf(relogin(), ConnectionRefusedError)
        self.assertEqual(self.successResultOf(relogin())[2], "access-1")

    def test_a_hundred_relogins_at_once_send_each_token_once(self):
        """
        Relogins run one at a time: a hundred at once, answered late, each
        refresh with the token the one before got; none is reused (which
        would revoke the whole login).
        """
        server = FakeSessionServer(held=True)
        relogin = self.relogin(server)
        results = [relogin() for _ in range(100)]
        self.assertEqual(server.calls, [("refresh", "refresh-0")])
        while server.pending:
            server.release()
        self.assertEqual([self.successResultOf(d)[2] for d in results], [f"access-{n}" for n in range(1, 101)])
        sent = [token for call, token in server.calls if call == "refresh"]
        self.assertEqual(sent, [f"refresh-{n}" for n in range(100)])
        self.assertEqual(relogin.refresh_token, "refresh-100")

    def test_revoke_sends_the_newest_token_once(self):
        server = FakeSessionServer()
        relogin = self.relogin(server)
        self.successResultOf(relogin())
        self.successResultOf(relogin.revoke())
        self.successResultOf(relogin.revoke())
        self.assertEqual(server.revoked, ["refresh-1"])
        self.assertEqual(self.failureResultOf(relogin(), RemoteError).value.code, ErrorCode.REFRESH_REFUSED)

    def test_a_revoke_that_fails_is_logged_not_raised(self):
        server = FakeSessionServer()
        server.unreachable = 1
        self.assertIsNone(self.successResultOf(self.relogin(server).revoke()))
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class GameClientReloginTests(TestCase):
    """A game client whose session expired while it was cut off comes back through L{Relogin}."""

    def setUp(self):
        self.clock = task.Clock()
        self.first = FakeServer(self.clock)
        self.session = FakeSessionServer()
        self.relogin = Relogin(self.session.connect, "alice", login(0))
        self.client = GameClient(self.clock, self.first.client, ("127.0.0.1", 9090), USER, rng=random.Random(3),
                                 heartbeat=HEARTBEAT, relogin=self.relogin, end_login=self.relogin.revoke)
        self.client.token = "access-0"
        self.servers = []
        self.client._connect = lambda host, port: defer.succeed(self.servers.pop(0).client)
        self.events = []
        for event in ("reconnecting", "resumed", "entered_again", "reconnect_failed"):
            self.client.on(event, lambda *args, event=event: self.events.append((event, *args)))

    def next_attempt(self):
        self.clock.advance(self.events[-1][2])

    def expire_resume(self, entering=True):
        """
        Drop the link; the next attempt's resume is answered RESUME_EXPIRED;
        the server the client enters on next (if C{entering}).
        """
        self.first.drop()
        refused = FakeServer(self.clock)
        self.servers.append(refused)
        fresh = FakeServer(self.clock) if entering else None
        if entering:
            self.servers.append(fresh)
        self.next_attempt()
        _, request_id, _ = refused.last("resume")
        refused.error(request_id, ErrorCode.RESUME_EXPIRED)
        return fresh

    def test_an_expired_session_comes_back_with_the_refresh_token(self):
        """No password: refresh, enter the world, authenticate with the new token; the player is the new one."""
        fresh = self.expire_resume()
        _, request_id, body = fresh.last("authenticate")
        self.assertEqual(body, {"token": "access-1"})
        fresh.reply(packets.AUTHENTICATED, request_id, {"user_id": USER, "name": "alice", "level": 4, "exp": 2})
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "entered_again"])
        self.assertEqual((self.client.address, self.client.token), (("10.0.0.1", 9090), "access-1"))
        self.assertEqual((self.client.player.level, self.client.player.exp), (4, 2))
        self.assertEqual(self.session.calls, [("refresh", "refresh-0"), ("enter_world", "access-1")])
        self.assertEqual(self.relogin.refresh_token, "refresh-1")

        logout = defer.ensureDeferred(self.client.logout())
        self.assertEqual(self.session.revoked, [])  # only once the server's logout is answered
        _, request_id, _ = fresh.last("logout")
        fresh.reply(packets.LOGGED_OUT, request_id, {})
        self.successResultOf(logout)
        self.assertEqual(self.session.revoked, ["refresh-1"])

    def test_a_refused_refresh_gives_up_with_its_code(self):
        """
        The session is gone and the refresh refused: the client gives up
        with the refusal's code, an open raid's waits raise
        ConnectionClosed, and no timer is left.
        """
        raid = Raid(self.client, found("r1"))
        self.client._in_raid["r1"] = raid
        result = defer.ensureDeferred(raid.result())
        self.session.refusals["refresh-0"] = RemoteError(ErrorCode.REFRESH_REFUSED, "revoked")
        self.expire_resume(entering=False)
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "reconnect_failed"])
        self.assertEqual(self.events[-1][1].code, ErrorCode.REFRESH_REFUSED)
        self.assertEqual(self.failureResultOf(result, ConnectionClosed).value.code, ErrorCode.REFRESH_REFUSED)
        self.failureResultOf(defer.ensureDeferred(raid.fight()), ConnectionClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_unreachable_session_server_is_tried_again_without_another_resume(self):
        """The refresh was never sent: after the backoff the client enters again (not resuming a session that is gone)."""
        self.session.unreachable = 1
        fresh = self.expire_resume()
        self.assertEqual([e[0] for e in self.events], ["reconnecting", "reconnecting"])
        self.next_attempt()
        self.assertEqual([r[0] for r in fresh.requests()], ["authenticate"])
        _, request_id, _ = fresh.last("authenticate")
        fresh.reply(packets.AUTHENTICATED, request_id, {"user_id": USER, "name": "alice", "level": 4, "exp": 2})
        self.assertEqual(self.events[-1][0], "entered_again")
        self.assertEqual([token for call, token in self.session.calls if call == "refresh"], ["refresh-0"])

    def test_logout_revokes_even_when_the_server_logout_fails(self):
        logout = defer.ensureDeferred(self.client.logout())
        self.first.drop()
        self.failureResultOf(logout, ConnectionClosed)
        self.assertEqual(self.session.revoked, ["refresh-0"])
        self.assertEqual(self.events, [])  # a logout is not reconnected


def found(raid_id):
    return {"raid_id": raid_id, "members": [{"user_id": USER}], "udp": "127.0.0.1:50000", "key": "00" * 32,
            "raid_number": 1, "member": 0, "host": "127.0.0.1:9090", "ticket": "t"}


class RaidsAfterADropTests(ReconnectingClientCase):
    """What a client back after a drop makes of the raids it had open."""

    def setUp(self):
        super().setUp()
        self.raid = Raid(self.client, found("r1"))
        self.client._in_raid["r1"] = self.raid
        self.lost = []
        self.client.on("raid_lost", self.lost.append)

    def resume(self, raid_id):
        again = FakeServer(self.clock)
        self.first.drop()
        self.resume_on(again, raid_id)
        return again

    def test_a_raid_that_ended_while_away_raises_from_its_waits(self):
        """
        Resumed in no raid and no result after the reply within
        RESULT_AFTER_RESUME: the open raid's result and fight raise
        RaidEndedAway; its late pushes are dropped.
        """
        result = defer.ensureDeferred(self.raid.result())
        fight = defer.ensureDeferred(self.raid.fight())
        again = self.resume("")
        self.clock.advance(RESULT_AFTER_RESUME - 0.01)
        self.assertNoResult(result)
        self.assertEqual(self.lost, [])
        self.clock.advance(0.01)
        self.assertEqual(self.failureResultOf(result, RaidEndedAway).value.raid_id, "r1")
        self.assertEqual(self.lost, ["r1"])  # the application hears it too
        self.failureResultOf(fight, RaidEndedAway)
        self.failureResultOf(defer.ensureDeferred(self.raid.result()), RaidEndedAway)
        self.assertNotIn("r1", self.client._in_raid)
        again.client.dataReceived(packets.RAID_RESULT.encode(0, {
            "raid_id": "r1", "cleared": True, "score": 1, "team_score": 1, "exp_gained": 1, "level": 1, "best": 1,
            "changed": []}))
        self.assertEqual(self.client._pushes, [])

    def test_a_result_told_while_away_follows_the_resumed_reply(self):
        """The server pushes a result it kept for the away player after the resume's reply: it is the result."""
        result = defer.ensureDeferred(self.raid.result())
        again = self.resume("")
        self.clock.advance(1)  # forwarded from the process the player was away on
        again.client.dataReceived(packets.RAID_RESULT.encode(0, {
            "raid_id": "r1", "cleared": True, "score": 5, "team_score": 9, "exp_gained": 1, "level": 1, "best": 5,
            "changed": []}))
        self.assertEqual(self.successResultOf(result).score, 5)
        self.clock.advance(RESULT_AFTER_RESUME)
        self.assertFalse(self.raid.lost)
        self.assertEqual(self.lost, [])
        self.assertEqual(self.client._result_waits, {})  # its wait was cancelled by the result

    def test_a_raid_still_on_is_kept(self):
        result = defer.ensureDeferred(self.raid.result())
        again = self.resume("r1")
        self.assertNoResult(result)
        self.assertFalse(self.raid.lost)
        again.client.dataReceived(packets.RAID_RESULT.encode(0, {
            "raid_id": "r1", "cleared": True, "score": 3, "team_score": 4, "exp_gained": 1, "level": 1, "best": 3,
            "changed": []}))
        self.assertEqual(self.successResultOf(result).score, 3)

    def test_the_resumed_player_is_the_clients_player(self):
        self.resume("")
        self.assertEqual((self.client.player.level, self.client.player.exp), (3, 9))

    def test_pushes_that_came_before_the_resumed_reply_are_not_lost(self):
        """A push written on the new connection before the resume's reply reaches the application."""
        result = defer.ensureDeferred(self.raid.result())
        again = FakeServer(self.clock)
        self.servers.append(again)
        self.first.drop()
        self.next_attempt()
        _, request_id, _ = again.last("resume")
        again.client.dataReceived(packets.RAID_RESULT.encode(0, {
            "raid_id": "r1", "cleared": True, "score": 2, "team_score": 4, "exp_gained": 1, "level": 1, "best": 2,
            "changed": []}) + packets.RESUMED.encode(request_id, resumed_body("r1")))
        self.assertEqual(self.successResultOf(result).score, 2)
