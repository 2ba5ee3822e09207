"""
The client library's reconnect against the real servers (DREAMRAID_STACK):
a player whose game connection is aborted mid-session comes back by itself
within seconds, with its reconnecting and resumed events, its party kept,
a read in flight answered after the resume and a change in flight failed
with OutcomeUnknown; and one whose session could no longer be resumed comes
back with its refresh token, without the password.
"""

from twisted.internet import defer, reactor

from dreamraid.client import OutcomeUnknown, RemoteError, SessionClient
from dreamraid.errors import ErrorCode
from tests.test_client_library import ServersCase


class ReconnectOnTheStackTests(ServersCase):
    """A session server and a game server; the client's socket is aborted under it."""

    timeout = 60
    game_options = ("--game-resume-grace", "30")  # the test servers' default is none

    def watch(self, client):
        """The events C{client} fires, and a Deferred of its next resumed record."""
        events, resumed = [], defer.Deferred()
        client.on("reconnecting", lambda attempt, delay: events.append(("reconnecting", attempt)))
        client.on("reconnect_failed", lambda e: events.append(("reconnect_failed", e)))

        def back(record):
            events.append(("resumed",))
            resumed.callback(record)
        client.on("resumed", back)
        return events, resumed.addTimeout(10, reactor)

    async def test_an_aborted_connection_reconnects_and_resumes_by_itself(self):
        client = await self.player()
        party = await client.create_party()
        [sword] = await client.grant(101, 1)
        events, resumed = self.watch(client)
        started = reactor.seconds()
        cut = client.connection
        reading = defer.ensureDeferred(client.my_party())  # a read in flight: answered after the resume
        changing = defer.ensureDeferred(client.grant(101, 1))  # a change in flight: outcome unknown
        cut.transport.abortConnection()
        with self.assertRaises(OutcomeUnknown):
            await changing
        record = await resumed
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(events, [("reconnecting", 1), ("resumed",)])
        self.assertIsNot(client.connection, cut)
        self.assertEqual((record.player.user_id, record.party_code), (client.user_id, party.code))
        self.assertEqual((await reading).code, party.code)
        self.assertIn(sword, await client.inventory())
        await client.hunt(1)  # and the session goes on


class ReloginOnTheStackTests(ServersCase):
    """
    A game server that keeps no away player (resume grace 0): a cut
    client's resume is refused, and play()'s client comes back with its
    refresh token, asking nobody for the password.
    """

    timeout = 60
    game_options = ("--game-resume-grace", "0")

    async def test_a_session_past_resuming_comes_back_with_the_refresh_token(self):
        client = await self.player()  # play() without a password callback
        [sword] = await client.grant(101, 1)
        first_refresh = client._relogin.refresh_token
        events, back = [], defer.Deferred()
        client.on("reconnecting", lambda attempt, delay: events.append(("reconnecting", attempt)))
        client.on("resumed", lambda record: events.append(("resumed",)))
        client.on("reconnect_failed", lambda e: (events.append(("reconnect_failed", e)), back.errback(e)))
        client.on("entered_again", lambda player: (events.append(("entered_again",)), back.callback(player)))
        started = reactor.seconds()
        client.connection.transport.abortConnection()
        player = await back.addTimeout(15, reactor)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(events, [("reconnecting", 1), ("entered_again",)])
        self.assertEqual((player.user_id, client.player), (client.user_id, player))
        self.assertIn(sword, await client.inventory())  # the same player, its things kept
        await client.hunt(1)

        newest = client._relogin.refresh_token
        self.assertNotEqual(newest, first_refresh)  # rotated, and the new one kept
        session = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        self.addCleanup(session.close)
        await client.logout()  # revokes the login's refresh tokens
        for spent_or_revoked in (first_refresh, newest):
            with self.assertRaises(RemoteError) as raised:
                await session.refresh(spent_or_revoked)
            self.assertEqual(raised.exception.code, ErrorCode.REFRESH_REFUSED)
