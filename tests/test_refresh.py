"""
Refresh tokens: rotation on every use, a used token presented again revoking
its whole family, expiry, and revocation at logout.  Unit tests drive the
service on a task.Clock over an in-memory store that decides as the MySQL one
does; integration tests (DREAMRAID_STACK) run the MySQL store on the real
MariaDB, 100 refreshes of one token at once included, and the session server
over TCP: a client whose access token expired refreshes and enters the world
without its password.
"""

import hashlib
import random

import pymysql
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid import session_tap
from dreamraid.client import RemoteError
from dreamraid.client.session import SessionClient
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.services.accounts import Accounts
from dreamraid.services.database import Database
from dreamraid.services.refresh import (
    EXPIRED, REUSED, REVOKED, ROTATED, UNKNOWN, Found, IRefreshTokenStore, MysqlRefreshTokenStore, RefreshTokenPruner,
    RefreshTokens,
    Rotation, rotation_outcome, token_hash)
from tests.storage import TEST_DATABASE, new_key_pair, prepare_test_database, sql, test_settings
from tests.support import RunningServer, require_stack
from tests.test_security import RawClient

TTL = 30 * 86400
USER = 7


@implementer(IRefreshTokenStore)
class MemoryRefreshTokenStore:
    """L{IRefreshTokenStore} in memory, deciding with the same L{rotation_outcome} as the MySQL store."""

    def __init__(self):
        self.tokens = {}  # hash -> [family, expires_at, spent]
        self.families = {}  # id -> [user_id, revoked_why, expires_at]
        self.down = False

    def _call(self, f, *args):
        if self.down:
            return defer.fail(pymysql.err.OperationalError(2003, "Can't connect to MySQL server"))
        return defer.succeed(f(*args))

    def start_family(self, user_id, token_hash, now, expires_at):
        def start():
            family = len(self.families) + 1
            self.families[family] = [user_id, None, expires_at]
            self.tokens[token_hash] = [family, expires_at, False]
            return family
        return self._call(start)

    def rotate(self, token_hash, new_hash, now, expires_at):
        def rotate():
            stored = self.tokens.get(token_hash)
            if stored is None:
                return Rotation(UNKNOWN)
            family, token_expires, spent = stored
            user_id, revoked, _ = self.families[family]
            outcome = rotation_outcome(Found(family, user_id, token_expires, spent, revoked is not None), now)
            if outcome == REUSED:
                self.families[family][1] = "reuse"
            elif outcome == ROTATED:
                stored[2] = True
                self.tokens[new_hash] = [family, expires_at, False]
                self.families[family][2] = max(self.families[family][2], expires_at)
            return Rotation(outcome, user_id, family)
        return self._call(rotate)

    def revoke(self, token_hash, now):
        def revoke():
            stored = self.tokens.get(token_hash)
            if stored is None:
                return None
            if self.families[stored[0]][1] is None:
                self.families[stored[0]][1] = "revoke"
            return stored[0]
        return self._call(revoke)

    def prune(self, now, limit):
        def prune():
            expired = sorted((f for f in self.families if self.families[f][2] <= now),
                             key=lambda f: self.families[f][2])[:limit]
            for family in expired:
                del self.families[family]
            self.tokens = {h: t for h, t in self.tokens.items() if t[0] in self.families}
            return len(expired)
        return self._call(prune)


class FakeIssuer:
    """Access tokens numbered in the order issued."""

    def __init__(self):
        self.issued = 0

    def issue(self, user_id):
        self.issued += 1

        class Issued:
            token, expires_at = f"access-{user_id}-{self.issued}", 600
        return Issued()


class RefreshCase(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryRefreshTokenStore()
        self.tokens = RefreshTokens(self.store, self.clock, random.Random(5), TTL)

    def start(self, user_id=USER):
        return self.successResultOf(defer.ensureDeferred(self.tokens.start(user_id)))

    def rotate(self, token):
        return defer.ensureDeferred(self.tokens.rotate(token))

    def refused(self, d):
        return self.failureResultOf(d, RequestRefused).value.code


class InterfaceTests(SynchronousTestCase):

    def test_stores_provide_the_interface(self):
        """The MySQL store and the memory fake both provide IRefreshTokenStore."""
        self.assertTrue(verifyObject(IRefreshTokenStore, MysqlRefreshTokenStore(None)))
        self.assertTrue(verifyObject(IRefreshTokenStore, MemoryRefreshTokenStore()))

    def test_outcomes(self):
        """A revoked family stays revoked, a spent token is a reuse even past its expiry, then expiry, then served."""
        now = 1000
        self.assertEqual(rotation_outcome(None, now), UNKNOWN)
        self.assertEqual(rotation_outcome(Found(1, 2, now + 1, True, True), now), REVOKED)
        self.assertEqual(rotation_outcome(Found(1, 2, now - 1, True, False), now), REUSED)
        self.assertEqual(rotation_outcome(Found(1, 2, now, False, False), now), EXPIRED)
        self.assertEqual(rotation_outcome(Found(1, 2, now + 1, False, False), now), ROTATED)


class RotationTests(RefreshCase):
    """Each refresh spends its token and issues the next."""

    def test_a_token_is_256_random_bits_stored_only_hashed(self):
        """A token is 43 URL-safe characters; the store holds its SHA-256 and never its text."""
        issued = self.start()
        self.assertRegex(issued.token, r"^[A-Za-z0-9_-]{43}$")
        self.assertEqual(issued.expires_at, int(self.clock.seconds()) + TTL)
        self.assertEqual(list(self.store.tokens), [hashlib.sha256(issued.token.encode()).digest()])
        self.assertNotEqual(self.start().token, issued.token)

    def test_rotation(self):
        """A refresh returns the user and a new token living refresh_ttl from now; the old one is spent."""
        first = self.start()
        self.clock.advance(3600)
        user_id, second = self.successResultOf(self.rotate(first.token))
        self.assertEqual(user_id, USER)
        self.assertNotEqual(second.token, first.token)
        self.assertEqual(second.expires_at, int(self.clock.seconds()) + TTL)
        self.assertTrue(self.store.tokens[token_hash(first.token)][2])
        _, third = self.successResultOf(self.rotate(second.token))
        self.assertEqual(len({first.token, second.token, third.token}), 3)

    def test_reuse_revokes_the_family(self):
        """
        A spent token presented again is refused and revokes its family: the
        newest token of the same login stops working, another login's does not.
        """
        first = self.start()
        other_login = self.start()
        _, second = self.successResultOf(self.rotate(first.token))
        _, third = self.successResultOf(self.rotate(second.token))
        self.assertEqual(self.refused(self.rotate(first.token)), ErrorCode.REFRESH_REFUSED)
        self.assertEqual(self.refused(self.rotate(third.token)), ErrorCode.REFRESH_REFUSED)
        self.assertEqual(self.store.families[1][1], "reuse")
        self.successResultOf(self.rotate(other_login.token))

    def test_expiry(self):
        """A token is good until refresh_ttl after it was issued, and refused from then on."""
        first = self.start()
        self.clock.advance(TTL - 1)
        _, second = self.successResultOf(self.rotate(first.token))
        self.clock.advance(TTL - 1)
        _, third = self.successResultOf(self.rotate(second.token))
        self.clock.advance(TTL)
        self.assertEqual(self.refused(self.rotate(third.token)), ErrorCode.REFRESH_REFUSED)
        self.assertIsNone(self.store.families[1][1], "an expired token revokes nothing")

    def test_logout_revokes(self):
        """A revoke (logout) ends the family of the token it names, spent or not; other logins keep theirs."""
        first = self.start()
        other_login = self.start()
        _, second = self.successResultOf(self.rotate(first.token))
        self.successResultOf(defer.ensureDeferred(self.tokens.revoke(second.token)))
        self.assertEqual(self.refused(self.rotate(second.token)), ErrorCode.REFRESH_REFUSED)
        self.assertEqual(self.store.families[1][1], "revoke")
        self.successResultOf(self.rotate(other_login.token))

    def test_bad_tokens_refused_without_the_store(self):
        """Unknown and malformed tokens get the same REFRESH_REFUSED; malformed ones never reach the store."""
        self.store.down = True
        for bad in ["", "x" * 42, "x" * 44, "!" * 43, "é" * 43, None]:
            self.assertEqual(self.refused(self.rotate(bad)), ErrorCode.REFRESH_REFUSED, bad)
            self.successResultOf(defer.ensureDeferred(self.tokens.revoke(bad)))
        self.store.down = False
        self.assertEqual(self.refused(self.rotate("A" * 43)), ErrorCode.REFRESH_REFUSED)
        self.successResultOf(defer.ensureDeferred(self.tokens.revoke("A" * 43)))


class PrunerTests(RefreshCase):
    """Expired families are deleted every hour, a chunk at a time, whatever fails."""

    def test_expired_families_are_deleted_in_chunks_every_interval(self):
        """
        At start and then every interval, every family whose newest token
        expired is deleted (in chunks); a failed round is logged and the
        next one runs.
        """
        pruner = RefreshTokenPruner(self.store, self.clock, interval=3600, chunk=2)
        expiring = [self.start() for _ in range(5)]
        self.clock.advance(TTL - 100)
        _, kept = self.successResultOf(self.rotate(expiring[0].token))
        pruner.startService()
        self.addCleanup(pruner.stopService)
        self.successResultOf(pruner.pruning)
        self.assertEqual(pruner.last_deleted, 0)
        self.clock.advance(3600)
        self.successResultOf(pruner.pruning)
        self.assertEqual(pruner.last_deleted, 4)
        self.assertEqual(list(self.store.families), [1])
        self.successResultOf(self.rotate(kept.token))
        self.store.down = True
        self.clock.advance(TTL)
        self.successResultOf(pruner.pruning)
        self.assertEqual(pruner.last_deleted, 0)
        self.store.down = False
        self.clock.advance(3600)
        self.successResultOf(pruner.pruning)
        self.assertEqual(pruner.last_deleted, 1)
        self.assertEqual((self.store.families, self.store.tokens), ({}, {}))


class AccountsRefreshTests(RefreshCase):
    """Login hands out a refresh token; a refresh is a login without the password."""

    def setUp(self):
        super().setUp()
        self.issuer = FakeIssuer()
        self.accounts = Accounts(None, None, None, None, self.issuer, self.tokens)

    def test_refresh_gives_a_new_access_token_and_refresh_token(self):
        """A refresh answers like a login: a new access token for the user and the next refresh token."""
        first = self.start()
        refreshed = self.successResultOf(defer.ensureDeferred(self.accounts.refresh(first.token)))
        self.assertEqual((refreshed.user_id, refreshed.token), (USER, f"access-{USER}-1"))
        self.assertNotEqual(refreshed.refresh_token, first.token)
        self.assertEqual(refreshed.refresh_expires_at, int(self.clock.seconds()) + TTL)
        self.assertEqual(self.failureResultOf(defer.ensureDeferred(self.accounts.refresh(first.token)),
                                              RequestRefused).value.code, ErrorCode.REFRESH_REFUSED)

    def test_store_down_is_unavailable(self):
        """MySQL down: a refresh or a revoke is UNAVAILABLE (and nothing was spent)."""
        first = self.start()
        self.store.down = True
        for call in (self.accounts.refresh, self.accounts.revoke):
            refused = self.failureResultOf(defer.ensureDeferred(call(first.token)), RequestRefused)
            self.assertEqual(refused.value.code, ErrorCode.UNAVAILABLE)
        self.store.down = False
        self.successResultOf(defer.ensureDeferred(self.accounts.refresh(first.token)))


class MysqlStoreTests(TestCase):
    """The MySQL store on the real MariaDB (the test database)."""

    timeout = 120

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        self.settings = test_settings()
        self.database = Database(self.settings.mysql)
        self.database.startService()
        self.addCleanup(self.database.stopService)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.tokens = RefreshTokens(MysqlRefreshTokenStore(self.database), self.clock, random.SystemRandom(), TTL)
        name = f"r{random.getrandbits(60):x}"[:20]
        await sql("INSERT INTO users (name, password_hash) VALUES (%s, 'x')", (name,))
        [(self.user_id,)] = await sql("SELECT id FROM users WHERE name = %s", (name,))
        self.addCleanup(sql, "DELETE FROM users WHERE id = %s", (self.user_id,))

    async def refused(self, token):
        with self.assertRaises(RequestRefused) as raised:
            await self.tokens.rotate(token)
        return raised.exception.code

    async def family_of(self, token):
        rows = await sql("SELECT f.id, f.revoked_why FROM refresh_tokens t JOIN refresh_families f"
                         " ON f.id = t.family_id WHERE t.token_hash = %s", (token_hash(token),))
        return rows[0] if rows else None

    async def test_rotation_reuse_expiry_revoke(self):
        """Rotation, reuse revoking the family, expiry and revoke, as the memory store does them."""
        first = await self.tokens.start(self.user_id)
        [(stored,)] = await sql("SELECT COUNT(*) FROM refresh_tokens WHERE token_hash = %s", (token_hash(first.token),))
        self.assertEqual(stored, 1)
        user_id, second = await self.tokens.rotate(first.token)
        self.assertEqual(user_id, self.user_id)
        self.assertEqual(await self.refused(first.token), ErrorCode.REFRESH_REFUSED)
        family, why = await self.family_of(second.token)
        self.assertEqual(why, "reuse")
        self.assertEqual(await self.refused(second.token), ErrorCode.REFRESH_REFUSED)

        expiring = await self.tokens.start(self.user_id)
        self.clock.advance(TTL)
        self.assertEqual(await self.refused(expiring.token), ErrorCode.REFRESH_REFUSED)
        self.assertIsNone((await self.family_of(expiring.token))[1])

        logged_out = await self.tokens.start(self.user_id)
        await self.tokens.revoke(logged_out.token)
        self.assertEqual((await self.family_of(logged_out.token))[1], "revoke")
        self.assertEqual(await self.refused(logged_out.token), ErrorCode.REFRESH_REFUSED)
        self.assertEqual(await self.refused("A" * 43), ErrorCode.REFRESH_REFUSED)
        self.flushLoggedErrors()

    async def test_prune_deletes_expired_families_with_their_tokens(self):
        """Pruning deletes the families whose newest token expired, with every token of theirs, and no other."""
        old = await self.tokens.start(self.user_id)
        _, old_next = await self.tokens.rotate(old.token)
        self.clock.advance(TTL - 1)
        alive = await self.tokens.start(self.user_id)
        self.clock.advance(1)
        # Other tests' families in the test database expire too: prune until none is left.
        while await MysqlRefreshTokenStore(self.database).prune(int(self.clock.seconds()), 1000) == 1000:
            pass
        self.assertIsNone(await self.family_of(old.token))
        self.assertIsNone(await self.family_of(old_next.token))
        self.assertIsNotNone(await self.family_of(alive.token))
        await self.tokens.rotate(alive.token)

    async def test_a_deleted_user_cannot_refresh(self):
        """Deleting an account deletes its refresh tokens with it: they are refused."""
        issued = await self.tokens.start(self.user_id)
        await sql("DELETE FROM users WHERE id = %s", (self.user_id,))
        self.assertEqual(await self.refused(issued.token), ErrorCode.REFRESH_REFUSED)

    async def test_100_refreshes_of_one_token_at_once(self):
        """
        100 refreshes of one token at once: exactly one is served; the others
        find it spent, which revokes the family, so the winner's new token is
        refused too.
        """
        # Every connection of the pool open first, so the refreshes run at once rather than one
        # while the pool is still connecting the others.
        [issued, *_] = await defer.gatherResults([
            defer.ensureDeferred(self.tokens.start(self.user_id)) for _ in range(self.settings.mysql.pool_max * 4)])
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.tokens.rotate(issued.token)) for _ in range(100)], consumeErrors=True)
        served = [value for ok, value in results if ok]
        refused = [value.value.code for ok, value in results if not ok]
        self.assertEqual(len(served), 1, refused[:3])
        self.assertEqual(refused, [ErrorCode.REFRESH_REFUSED] * 99)
        [(_, winner)] = served
        self.assertEqual(await self.refused(winner.token), ErrorCode.REFRESH_REFUSED)
        self.assertEqual((await self.family_of(winner.token))[1], "reuse")
        [(tokens,)] = await sql("SELECT COUNT(*) FROM refresh_tokens WHERE family_id = %s",
                                ((await self.family_of(winner.token))[0],))
        self.assertEqual(tokens, 2, "the token and the one successor")
        self.flushLoggedErrors()


class SessionServerRefreshTests(TestCase):
    """The session server over TCP with the client library: login, refresh, enter world, logout."""

    timeout = 60

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        private_key, public_key = new_key_pair(self)
        self.server = RunningServer(session_tap, "session", [
            "--mysql-database", TEST_DATABASE,
            "--accounts-scrypt-n", "1024",
            "--sync-prefix", f"test{random.getrandbits(48):x}",
            "--tokens-private-key", private_key,
            "--tokens-public-key", public_key,
            "--session-game-servers", "127.0.0.1:9999",
            "--session-rate-limits", "off",
        ]).start(self)
        self.session = await self.connect()

    async def connect(self):
        session = await SessionClient.connect(reactor, "127.0.0.1", self.server.port)
        self.addCleanup(session.close)
        return session

    async def test_resume_without_the_password(self):
        """
        A client that slept past its access token refreshes on a new
        connection (no password) and enters the world with the new token;
        its old refresh token is then refused, and logout revokes the new one.
        """
        name = f"p_{random.getrandbits(40):x}"
        await self.session.register(name, "correct horse")
        login = await self.session.login(name, "correct horse")
        self.assertRegex(login.refresh_token, r"^[A-Za-z0-9_-]{43}$")
        self.assertGreater(login.refresh_expires_at, login.expires_at)
        self.session.close()

        later = await self.connect()
        refreshed = await later.refresh(login.refresh_token)
        self.assertEqual(refreshed.user_id, login.user_id)
        self.assertNotEqual((refreshed.token, refreshed.refresh_token), (login.token, login.refresh_token))
        world = await later.enter_world(refreshed.token)
        self.assertEqual((world.user_id, world.host, world.port), (login.user_id, "127.0.0.1", 9999))

        await later.revoke(refreshed.refresh_token)
        for token in (refreshed.refresh_token, login.refresh_token):
            with self.assertRaises(RemoteError) as raised:
                await later.refresh(token)
            self.assertEqual(raised.exception.code, ErrorCode.REFRESH_REFUSED)
        await later.revoke("not a token")  # answered the same: revoke tells nothing

    async def test_100_refreshes_of_one_token_in_one_write(self):
        """
        100 refresh requests with one token, pipelined in one write: one is
        answered logged_in, 99 refresh_refused, and the token it got is
        refused too (the family was revoked by the second).
        """
        name = f"p_{random.getrandbits(40):x}"
        await self.session.register(name, "correct horse")
        login = await self.session.login(name, "correct horse")
        raw = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), RawClient())
        self.addCleanup(raw.close)
        answers = await defer.gatherResults(raw.pipeline(
            [(packets.REFRESH, request_id, {"refresh_token": login.refresh_token}) for request_id in range(1, 101)]))
        served = [frame.body for frame in answers if frame.message is packets.LOGGED_IN]
        refused = [frame.body["code"] for frame in answers if frame.message is packets.ERROR]
        self.assertEqual((len(served), refused), (1, [ErrorCode.REFRESH_REFUSED] * 99))
        with self.assertRaises(RemoteError) as raised:
            await self.session.refresh(served[0]["refresh_token"])
        self.assertEqual(raised.exception.code, ErrorCode.REFRESH_REFUSED)
