"""
Attacks on real running servers (in this process, on the test stack), each
answered with its exact error code while an honest client goes on being
served: forged, confused and revoked tokens at a game server; replayed and
stolen raid handoff tickets; spoofed, forged and replayed raid datagrams;
SQL-injection and over-long names and passwords at the session server; and
raw frames with every numeric field of every client request at its edges.
"""

import base64
import hashlib
import hmac
import json
import os
import random
import struct
from typing import NamedTuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from dreamraid import game_tap, session_tap
from dreamraid.client import ConnectionClosed, GameClient, RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.protocols.game import GameProtocol
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import TABS
from dreamraid.services.matchmaking import matchmaking_keys
from dreamraid.services.presence import handoff_key, presence_key
from dreamraid.services.ranking import PAGE_LIMIT
from dreamraid.tables import load_tables
from tests.storage import TEST_DATABASE, SessionServicesCase, sql
from tests.strategies import body_strategy, value_strategy
from tests.support import RunningServer, eventually, greeted_channels, make_settings

BOSS_HP = 4
E = ErrorCode


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value):
    """A JSON value as one base64url segment of a JWT."""
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def hs256(claims, secret):
    """C{claims} signed HS256 with C{secret} by hand (PyJWT refuses public keys as HMAC secrets)."""
    signing = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(claims)}"
    return f"{signing}.{b64url(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


def true(value):
    """A fired Deferred of C{value}, for L{eventually}."""
    return defer.succeed(value)


class RawClient(FrameReceiver):
    """
    A client that writes whatever bytes a test crafts and keeps what comes
    back: replies by request id, every other frame, and frames that do not
    decode.  It answers the server's pings.
    """

    def __init__(self):
        self.waiting = {}
        self.unexpected = []
        self.undecodable = []
        self.closed = defer.Deferred()

    def send(self, data, request_id=None):
        """Write C{data}; a Deferred of the frame that answers C{request_id}, if given."""
        d = None
        if request_id is not None:
            d = self.waiting[request_id] = defer.Deferred()
            d.addTimeout(10, reactor)
        self.transport.write(data)
        return d

    def pipeline(self, requests):
        """
        Write every C{(message, request id, body)} of C{requests} in one
        write; a list of Deferreds of the frames that answer them, in order
        (one left unanswered when the connection closes fails with
        L{ConnectionClosed}).
        """
        answers = []
        for _, request_id, _ in requests:
            answers.append(self.waiting.setdefault(request_id, defer.Deferred()))
            answers[-1].addTimeout(10, reactor)
        self.transport.write(b"".join(message.encode(request_id, body) for message, request_id, body in requests))
        return answers

    def frameReceived(self, frame):
        if frame.request_id == 0 and frame.message is packets.PING:
            self.transport.write(packets.PONG.encode(0, frame.body))
            return
        d = self.waiting.pop(frame.request_id, None) if frame.request_id else None
        if d is None:
            self.unexpected.append(frame)
        else:
            d.callback(frame)

    def codecErrorReceived(self, error):
        self.undecodable.append(error)

    def connectionLost(self, reason):
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(ConnectionClosed())
        self.closed.callback(None)

    def close(self):
        if self.transport.connected:
            self.transport.loseConnection()
            return self.closed


class Listener(DatagramProtocol):
    """A UDP socket that keeps every datagram it receives."""

    def __init__(self):
        self.received = []

    def datagramReceived(self, data, address):
        self.received.append((data, address))


class SecurityCase(SessionServicesCase):
    """Game and session servers in this process on this test's keys, prefixes and key pair."""

    timeout = 60

    async def setUp(self):
        await super().setUp()
        # Tests log in from 127.0.0.1 everywhere: start with a clean count there.
        await self.router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))

    def shared_options(self):
        return ["--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
                "--sync-ranking-prefix", self.settings.sync.ranking_prefix]

    async def game_server(self, *extra):
        """A game server (dev grant on, a boss of 4 HP, no hit interval) on a matchmaking prefix of its own."""
        matchmaking = f"testmm{random.getrandbits(40):x}"
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(matchmaking)]))
        server = RunningServer(game_tap, "game", [
            *self.shared_options(), "--game-dev-grant", "on", "--raids-boss-hp", str(BOSS_HP),
            "--raids-hit-interval", "0", "--raids-match-interval", "0.1", "--raids-matchmaking-prefix", matchmaking,
            *extra]).start(self)
        await server.part("Players").when_listening()
        return server

    def session_server(self):
        """A session server on the test database (its address limit out of the way of other tests' failures)."""
        return RunningServer(session_tap, "session", [
            *self.shared_options(), "--tokens-private-key", self.private_key, "--mysql-database", TEST_DATABASE,
            "--accounts-scrypt-n", "1024", "--accounts-failures-per-address", "1000",
            "--session-game-servers", "127.0.0.1:9999"]).start(self)

    async def entered_token(self, user_id):
        """A fresh token made the user's live session by entering the world."""
        issued = self.issuer.issue(user_id)
        await self.world.enter(issued.token)
        return issued.token

    async def player(self, server, token=None):
        """A new user (or C{token}'s) authenticated on C{server} through the client library."""
        token = token or await self.entered_token(await self.new_user())
        client = await GameClient.login(reactor, "127.0.0.1", server.port, token)
        self.addCleanup(client.close)
        return client

    async def raw(self, server):
        """A L{RawClient} connected to C{server}, closed after the test."""
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), RawClient())
        self.addCleanup(client.close)
        return client

    async def refused(self, client, message, body):
        """The error code C{client}'s request is answered with."""
        with self.assertRaises(RemoteError) as raised:
            await client.request(message, body)
        return raised.exception.code

    async def assertClosedAfterRefusal(self, client):
        """A connection whose authentication was refused is closed by the server, not left to try again."""
        await client.closed.addTimeout(10, reactor)

    async def assertServed(self, client):
        """An authenticated client is still connected and served."""
        self.assertTrue(client.connection.connected)
        _, pong = await client.request(packets.PING, {"nonce": 9})
        self.assertEqual(pong, {"nonce": 9})
        await client.inventory()


class TokenAttackTests(SecurityCase):
    """Tokens presented to a running game server over the real protocol."""

    async def test_forged_tokens_each_get_their_code(self):
        """
        alg none, algorithm confusion, a foreign key, expired, not yet valid,
        wrong audience or issuer, a tampered payload: each refused with its
        code, the connection left unauthenticated, nobody taken over; the
        victim's real token and an honest player still work.
        """
        server = await self.game_server()
        honest = await self.player(server)
        victim = await self.new_user()
        token = await self.entered_token(victim)
        header, payload, signature = token.split(".")
        claims = jwt.decode(token, options={"verify_signature": False})
        now = int(reactor.seconds())
        with open(self.private_key, "rb") as f:
            private = f.read()
        with open(self.public_key, "rb") as f:
            public_pem = f.read()
        public_raw = serialization.load_pem_public_key(public_pem).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        attacker = Ed25519PrivateKey.generate()
        attacker_jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(attacker.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))}

        def signed(**changes):
            return jwt.encode({**claims, **changes}, private, algorithm="EdDSA")

        attacks = {
            "alg none": (f"{segment({'alg': 'none', 'typ': 'JWT'})}.{payload}.", E.TOKEN_SIGNATURE),
            "alg None, real signature": (f"{segment({'alg': 'None', 'typ': 'JWT'})}.{payload}.{signature}",
                                         E.TOKEN_SIGNATURE),
            "HS256 keyed with the public key PEM": (hs256(claims, public_pem), E.TOKEN_SIGNATURE),
            "HS256 keyed with the raw public key": (hs256(claims, public_raw), E.TOKEN_SIGNATURE),
            "EdDSA by a key its jwk header names": (jwt.encode(claims, attacker, algorithm="EdDSA",
                                                               headers={"jwk": attacker_jwk}), E.TOKEN_SIGNATURE),
            "expired": (signed(iat=now - 3600, exp=now - 1800), E.TOKEN_EXPIRED),
            "issued in the future": (signed(iat=now + 3600, exp=now + 4200), E.TOKEN_NOT_YET_VALID),
            "not before the future": (signed(nbf=now + 3600), E.TOKEN_NOT_YET_VALID),
            "another audience": (signed(aud="dreamraid-admin"), E.TOKEN_AUDIENCE),
            "another issuer": (signed(iss="evil-session"), E.TOKEN_ISSUER),
            "payload naming the honest player": (f"{header}.{segment({**claims, 'sub': str(honest.user_id)})}."
                                                 f"{signature}", E.TOKEN_SIGNATURE),
            "payload with a later expiry": (f"{header}.{segment({**claims, 'exp': claims['exp'] + 86400})}."
                                            f"{signature}", E.TOKEN_SIGNATURE),
            "8000 bytes of junk": ("a." * 4000, E.TOKEN_MALFORMED),
        }
        codes = {}
        for name, (forged, _) in attacks.items():
            client = await server.client(self)
            codes[name] = await self.refused(client, packets.AUTHENTICATE, {"token": forged})
            await self.assertClosedAfterRefusal(client)
        self.assertEqual(codes, {name: code for name, (_, code) in attacks.items()})

        self.assertIsNone(await self.router.execute("GET", presence_key(victim)))
        await self.assertServed(honest)
        real = await self.player(server, token)
        self.assertEqual(real.user_id, victim)
        await self.assertServed(honest)

    async def test_token_revoked_by_logout_stays_revoked(self):
        """After logout the token gets SESSION_NOT_LIVE, also once the user has logged in again with a new one."""
        server = await self.game_server()
        user_id = await self.new_user()
        token = await self.entered_token(user_id)
        client = await self.player(server, token)
        await client.logout()
        await client.connection.closed
        again = await server.client(self)
        self.assertEqual(await self.refused(again, packets.AUTHENTICATE, {"token": token}), E.SESSION_NOT_LIVE)
        await self.assertClosedAfterRefusal(again)

        newer = await self.entered_token(user_id)
        again = await server.client(self)
        self.assertEqual(await self.refused(again, packets.AUTHENTICATE, {"token": token}), E.SESSION_NOT_LIVE)
        await self.assertClosedAfterRefusal(again)
        again = await server.client(self)
        _, body = await again.request(packets.AUTHENTICATE, {"token": newer})
        self.assertEqual(body["user_id"], user_id)

    async def test_a_refused_authenticate_closes_the_connection(self):
        """
        A refused authenticate (a forged token, a token that is not the live
        session) is answered with its error and the connection closes, so a
        client cannot try token after token: nothing written after it in the
        same write is served, not even a good token's authenticate.
        """
        server = await self.game_server()
        user_id = await self.new_user()
        token = await self.entered_token(user_id)
        header, payload, signature = token.split(".")
        forged = f"{header}.{payload}.{('A' if signature[5] != 'A' else 'B').join([signature[:5], signature[6:]])}"
        good = (packets.AUTHENTICATE, 3, {"token": token})
        cases = {
            "forged": ([(packets.AUTHENTICATE, 1, {"token": forged}), (packets.PING, 2, {"nonce": 2}), good],
                       E.TOKEN_SIGNATURE),
            "not the live session": ([(packets.AUTHENTICATE, 1, {"token": self.issuer.issue(user_id).token}), good],
                                     E.SESSION_NOT_LIVE),
        }
        for name, (requests, code) in cases.items():
            raw = await self.raw(server)
            refusal, *rest = raw.pipeline(requests)
            answer = await refusal
            self.assertEqual((answer.message, answer.body["code"]), (packets.ERROR, code), name)
            await raw.closed.addTimeout(10, reactor)
            for unanswered in rest:
                await self.assertFailure(unanswered, ConnectionClosed)
            self.assertEqual(raw.unexpected, [], name)
        self.assertIsNone(await self.router.execute("GET", presence_key(user_id)))
        client = await self.player(server, token)
        self.assertEqual(client.user_id, user_id)

    async def test_connection_of_a_replaced_session_is_closed(self):
        """A newer login (enter world) ends the old session: its connection is closed at the next renewal."""
        server = await self.game_server("--game-presence-ttl", "1.5")
        user_id = await self.new_user()
        old = await self.player(server, await self.entered_token(user_id))
        newer = await self.entered_token(user_id)
        await old.connection.closed.addTimeout(10, reactor)
        self.assertEqual(old.connection.close_reason[0], E.SESSION_NOT_LIVE)
        client = await self.player(server, newer)
        await self.assertServed(client)


class HandoffAttackTests(SecurityCase):
    """Handoff tickets from raid_found: single use, and only their own user's."""

    async def test_tickets_are_single_use_and_bound_to_their_user(self):
        """
        Swapped, made-up and token-as-ticket handoffs are refused and burn
        nothing; a ticket works once, its replay is refused, and the raid
        plays on with the moved player.
        """
        server = await self.game_server()
        token_a = await self.entered_token(await self.new_user())
        a, b = await self.player(server, token_a), await self.player(server)
        for client in (a, b):
            await client.request(packets.QUEUE_RAID, {})
        found_a, found_b = await a.next_push("raid_found"), await b.next_push("raid_found")
        # Both are on the raid's host, so neither was offered a ticket; the test offers them as a
        # host on another process would (Presence.offer_handoff), to attack them.
        self.assertEqual((found_a["ticket"], found_b["ticket"]), ("", ""))
        ticket_a, ticket_b = (f"{random.getrandbits(128):032x}" for _ in range(2))
        for user_id, ticket in ((a.user_id, ticket_a), (b.user_id, ticket_b)):
            await self.router.execute("SET", handoff_key(user_id), ticket, "PX", 30_000)

        attempts = {
            "B's ticket for A": (a.user_id, ticket_b),
            "A's ticket for B": (b.user_id, ticket_a),
            "A's ticket for user 0": (0, ticket_a),
            "A's ticket for user 2**64-1": (2**64 - 1, ticket_a),
            "a made-up ticket": (a.user_id, "0" * 32),
            "an empty ticket": (a.user_id, ""),
            "A's login token": (a.user_id, token_a),
        }
        codes = {}
        for name, (user_id, ticket) in attempts.items():
            client = await server.client(self)
            codes[name] = await self.refused(client, packets.AUTHENTICATE_HANDOFF,
                                             {"user_id": user_id, "ticket": ticket})
            await self.assertClosedAfterRefusal(client)
        self.assertEqual(codes, dict.fromkeys(attempts, E.HANDOFF_REFUSED))
        self.assertEqual(await self.router.execute("GET", handoff_key(b.user_id)), ticket_b.encode())

        moved = await server.client(self)
        _, body = await moved.request(packets.AUTHENTICATE_HANDOFF, {"user_id": a.user_id, "ticket": ticket_a})
        self.assertEqual(body["user_id"], a.user_id)
        await a.connection.closed
        self.assertEqual(a.connection.close_reason[0], E.LOGGED_IN_ELSEWHERE)
        self.assertIsNone(await self.router.execute("GET", handoff_key(a.user_id)))

        for message, body, code in [
                (packets.AUTHENTICATE_HANDOFF, {"user_id": a.user_id, "ticket": ticket_a}, E.HANDOFF_REFUSED),
                (packets.AUTHENTICATE, {"token": ticket_a}, E.TOKEN_MALFORMED),
                (packets.AUTHENTICATE, {"token": token_a}, E.SESSION_NOT_LIVE)]:
            replay = await server.client(self)
            self.assertEqual(await self.refused(replay, message, body), code)
            await self.assertClosedAfterRefusal(replay)
        self.assertEqual(await self.refused(moved, packets.AUTHENTICATE_HANDOFF,
                                            {"user_id": a.user_id, "ticket": ticket_a}), E.ALREADY_AUTHENTICATED)

        raid_id = found_a["raid_id"]
        for client in (moved, b):
            await client.request(packets.RAID_READY, {"raid_id": raid_id})
        hp = BOSS_HP
        while hp:
            _, hit = await moved.request(packets.RAID_HIT, {"raid_id": raid_id})
            hp = hit["hp"]
        results = [await moved.next_push("raid_result"), await b.next_push("raid_result")]
        self.assertEqual([(r["cleared"], r["score"]) for r in results], [(True, BOSS_HP), (True, 0)])


class DatagramAttackTests(SecurityCase):
    """Raid datagrams from strangers and cheats: dropped and counted by reason, the honest players unaffected."""

    timeout = 90

    async def raid_of_two(self, server):
        """Two players in a raid on C{server}, UDP greeted: C{(clients, found, channels)}, each by member number."""
        players = [await self.player(server) for _ in range(2)]
        for client in players:
            await client.request(packets.QUEUE_RAID, {})
        found = [await client.next_push("raid_found") for client in players]
        clients = [players[i] for i in sorted(range(2), key=lambda i: found[i]["member"])]
        found.sort(key=lambda body: body["member"])
        channels, hp = await greeted_channels(self, found)
        self.assertEqual(hp, [BOSS_HP] * 2)
        return clients, found, channels

    def listener(self):
        listener = Listener()
        port = reactor.listenUDP(0, listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return listener

    async def test_spoofed_forged_and_replayed_datagrams(self):
        """
        From another socket: wrong seals (one with the highest sequence),
        a captured datagram replayed, an unknown raid, members out of range,
        bad sizes and a server-only message; each dropped and counted by
        reason.  The honest player's sequence, address and raid are untouched.
        """
        server = await self.game_server()
        host = server.part("RaidHost")
        clients, found, (honest, other) = await self.raid_of_two(server)
        number, key, to_host = honest.number, honest.key, honest.server
        attacker = self.listener()
        before = dict(host.counters)

        honest.position(1.0, 2.0, 1)
        captured = packets.seal_datagram(key, packets.POSITION, number, 0, honest.sequence,
                                         {"x": 1.0, "y": 2.0, "state": 1})
        await eventually(lambda: true(host.counters["received"] == before["received"] + 1))

        wrong = os.urandom(16)
        junk = {"x": 9.0, "y": 9.0, "state": 9}
        forged = [
            packets.seal_datagram(wrong, packets.POSITION, number, 0, 10**6, junk),
            packets.seal_datagram(wrong, packets.UDP_HELLO, number, 0, 10**6 + 1, {}),
            packets.seal_datagram(wrong, packets.POSITION, number, 0, 2**32 - 1, junk),
            packets.seal_datagram(key, packets.POSITION, number, 2, 10**6, junk),
            packets.seal_datagram(key, packets.POSITION, number, 255, 10**6, junk),
            captured[:packets.DATAGRAM_HEADER_SIZE + packets.MAC_SIZE - 1],
            captured + bytes(packets.MAX_DATAGRAM_SIZE),
            packets.seal_datagram(key, packets.BOSS_HP, number, 0, 10**6, {"hp": 0, "hp_sequence": 2**32 - 1}),
        ]
        unknown = packets.seal_datagram(key, packets.POSITION, (number + 1) % 2**32, 0, 10**6, junk)
        for datagram in [*forged, captured, unknown]:
            attacker.transport.write(datagram, to_host)
        # A fake boss death straight to the honest player's socket is dropped by the client.
        mine = honest.transport.getHost()
        attacker.transport.write(packets.seal_datagram(
            wrong, packets.BOSS_HP, number, 0, 2**32 - 1, {"hp": 0, "hp_sequence": 2**32 - 1}), (mine.host, mine.port))

        expected = {"forged": len(forged), "replayed": 1, "unknown": 1}

        def dropped():
            return {reason: host.counters[reason] - before[reason] for reason in expected}
        await eventually(lambda: true(dropped() == expected), timeout=10)

        # A position from the honest player that is not finite is dropped and counted, never relayed; the
        # relay goes on with the next.
        honest.position(float("nan"), float("inf"), 255)
        honest.position(3.0, 4.0, 255)
        await eventually(lambda: true(other.positions.get(0) == (3.0, 4.0, 255)), timeout=10)
        self.assertEqual(host.counters["bad_position"] - before["bad_position"], 1)
        self.assertEqual(dropped(), expected)
        self.assertEqual(host.counters["received"] - before["received"], 2)
        await eventually(lambda: true(honest.dropped == 1), timeout=10)
        self.assertEqual(honest.hp, BOSS_HP)

        raid_id = found[0]["raid_id"]
        for client in clients:
            await client.request(packets.RAID_READY, {"raid_id": raid_id})
        hp = BOSS_HP
        while hp:
            _, hit = await clients[0].request(packets.RAID_HIT, {"raid_id": raid_id})
            hp = hit["hp"]
        for channel in (honest, other):
            self.assertEqual(await channel.when_hp(lambda hp: hp == 0).addTimeout(10, reactor), 0)
        results = [await client.next_push("raid_result") for client in clients]
        self.assertEqual([r["cleared"] for r in results], [True, True])
        self.assertEqual(attacker.received, [])
        self.assertEqual(dropped(), expected)

    async def test_a_member_cannot_speak_for_another(self):
        """
        A raid member sealing datagrams as another member (with its own key,
        the only one it has) is dropped as forged: the other member's
        position, address and sequence stay theirs.
        """
        server = await self.game_server()
        host = server.part("RaidHost")
        _, _, (victim, cheat) = await self.raid_of_two(server)
        before = dict(host.counters)
        spoof = packets.seal_datagram(cheat.key, packets.POSITION, cheat.number, victim.member, 10**6,
                                      {"x": 66.0, "y": 66.0, "state": 6})
        cheat.transport.write(spoof, cheat.server)
        victim.position(5.0, 5.0, 5)

        def seen():
            return sum(host.counters[r] - before[r] for r in ("received", "forged", "replayed", "unknown"))
        await eventually(lambda: true(seen() == 2), timeout=10)
        self.assertEqual((host.counters["forged"] - before["forged"], host.counters["received"] - before["received"]),
                         (1, 1))
        await eventually(lambda: true(cheat.positions.get(victim.member) == (5.0, 5.0, 5)), timeout=10)


class SessionInputAttackTests(SecurityCase):
    """
    Names and passwords built to inject SQL or to be too long, at register
    and login; each request on a connection of its own, as the session
    server limits registrations and logins per connection.
    """

    async def ask(self, server, message, body):
        """C{message} on a connection of its own: the reply's body (or the exception the request raised)."""
        client = await server.client(self)
        try:
            return (await client.request(message, body))[1]
        finally:
            if client.connected:
                await client.close()

    async def refused_alone(self, server, message, body):
        """The error code C{message} gets on a connection of its own."""
        with self.assertRaises(RemoteError) as raised:
            await self.ask(server, message, body)
        return raised.exception.code

    async def test_injection_names_refused_and_nothing_created(self):
        """SQL-injection and other illegal names get INVALID_NAME at register and login, and leave no row or key."""
        server = self.session_server()
        names = ["' OR '1'='1", "admin'--", "x'; DROP TABLE users; --", '" OR ""="', "robert');--",
                 "1 UNION SELECT id FROM users", "o'brien", "a%", "a\\'b", "ab`c", "abc\x00def", "abc\n"]
        codes = {}
        for name in names:
            for message in (packets.REGISTER, packets.LOGIN):
                codes[message.name, name] = await self.refused_alone(server, message,
                                                                     {"name": name, "password": "long enough"})
        self.assertEqual(codes, {key: E.INVALID_NAME for key in codes})
        for name in names:
            self.assertEqual(await sql("SELECT COUNT(*) FROM users WHERE name = %s", (name,)), ((0,),), name)
            self.assertEqual(await self.router.execute("EXISTS", LoginThrottle.account_key(name)), 0, name)

    async def test_quotes_and_nul_in_passwords_and_the_nearest_legal_name(self):
        """
        o_brien (the legal form of o'brien) with a quote-laden password
        registers and logs in; near misses of that password, and a password
        cut at a NUL, are WRONG_CREDENTIALS; 128 characters of any width are
        allowed, 129 not.
        """
        server = self.session_server()
        name = f"o_brien_{random.getrandbits(40):x}"
        password = "o'brien's pass' OR '1'='1' --"
        registered = await self.ask(server, packets.REGISTER, {"name": name, "password": password})
        [(user_id, stored)] = await sql("SELECT id, password_hash FROM users WHERE name = %s", (name,))
        self.assertEqual(user_id, registered["user_id"])
        self.assertNotIn("brien", stored)
        logged_in = await self.ask(server, packets.LOGIN, {"name": name.upper(), "password": password})
        self.assertEqual(logged_in["user_id"], user_id)
        for wrong in ["' OR '1'='1", password[:-3], password + "'"]:
            self.assertEqual(await self.refused_alone(server, packets.LOGIN, {"name": name, "password": wrong}),
                             E.WRONG_CREDENTIALS, wrong)

        nul_name = f"nul_{random.getrandbits(40):x}"
        await self.ask(server, packets.REGISTER, {"name": nul_name, "password": "correct horse\x00battery"})
        self.assertEqual(await self.refused_alone(server, packets.LOGIN,
                                                  {"name": nul_name, "password": "correct horse"}),
                         E.WRONG_CREDENTIALS)
        await self.ask(server, packets.LOGIN, {"name": nul_name, "password": "correct horse\x00battery"})

        wide = f"wide_{random.getrandbits(40):x}"
        self.assertEqual(await self.refused_alone(server, packets.REGISTER,
                                                  {"name": wide, "password": "\U0001f511" * 129}),
                         E.INVALID_PASSWORD)
        await self.ask(server, packets.REGISTER, {"name": wide, "password": "\U0001f511" * 128})
        await self.ask(server, packets.LOGIN, {"name": wide, "password": "\U0001f511" * 128})

    async def test_over_long_names_and_passwords(self):
        """
        Long values within the frame limit get INVALID_NAME or
        INVALID_PASSWORD (login: WRONG_CREDENTIALS, it checks only the name);
        past it, FRAME_TOO_LARGE and a closed connection; a 1 MB password
        cannot even be encoded.  Nothing is created, and the server serves
        an honest client afterwards.
        """
        server = self.session_server()
        name = f"long_{random.getrandbits(40):x}"
        attempts = {
            "register, long name": (packets.REGISTER, {"name": "n" * 8000, "password": "long enough"},
                                    E.INVALID_NAME),
            "login, long name": (packets.LOGIN, {"name": "n" * 8000, "password": "long enough"}, E.INVALID_NAME),
            "register, long password": (packets.REGISTER, {"name": name, "password": "p" * 8000},
                                        E.INVALID_PASSWORD),
        }
        codes = {what: await self.refused_alone(server, message, body)
                 for what, (message, body, _) in attempts.items()}
        self.assertEqual(codes, {what: code for what, (_, _, code) in attempts.items()})
        self.assertEqual(await sql("SELECT COUNT(*) FROM users WHERE name = %s", (name,)), ((0,),))
        await self.ask(server, packets.REGISTER, {"name": name, "password": "p" * 128})
        self.assertEqual(await self.refused_alone(server, packets.LOGIN, {"name": name, "password": "p" * 8000}),
                         E.WRONG_CREDENTIALS)

        for message, body in [(packets.REGISTER, {"name": "n" * 10_000, "password": "long enough"}),
                              (packets.LOGIN, {"name": name, "password": "p" * 10_000})]:
            with self.assertRaises(ConnectionClosed) as raised:
                await self.ask(server, message, body)
            self.assertEqual(raised.exception.code, E.FRAME_TOO_LARGE)

        with self.assertRaises(packets.CodecError):
            packets.REGISTER.encode(1, {"name": name, "password": "p" * 2**20})
        raw = await self.raw(server)
        raw.send(struct.pack("<HHI", 0xFFFF, packets.REGISTER.id, 1) + struct.pack("<H", 3) + b"abc"
                 + struct.pack("<H", 0xFFFF) + b"p" * 1000)
        await raw.closed
        self.assertEqual([(f.message, f.body["code"]) for f in raw.unexpected], [(packets.ERROR, E.FRAME_TOO_LARGE)])

        honest_name = f"honest_{random.getrandbits(40):x}"
        await self.ask(server, packets.REGISTER, {"name": honest_name, "password": "correct horse"})
        logged_in = await self.ask(server, packets.LOGIN, {"name": honest_name, "password": "correct horse"})
        self.assertEqual(await sql("SELECT id FROM users WHERE name = %s", (honest_name,)), ((logged_in["user_id"],),))


# -- numeric fields at their edges ------------------------------------------------------

def _width(char):
    return struct.calcsize("<" + ("B" if char == "?" else char))


def _edges(char):
    """Wire values at the edges of a field: 0, 1, either side of the sign bit, and the top (-1 as signed)."""
    full = 2 ** (8 * _width(char))
    return sorted({0, 1, full // 2 - 1, full // 2, full - 2, full - 1})


def _wire(char, value):
    """C{value} as the field's bytes, wrapped to its width as raw bytes would be."""
    size = _width(char)
    return (value % 2 ** (8 * size)).to_bytes(size, "little")


def _seen(char, wire):
    """What the server decodes from a field's bytes."""
    return struct.unpack("<" + char, wire)[0]


# Every request the game server accepts that has a numeric field, and the reply it answers with when it does not
# refuse (None: no reply): the schema's REPLY_OF, which docs/protocol.md states, checked here against the server.
FUZZED = [m for m in sorted(packets.MESSAGES.values(), key=lambda m: m.id)
          if m.id in GameProtocol.handlers and any(kind == "fixed" for _, kind, _, _ in m.fields)]
REPLIES = packets.REPLY_OF
# Refused credentials close the connection once the error is written.
TOKEN_REFUSALS = {E.TOKEN_MALFORMED, E.TOKEN_SIGNATURE, E.TOKEN_EXPIRED, E.TOKEN_NOT_YET_VALID, E.TOKEN_AUDIENCE,
                  E.TOKEN_ISSUER}
CLOSING_REFUSALS = {E.HANDOFF_REFUSED, E.RESUME_EXPIRED, *TOKEN_REFUSALS}
TABLES = load_tables(make_settings().tables.path)


def answers(message, body, authenticated):
    """
    C{(may_reply, codes)}: whether the game server may answer C{body} with
    its reply, and the codes it may refuse it with; the bounds it must
    enforce on each field.  The fuzzed player leads a party of one and has
    items in every tab.
    """
    if GameProtocol.handlers[message.id][1] and not authenticated:
        return False, {E.NOT_AUTHENTICATED}
    slots = range(TABLES.slots)
    if message is packets.HELLO:
        return (True, set()) if body["protocol_version"] == packets.PROTOCOL_VERSION else (
            False, {E.UNSUPPORTED_VERSION})
    if message is packets.HUNT:
        return (True, {E.HUNT_COOLDOWN}) if body["monster"] in TABLES.monster_exp else (False, {E.UNKNOWN_MONSTER})
    if message is packets.DELETE_ITEM:
        inside = body["tab"] in TABS and body["slot"] in slots
    elif message is packets.MOVE_ITEM:
        inside = body["tab"] in TABS and body["from_slot"] in slots and body["to_slot"] in slots
    elif message in (packets.USE_ITEM, packets.ENHANCE):
        inside = body["slot"] in slots
    elif message is packets.GRANT:
        if body["item_code"] not in TABLES.items:
            return False, {E.UNKNOWN_ITEM}
        return (True, {E.INVENTORY_FULL}) if body["count"] >= 1 else (False, {E.BAD_RANGE})
    elif message is packets.RANKING_PAGE:
        return (True, set()) if body["first"] >= 1 and 1 <= body["count"] <= PAGE_LIMIT else (False, {E.BAD_RANGE})
    elif message is packets.KICK_MEMBER:
        return False, {E.NOT_A_MEMBER}
    elif message is packets.AUTHENTICATE_HANDOFF:
        return False, {E.ALREADY_AUTHENTICATED if authenticated else E.HANDOFF_REFUSED}
    elif message is packets.RESUME:
        if authenticated:
            return False, {E.ALREADY_AUTHENTICATED}
        # A ticket is checked as the user's live session; else the token, which no fuzzed text is.
        return False, {E.RESUME_EXPIRED} if body["ticket"] else TOKEN_REFUSALS
    else:
        return True, set()
    slot_refusals = {E.EMPTY_SLOT, E.MAX_ENHANCEMENT} if message is packets.ENHANCE else {E.EMPTY_SLOT}
    return (True, slot_refusals) if inside else (False, {E.BAD_SLOT})


class Crafted(NamedTuple):
    """A request written byte by byte: its fields' wire values, and how (if at all) the body is damaged."""

    message: packets.Message
    request_id: int
    values: dict  # field name -> wire value (ints) or text (strings)
    damage: str  # "none", "trailing", "cut" or "length"
    declared: int  # the first string's length prefix when damage is "length"

    def frame(self):
        body, lied = b"", False
        for name, kind, char, _ in self.message.fields:
            if kind == "fixed":
                body += _wire(char, self.values[name])
            else:
                data = self.values[name].encode("utf-8")
                length = self.declared if self.damage == "length" and not lied else len(data)
                lied = True
                body += struct.pack("<" + char, length) + data
        body = {"trailing": body + b"\x00", "cut": body[:-1]}.get(self.damage, body)
        payload = struct.pack("<HI", self.message.id, self.request_id) + body
        return struct.pack("<H", len(payload)) + payload

    def body(self):
        """What the server decodes, for an undamaged frame."""
        return {name: _seen(char, _wire(char, self.values[name])) if kind == "fixed" else self.values[name]
                for name, kind, char, _ in self.message.fields}


@st.composite
def crafted(draw, message):
    values = {}
    for name, kind, char, element in message.fields:
        if kind == "fixed":
            values[name] = draw(st.one_of(st.sampled_from(_edges(char)), value_strategy(kind, char)))
        else:
            values[name] = draw(value_strategy(kind, char, element))
    strings = [values[name].encode("utf-8") for name, kind, _, _ in message.fields if kind == "str"]
    damages = ["none"] * 5 + ["trailing", "cut"] + (["length"] if strings else [])
    damage = draw(st.sampled_from(damages))
    declared = 0
    if damage == "length":
        true_length = len(strings[0])
        declared = draw(st.sampled_from([0xFFFF, true_length + 1] + ([true_length - 1] if true_length else [])))
    request_id = draw(st.one_of(st.sampled_from([1, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(1, 2**32 - 1)))
    return Crafted(message, request_id, values, damage, declared)


def edge_cases():
    """Each numeric field of each fuzzed request at each edge, the other fields 1 (or "x")."""
    cases = []
    for message in FUZZED:
        plain = {name: 1 if kind == "fixed" else "x" for name, kind, _, _ in message.fields}
        for name, kind, char, _ in message.fields:
            if kind == "fixed":
                cases += [Crafted(message, 1000 + len(cases), {**plain, name: v}, "none", 0) for v in _edges(char)]
    return cases


def generated_cases(count):
    """C{count} crafted requests drawn by hypothesis (collected first: the reactor must answer them)."""
    cases = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(FUZZED).flatmap(crafted))
    def collect(case):
        cases.append(case)

    collect()
    return cases


class NumericEdgeTests(SecurityCase):
    """Raw frames with numeric fields at their edges, against a game server with an authenticated player."""

    async def exchange(self, raw, case, authenticated):
        """
        Send C{case}; check its answer against what the server must say, then
        that a ping still gets its pong; whether the connection is still
        open (a refused handoff or resume closes it).
        """
        label = f"{case.message.name} {case.damage} {case.values} {case.frame().hex()}"
        if case.damage == "none":
            self.assertEqual(case.frame(), case.message.encode(case.request_id, case.body()), label)
        if case.damage == "none" and REPLIES[case.message] is None:
            raw.send(case.frame())
        else:
            answer = await raw.send(case.frame(), case.request_id)
            self.assertEqual(answer.request_id, case.request_id, label)
            may_reply, codes = (False, {E.MALFORMED_BODY}) if case.damage != "none" else answers(
                case.message, case.body(), authenticated)
            if answer.message is packets.ERROR:
                self.assertIn(E(answer.body["code"]), codes, label)
            else:
                self.assertTrue(may_reply, f"{label}: must be refused with one of {codes}, got {answer}")
                self.assertIs(answer.message, REPLIES[case.message], label)
                if case.message is packets.PING:
                    self.assertEqual(answer.body, case.body(), label)
            if answer.message is packets.ERROR and answer.body["code"] in CLOSING_REFUSALS:
                await raw.closed.addTimeout(10, reactor)
                return False
        pong = await raw.send(packets.PING.encode(4242, {"nonce": 4242}), 4242)
        self.assertEqual((pong.message, pong.body), (packets.PONG, {"nonce": 4242}), label)
        return True

    async def test_every_numeric_field_at_its_edges(self):
        """
        Every request the game server takes with a numeric field, each field
        at 0, 1, either side of the sign bit and the top, damaged bodies and
        lying string lengths: a valid reply or a known refusal (never an
        internal error), on an authenticated and an unauthenticated
        connection, each still answering pings (a refused handoff or resume closes
        its connection; the next case goes on a new one); nothing unhandled
        is logged.
        """
        self.assertLessEqual(set(FUZZED), set(REPLIES))  # every fuzzed request has a declared reply
        # Thousands of frames as fast as answered: the limits (tested in tests/test_limits.py) would only slow it.
        server = await self.game_server("--game-auth-timeout", "120", "--game-rate-limits", "off",
                                        "--game-frame-rate", "off")
        honest = await self.player(server)
        user_id = await self.new_user()
        fuzzed = await self.raw(server)
        token = await self.entered_token(user_id)
        answer = await fuzzed.send(packets.AUTHENTICATE.encode(1, {"token": token}), 1)
        self.assertEqual(answer.body["user_id"], user_id)
        setup = [(packets.CREATE_PARTY, {})] + [(packets.GRANT, {"item_code": code, "count": count})
                                               for code, count in [(101, 3), (201, 30), (301, 200)]]
        for request_id, (message, body) in enumerate(setup, 2):
            answer = await fuzzed.send(message.encode(request_id, body), request_id)
            self.assertIsNot(answer.message, packets.ERROR, answer)
        stranger = await self.raw(server)

        cases = edge_cases() + generated_cases(150)
        for case in cases:
            await self.exchange(fuzzed, case, authenticated=True)
        for case in edge_cases() + generated_cases(50):
            if not await self.exchange(stranger, case, authenticated=False):
                stranger = await self.raw(server)

        for raw in (fuzzed, stranger):
            self.assertEqual((raw.unexpected, raw.undecodable), ([], []))
            self.assertTrue(raw.transport.connected)
        answer = await fuzzed.send(packets.LIST_INVENTORY.encode(5, {}), 5)
        self.assertIs(answer.message, packets.INVENTORY)
        await self.assertServed(honest)


class OverflowTests(SynchronousTestCase):
    """Values past a field's width cannot be encoded: raw bytes are the only way to send edge values."""

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_values_past_a_field_fail_to_encode(self, data):
        """Every numeric field of every request, one past its range either way (or far past): CodecError."""
        message = data.draw(st.sampled_from(FUZZED))
        body = data.draw(body_strategy(message))
        name, char = data.draw(st.sampled_from([(n, c) for n, kind, c, _ in message.fields if kind == "fixed"]))
        full = 2 ** (8 * _width(char))
        low, high = (-(full // 2), full // 2 - 1) if char.islower() else (0, full - 1)
        body[name] = data.draw(st.one_of(st.sampled_from([high + 1, low - 1]), st.integers(high + 1, 4 * full),
                                         st.integers(-4 * full, low - 1)))
        with self.assertRaises(packets.CodecError):
            message.encode(1, body)

    @settings(max_examples=50, deadline=None)
    @given(st.sampled_from([-1, 2**32, 2**64]), st.sampled_from(["raid_id", "member", "sequence"]))
    def test_headers_past_their_width_fail_to_encode(self, value, field):
        """A request id, raid number, member or sequence past its width: CodecError."""
        with self.assertRaises(packets.CodecError):
            packets.PING.encode(value, {"nonce": 1})
        header = {"raid_id": 1, "member": 0, "sequence": 1, field: value}
        with self.assertRaises(packets.CodecError):
            packets.seal_datagram(b"k" * 16, packets.POSITION, header["raid_id"], header["member"], header["sequence"],
                                  {"x": 0.0, "y": 0.0, "state": 0})
