"""
Game servers over real TCP, built by their twistd plugin, against the real
Redis Cluster and MariaDB: authentication and every kind of bad token, the
kick of a duplicate login across two game server processes, requests, and logout and
disconnect leading to the user's data in MySQL.
"""

import base64
import json

import jwt
from twisted.internet import defer, reactor

from dreamraid import game_tap
from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import data_keys, session_key
from dreamraid.services.loading import thd_load_profile
from dreamraid.services.presence import presence_key
from dreamraid.services.sync import MysqlSnapshotStore, SyncWorker
from tests.storage import SessionServicesCase, sql
from tests.support import RunningServer, ServerProcess, eventually


class GameServerCase(SessionServicesCase):
    """Game servers on free ports, with users entered into the world by the session server's services."""

    timeout = 60

    def server_options(self):
        return ["--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
                "--sync-ranking-prefix", self.settings.sync.ranking_prefix]

    async def game_server(self, *extra):
        """A game server in this process (its services can be looked at)."""
        server = RunningServer(game_tap, "game", [*self.server_options(), "--game-dev-grant", "on", *extra]).start(self)
        await server.part("Players").when_listening()
        return server

    def game_process(self, *extra):
        """A game server in a process of its own, as production runs it."""
        return ServerProcess("dreamraid-game", "game", [*self.server_options(), *extra]).start(self)

    async def entered_token(self, user_id):
        """A token made the live session by entering the world."""
        issued = self.issuer.issue(user_id)
        await self.world.enter(issued.token)
        return issued.token

    async def authenticated(self, server, token):
        client = await server.client(self)
        _, body = await client.request(packets.AUTHENTICATE, {"token": token})
        return client, body

    async def refused(self, server, token):
        client = await server.client(self)
        with self.assertRaises(RemoteError) as raised:
            await client.request(packets.AUTHENTICATE, {"token": token})
        return raised.exception.code


class GameServerTests(GameServerCase):

    async def test_authenticate_with_the_live_session(self):
        """The live session's token authenticates and says who the user is; presence names this server."""
        server = await self.game_server()
        user_id = await self.new_user(level=3)
        [(name,)] = await sql("SELECT name FROM users WHERE id = %s", (user_id,))
        client, body = await self.authenticated(server, await self.entered_token(user_id))
        self.assertEqual(body, {"user_id": user_id, "name": name, "level": 3, "exp": 0})
        self.assertIsNotNone(await self.router.execute("GET", presence_key(user_id)))
        self.assertEqual(await server.health(), (200, {"status": "ok", "checks": {"redis": "ok", "kicks": "ok"}}))
        _, again = await client.request(packets.PING, {"nonce": 5})
        self.assertEqual(again, {"nonce": 5})
        with self.assertRaises(RemoteError) as raised:
            await client.request(packets.AUTHENTICATE, {"token": "x"})
        self.assertEqual(raised.exception.code, ErrorCode.ALREADY_AUTHENTICATED)

    async def test_bad_tokens_each_get_their_code(self):
        """Forged, expired, wrong-audience, alg none, not-entered and logged-out tokens are refused with their codes."""
        server = await self.game_server()
        user_id = await self.new_user()
        token = await self.entered_token(user_id)
        header, payload, signature = token.split(".")
        forged = ".".join([header, payload, ("A" if signature[5] != "A" else "B").join([signature[:5], signature[6:]])])
        self.assertEqual(await self.refused(server, forged), ErrorCode.TOKEN_SIGNATURE)

        with open(self.private_key, "rb") as f:
            key = f.read()
        claims = jwt.decode(token, options={"verify_signature": False})
        expired = jwt.encode({**claims, "iat": claims["iat"] - 3600, "exp": claims["iat"] - 1800}, key, "EdDSA")
        self.assertEqual(await self.refused(server, expired), ErrorCode.TOKEN_EXPIRED)
        elsewhere = jwt.encode({**claims, "aud": "another-game"}, key, "EdDSA")
        self.assertEqual(await self.refused(server, elsewhere), ErrorCode.TOKEN_AUDIENCE)

        def b64(data):
            return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

        unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
        self.assertEqual(await self.refused(server, unsigned), ErrorCode.TOKEN_SIGNATURE)

        not_entered = self.issuer.issue(user_id).token
        self.assertEqual(await self.refused(server, not_entered), ErrorCode.SESSION_NOT_LIVE)
        other_user = await self.new_user()
        self.assertEqual(await self.refused(server, self.issuer.issue(other_user).token), ErrorCode.SESSION_NOT_LIVE)

        client, _ = await self.authenticated(server, token)
        await client.request(packets.LOGOUT, {})
        await client.closed
        self.assertIsNone(await self.router.execute("GET", session_key(user_id)))
        self.assertEqual(await self.refused(server, token), ErrorCode.SESSION_NOT_LIVE)

    async def test_second_login_on_another_process_kicks_the_first(self):
        """
        The same user authenticating on a second game server process closes
        the first connection, which is told why; a third login on the second
        process closes the second.
        """
        first_server, second_server = await gather([self.game_process(), self.game_process()])
        user_id = await self.new_user()
        first, _ = await self.authenticated(first_server, await self.entered_token(user_id))
        second, _ = await self.authenticated(second_server, await self.entered_token(user_id))
        await first.closed
        self.assertEqual(first.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)
        self.assertTrue(second.connected)
        _, body = await second.request(packets.PING, {"nonce": 1})
        self.assertEqual(body, {"nonce": 1})
        third, _ = await self.authenticated(second_server, await self.entered_token(user_id))
        await second.closed
        self.assertEqual(second.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)
        self.assertTrue(third.connected)

    async def test_requests_then_disconnect_lands_in_mysql(self):
        """Hunts and inventory changes, then a dropped connection: the sync leaves MySQL as the player last saw it."""
        server = await self.game_server()
        user_id = await self.new_user()
        client, _ = await self.authenticated(server, await self.entered_token(user_id))
        await client.request(packets.GRANT, {"item_code": 101, "count": 2})
        await client.request(packets.GRANT, {"item_code": 301, "count": 120})
        await client.request(packets.MOVE_ITEM, {"tab": 0, "from_slot": 1, "to_slot": 9})
        _, enhanced = await client.request(packets.ENHANCE, {"slot": 0})
        self.assertEqual(enhanced, {"slot": 0, "success": True, "enhancement": 1})
        _, hunted = await client.request(packets.HUNT, {"monster": 5})
        _, listed = await client.request(packets.LIST_INVENTORY, {})
        with self.assertRaises(RemoteError) as raised:
            await client.request(packets.DELETE_ITEM, {"tab": 0, "slot": 49})
        self.assertEqual(raised.exception.code, ErrorCode.EMPTY_SLOT)
        client.transport.loseConnection()

        worker = SyncWorker(self.router, self.queue, self.live, MysqlSnapshotStore(self.database), reactor,
                            self.settings.sync)
        worker.startService()
        self.addCleanup(worker.stopService)
        await eventually(lambda: defer.succeed(worker.counters["evicted"] >= 1))
        stored = await self.database.pool.runWithConnection(thd_load_profile, user_id)
        self.assertEqual((stored.level, stored.exp), (hunted["level"], hunted["exp"]))
        self.assertEqual(sorted((tab, slot, i.code, i.enhancement, i.count) for (tab, slot), i in stored.items.items()),
                         sorted(tuple(item.values()) for item in listed["items"]))
        self.assertEqual(await self.router.execute("EXISTS", *data_keys(user_id)), 0)

    async def test_grant_is_off_by_default(self):
        """Without dev_grant on, grant is refused."""
        server = RunningServer(game_tap, "game", self.server_options()).start(self)
        user_id = await self.new_user()
        client, _ = await self.authenticated(server, await self.entered_token(user_id))
        with self.assertRaises(RemoteError) as raised:
            await client.request(packets.GRANT, {"item_code": 101, "count": 1})
        self.assertEqual(raised.exception.code, ErrorCode.GRANT_DISABLED)


class NewestAuthenticationTests(GameServerCase):
    """
    The newest authentication of a user wins, on one game server process or
    across two, also when it reuses the token of the one before (a client
    reconnecting after its link dropped does): the older connection is told
    LOGGED_IN_ELSEWHERE and closed, its leave ends nothing, and the newer
    one keeps the session through presence renewals.
    """

    PRESENCE_TTL = "1.5"  # renewed every 0.5 s

    def jti(self, token):
        return jwt.decode(token, options={"verify_signature": False})["jti"].encode()

    async def renewed(self, user_id):
        """Wait for the next renewal of the user's presence: its TTL going up again."""
        last = [None]

        async def went_up():
            ttl = await self.router.execute("PTTL", presence_key(user_id))
            up = last[0] is not None and ttl > last[0]
            last[0] = ttl
            return up

        await eventually(went_up, timeout=10, interval=0.05)

    async def assertPlaysOn(self, client, user_id, token, holder):
        """
        After the older connection's leave ran: the session is still the
        token's, the presence still C{holder}'s, and the newer connection is
        served and stays through two renewals.
        """
        self.assertEqual(await self.router.execute("GET", session_key(user_id)), self.jti(token))
        self.assertEqual(await self.router.execute("GET", presence_key(user_id)), holder)
        _, hunted = await client.request(packets.HUNT, {"monster": 1})
        self.assertEqual(hunted["exp_gained"], 1)
        for _ in range(2):
            await self.renewed(user_id)
        self.assertTrue(client.connected)
        self.assertEqual(await self.router.execute("GET", session_key(user_id)), self.jti(token))
        self.assertEqual(await self.router.execute("GET", presence_key(user_id)), holder)
        _, listed = await client.request(packets.LIST_INVENTORY, {})
        self.assertIsInstance(listed["items"], list)

    async def test_same_token_twice_on_one_process(self):
        """The same token authenticated twice on one process: the first connection goes, the second plays on."""
        server = await self.game_server("--game-presence-ttl", self.PRESENCE_TTL)
        players = server.part("Players")
        user_id = await self.new_user()
        token = await self.entered_token(user_id)
        first, _ = await self.authenticated(server, token)
        first_here = players.connection_of(user_id)
        first_left = defer.Deferred()
        lost = players.connection_lost

        def lost_watched(connection):
            outcome = lost(connection)
            if connection is first_here:
                first_left.callback(outcome)
            return outcome

        players.connection_lost = lost_watched
        second, _ = await self.authenticated(server, token)
        holder = await self.router.execute("GET", presence_key(user_id))
        await first.closed.addTimeout(10, reactor)
        self.assertEqual(first.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)
        await first_left.addTimeout(10, reactor)
        await self.assertPlaysOn(second, user_id, token, holder)

    async def test_same_token_on_two_processes(self):
        """
        The same token authenticated on a second game server process: the
        first process is told and closes its connection, whose leave ends
        nothing; the second plays on, and the first never takes the presence
        back.
        """
        first_server, second_server = await gather([self.game_process("--game-presence-ttl", self.PRESENCE_TTL),
                                                     self.game_process("--game-presence-ttl", self.PRESENCE_TTL)])
        user_id = await self.new_user()
        token = await self.entered_token(user_id)
        first, _ = await self.authenticated(first_server, token)
        second, _ = await self.authenticated(second_server, token)
        holder = await self.router.execute("GET", presence_key(user_id))
        await first.closed.addTimeout(10, reactor)
        self.assertEqual(first.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)

        async def first_left():
            return f"user {user_id}: a replaced connection closed" in first_server.output()

        await eventually(first_left, timeout=10)
        await self.assertPlaysOn(second, user_id, token, holder)
