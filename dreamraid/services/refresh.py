"""
Refresh tokens: what lets a client get a new access token (a JWT) without
the password, for C{[tokens] refresh_ttl} (30 days).

A login starts a I{family}.  Its refresh token is 256 random bits in URL-safe
base64 (43 characters); MySQL keeps only its SHA-256.  A slow hash (scrypt,
as for passwords) is not needed: it protects guessable secrets from a
dictionary, and 256 random bits cannot be guessed or reversed from a fast
hash; the hash must also be deterministic, since it is the key the token is
found by.

Each refresh spends its token and adds a new one to the family (rotation),
in one transaction that locks the token's row (C{SELECT ... FOR UPDATE}), so
of any number of refreshes of one token at once exactly one is served.  A
spent token presented again means two holders have copies of one token (a
thief and the player), and nothing tells which is which: the whole family
is revoked, the newest token included (the OAuth 2.0 refresh-rotation rule,
RFC 6819 5.2.2.3, OAuth 2.1 4.3.1).  So of many refreshes of one token at
once, one gets a new token, the next finds the token spent and revokes the
family, and the winner's new token is dead too.  A revoke (the client
library's logout) ends the family of the token it names.

Every refusal is the one code C{REFRESH_REFUSED}, as OAuth answers
C{invalid_grant} to all of them: whoever presents the token learns nothing
but to log in with the password.  The log says which it was.

Refresh tokens live in MySQL, not Redis: they must outlive a loss of the
Redis Cluster, and they last a month.  L{RefreshTokenPruner} deletes each
family once its newest token has expired (every hour, a chunk at a time), so
the tables hold the families alive in the last C{refresh_ttl}: spent tokens
stay as long as their family, for reuse detection.
"""

import base64
import hashlib
import re
from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Interface, implementer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.database import MYSQL_UNAVAILABLE
from dreamraid.services.failurelog import FailureLog

TOKEN_BYTES = 32
# What L{RefreshTokens.new_token} makes: 32 bytes in URL-safe base64, unpadded.
TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{43}")

# What a refresh found (L{rotation_outcome}).
ROTATED = "rotated"    # served: the token is spent, its successor stored
UNKNOWN = "unknown"    # no such token (never issued, pruned, or its user deleted)
EXPIRED = "expired"    # unspent, but past its expiry
REVOKED = "revoked"    # its family was revoked already
REUSED = "reused"      # spent already: the family is revoked now


class IssuedRefresh(NamedTuple):
    """A new refresh token and when it expires (Unix seconds of the clock)."""

    token: str
    expires_at: int


class Found(NamedTuple):
    """A stored token as a refresh finds it (its row locked)."""

    family_id: int
    user_id: int
    expires_at: int
    spent: bool
    revoked: bool


class Rotation(NamedTuple):
    """What a store's C{rotate} did: an outcome above, and whose token it was (C{None}s if unknown)."""

    outcome: str
    user_id: int = None
    family_id: int = None


def rotation_outcome(found, now):
    """
    What a refresh of the token C{found} (a L{Found} or C{None}) does at
    C{now}: a revoked family stays revoked; a spent token revokes its
    family, even past its expiry (it is still a copy in other hands); an
    unspent one past its expiry is refused; otherwise it is rotated.  Every
    store decides with this, inside the step that holds the token.
    """
    if found is None:
        return UNKNOWN
    if found.revoked:
        return REVOKED
    if found.spent:
        return REUSED
    if found.expires_at <= now:
        return EXPIRED
    return ROTATED


class IRefreshTokenStore(Interface):
    """The durable refresh tokens (MySQL), by the SHA-256 of their text."""

    def start_family(user_id, token_hash, now, expires_at):
        """A Deferred of the id of a new family holding one token, unspent."""

    def rotate(token_hash, new_hash, now, expires_at):
        """
        A Deferred of the L{Rotation} of the token C{token_hash}, decided by
        L{rotation_outcome} in one atomic step with what it writes: when
        rotated, the token is spent and C{new_hash} joins its family; when
        reused, the family is revoked.
        """

    def revoke(token_hash, now):
        """A Deferred of the id of the family of C{token_hash}, revoked now (if it was not); C{None} if unknown."""

    def prune(now, limit):
        """A Deferred of how many families (at most C{limit}) whose every token expired by C{now} were deleted."""


def thd_start_family(connection, user_id, token_hash, now, expires_at):
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO refresh_families (user_id, created_at, expires_at) VALUES (%s, %s, %s)",
                       (user_id, now, expires_at))
        family_id = cursor.lastrowid
        cursor.execute("INSERT INTO refresh_tokens (token_hash, family_id, expires_at) VALUES (%s, %s, %s)",
                       (token_hash, family_id, expires_at))
        return family_id


def thd_rotate(connection, token_hash, new_hash, now, expires_at):
    """
    One transaction: lock the token's row and its family's (a concurrent
    rotation of the same token waits here, then finds it spent), decide,
    write.  Returns rather than raises on every outcome, so the pool commits
    a reuse's revocation.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.family_id, f.user_id, t.expires_at, t.spent_at IS NOT NULL, f.revoked_at IS NOT NULL"
            " FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id"
            " WHERE t.token_hash = %s FOR UPDATE", (token_hash,))
        row = cursor.fetchone()
        found = None if row is None else Found(int(row[0]), int(row[1]), int(row[2]), bool(row[3]), bool(row[4]))
        outcome = rotation_outcome(found, now)
        if outcome == REUSED:
            cursor.execute("UPDATE refresh_families SET revoked_at = %s, revoked_why = 'reuse' WHERE id = %s",
                           (now, found.family_id))
        elif outcome == ROTATED:
            cursor.execute("UPDATE refresh_tokens SET spent_at = %s WHERE token_hash = %s", (now, token_hash))
            cursor.execute("INSERT INTO refresh_tokens (token_hash, family_id, expires_at) VALUES (%s, %s, %s)",
                           (new_hash, found.family_id, expires_at))
            cursor.execute("UPDATE refresh_families SET expires_at = GREATEST(expires_at, %s) WHERE id = %s",
                           (expires_at, found.family_id))
        if found is None:
            return Rotation(outcome)
        return Rotation(outcome, found.user_id, found.family_id)


def thd_revoke(connection, token_hash, now):
    """Lock the token's row, then its family's (the order L{thd_rotate} takes them in), and revoke the family."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT family_id FROM refresh_tokens WHERE token_hash = %s FOR UPDATE", (token_hash,))
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute("UPDATE refresh_families SET revoked_at = %s, revoked_why = 'revoke'"
                       " WHERE id = %s AND revoked_at IS NULL", (now, row[0]))
        return int(row[0])


def thd_prune(connection, now, limit):
    """Delete up to C{limit} expired families; their tokens go with them (ON DELETE CASCADE)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM refresh_families WHERE expires_at <= %s ORDER BY expires_at LIMIT %s",
                       (now, limit))
        return cursor.rowcount


@implementer(IRefreshTokenStore)
class MysqlRefreshTokenStore:
    """L{IRefreshTokenStore} over a L{dreamraid.services.database.Database}'s pool."""

    def __init__(self, database):
        self._database = database

    def start_family(self, user_id, token_hash, now, expires_at):
        return self._database.run(thd_start_family, user_id, token_hash, now, expires_at)

    def rotate(self, token_hash, new_hash, now, expires_at):
        return self._database.run(thd_rotate, token_hash, new_hash, now, expires_at)

    def revoke(self, token_hash, now):
        return self._database.run(thd_revoke, token_hash, now)

    def prune(self, now, limit):
        return self._database.run(thd_prune, now, limit)


def token_hash(token):
    """What is stored of C{token}: the SHA-256 of its text."""
    return hashlib.sha256(token.encode("ascii")).digest()


class RefreshTokens:
    """Issues, rotates and revokes refresh tokens; times are whole seconds of the injected clock."""

    _log = Logger()

    def __init__(self, store, clock, random, ttl):
        """
        @param store: an L{IRefreshTokenStore}.
        @param random: the source of the tokens' bits (C{random.SystemRandom()} in production).
        @param ttl: seconds each token lives (C{[tokens] refresh_ttl}).
        """
        self._store = store
        self._clock = clock
        self._random = random
        self._ttl = ttl

    def new_token(self):
        """A fresh token's text: 256 random bits, URL-safe base64 without padding."""
        return base64.urlsafe_b64encode(self._random.randbytes(TOKEN_BYTES)).rstrip(b"=").decode("ascii")

    async def start(self, user_id):
        """The L{IssuedRefresh} of a login: the first token of a new family."""
        now = int(self._clock.seconds())
        issued = IssuedRefresh(self.new_token(), now + self._ttl)
        await self._store.start_family(user_id, token_hash(issued.token), now, issued.expires_at)
        return issued

    async def rotate(self, token):
        """
        C{(user_id, IssuedRefresh)}: C{token} spent, its successor issued.

        @raise RequestRefused: C{REFRESH_REFUSED} whatever the reason
            (unknown, expired, revoked, or used already: then its family is
            revoked).  Store errors pass through.
        """
        if not isinstance(token, str) or not TOKEN_TEXT.fullmatch(token):
            raise RequestRefused(ErrorCode.REFRESH_REFUSED)
        now = int(self._clock.seconds())
        issued = IssuedRefresh(self.new_token(), now + self._ttl)
        rotation = await self._store.rotate(token_hash(token), token_hash(issued.token), now, issued.expires_at)
        if rotation.outcome == ROTATED:
            return rotation.user_id, issued
        if rotation.outcome == REUSED:
            self._log.warn("a spent refresh token of user {user_id} was presented again: every refresh token of "
                           "its login (family {family}) is revoked", user_id=rotation.user_id,
                           family=rotation.family_id)
        elif rotation.outcome != UNKNOWN:
            self._log.info("refresh of user {user_id} refused: token {what}", user_id=rotation.user_id,
                           what=rotation.outcome)
        raise RequestRefused(ErrorCode.REFRESH_REFUSED)

    async def revoke(self, token):
        """End the family of C{token} (nothing if it is malformed or unknown)."""
        if not isinstance(token, str) or not TOKEN_TEXT.fullmatch(token):
            return
        await self._store.revoke(token_hash(token), int(self._clock.seconds()))


class RefreshTokenPruner(Service):
    """
    Deletes expired refresh-token families at start and every C{interval}
    seconds, C{chunk} at a time (each chunk one short transaction), until
    none is left.  Every session server runs one; two deleting at once only
    wait on each other's rows.  A failed round is logged and tried again at
    the next.
    """

    _log = Logger()

    def __init__(self, store, clock, interval=3600.0, chunk=1000):
        self._store = store
        self._clock = clock
        self._interval = interval
        self._chunk = chunk
        self._rounds = None
        self._failures = FailureLog(self._log, clock, MYSQL_UNAVAILABLE)
        self.pruning = defer.succeed(None)  # the latest round: it fires when that round is done
        self.last_deleted = 0  # how many families the latest round deleted

    def startService(self):
        super().startService()
        self._rounds = task.LoopingCall(self._round)
        self._rounds.clock = self._clock
        self._rounds.start(self._interval)

    def stopService(self):
        super().stopService()
        if self._rounds.running:
            self._rounds.stop()
        return self.pruning

    def _round(self):
        self.pruning = defer.ensureDeferred(self.prune())
        return self.pruning

    async def prune(self):
        """Delete every expired family; how many.  Failures are logged, not raised."""
        deleted = 0
        try:
            while True:
                count = await self._store.prune(int(self._clock.seconds()), self._chunk)
                deleted += count
                if count < self._chunk:
                    break
        except Exception:
            self._failures.failed("refresh tokens: pruning expired ones failed")
        self.last_deleted = deleted
        return deleted
