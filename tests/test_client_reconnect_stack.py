"""
The client library's reconnect against the real servers (DREAMRAID_STACK):
a player whose game connection is aborted mid-session comes back by itself
within seconds, with its reconnecting and resumed events, its party kept,
a read in flight answered after the resume and a change in flight failed
with OutcomeUnknown.
"""

from twisted.internet import defer, reactor

from dreamraid.client import OutcomeUnknown
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
