"""
Accounts: registration, login with throttling, and the password hashes.

Passwords are kept only as salted scrypt hashes, computed in a thread so the
reactor never waits on them.  Failed logins are counted in Redis per account
and per address (shared by every session server) in fixed windows; past a
limit, login is refused before the password is even checked.
"""

import base64
import hashlib
import hmac
import re
from typing import NamedTuple

from twisted.logger import Logger
from zope.interface import Interface, implementer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.database import MYSQL_UNAVAILABLE, MySQLError, is_duplicate_entry
from dreamraid.services.deferreds import gather
from dreamraid.services.rediscluster import RedisClusterError, Script

NAME = re.compile(r"[A-Za-z0-9_]{3,20}")
PASSWORD_LENGTH = (8, 128)
_SCRYPT_MAXMEM = 256 * 1024 * 1024


class PasswordHasher:
    """scrypt with a random salt per password; C{run_in_thread(f, *args)} returns a Deferred of C{f(*args)}."""

    def __init__(self, run_in_thread, random, n, r, p):
        self._run_in_thread = run_in_thread
        self._random = random
        self._n, self._r, self._p = n, r, p

    def hash(self, password):
        """A Deferred of the text to store for C{password}."""
        salt = self._random.randbytes(16)
        return self._run_in_thread(_scrypt_hash, password, salt, self._n, self._r, self._p)

    def verify(self, password, stored):
        """A Deferred of whether C{password} matches the stored hash."""
        return self._run_in_thread(_scrypt_verify, password, stored)


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _scrypt_hash(password, salt, n, r, p):
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _scrypt_verify(password, stored):
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except ValueError:
        return False
    return kind == "scrypt" and hmac.compare_digest(actual, expected)


# KEYS: counter.  ARGV: window in ms.  Counts one failure in the window that
# began with the first one; the count so far.
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class LoginThrottle:
    """Failed logins per account and per address, in Redis windows."""

    def __init__(self, router, settings):
        self._router = router
        self._settings = settings
        self._count = Script(router, _COUNT_FAILURE)

    @staticmethod
    def account_key(name):
        return f"throttle:{{login:{name.lower()}}}"

    @staticmethod
    def address_key(address):
        return f"throttle:{{addr:{address}}}"

    async def check(self, name, address):
        """@raise RequestRefused: C{LOGIN_THROTTLED} while either count is at its limit."""
        s = self._settings
        account, by_address = await gather([
            self._router.execute("GET", self.account_key(name)),
            self._router.execute("GET", self.address_key(address)),
        ])
        if int(account or 0) >= s.failures_per_account or int(by_address or 0) >= s.failures_per_address:
            raise RequestRefused(ErrorCode.LOGIN_THROTTLED)

    async def failed(self, name, address):
        """Count one failed login against the account and the address."""
        s = self._settings
        await gather([
            self._count([self.account_key(name)], [int(s.account_window * 1000)]),
            self._count([self.address_key(address)], [int(s.address_window * 1000)]),
        ])

    async def succeeded(self, name):
        """A good password clears the account's count (not the address's)."""
        await self._router.execute("DEL", self.account_key(name))


class LoggedIn(NamedTuple):
    user_id: int
    token: str
    expires_at: int


class IAccountStore(Interface):
    """The durable accounts (MySQL)."""

    def create(name, password_hash):
        """A Deferred of the new user's id; fails with L{NameTaken}."""

    def find(name):
        """A Deferred of C{(user_id, password_hash)}, or C{None}."""

    def record_login(user_id):
        """A Deferred that fires once the login time is stored."""


class NameTaken(Exception):
    """A user with that name (in any letter case) exists."""


def thd_create_user(connection, name, password_hash):
    try:
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s)", (name, password_hash))
            return cursor.lastrowid
    except MySQLError as e:
        if is_duplicate_entry(e):
            raise NameTaken(name) from None
        raise


def thd_find_user(connection, name):
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, password_hash FROM users WHERE name = %s", (name,))
        return cursor.fetchone()


def thd_record_login(connection, user_id):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE users SET last_login_at = CURRENT_TIMESTAMP(3) WHERE id = %s", (user_id,))


@implementer(IAccountStore)
class MysqlAccountStore:
    """L{IAccountStore} over the adbapi pool of a L{dreamraid.services.database.Database}."""

    def __init__(self, database):
        self._database = database

    def create(self, name, password_hash):
        return self._database.run(thd_create_user, name, password_hash)

    def find(self, name):
        return self._database.run(thd_find_user, name)

    def record_login(self, user_id):
        return self._database.run(thd_record_login, user_id)


class Accounts:
    """Register and log in; a login returns a signed token."""

    _log = Logger()

    def __init__(self, store, hasher, throttle, issuer):
        self._store = store
        self._hasher = hasher
        self._throttle = throttle
        self._issuer = issuer

    async def register(self, name, password):
        """The new user's id.  @raise RequestRefused: bad name or password, name taken, store down."""
        _check_name(name)
        if not PASSWORD_LENGTH[0] <= len(password) <= PASSWORD_LENGTH[1]:
            raise RequestRefused(ErrorCode.INVALID_PASSWORD)
        password_hash = await self._hasher.hash(password)
        try:
            return await self._store.create(name, password_hash)
        except NameTaken:
            raise RequestRefused(ErrorCode.NAME_TAKEN) from None
        except MYSQL_UNAVAILABLE as e:
            raise self._unavailable("register", name, e) from None

    async def login(self, name, password, address):
        """A L{LoggedIn}.  @raise RequestRefused: throttled, wrong name or password, store down."""
        _check_name(name)
        try:
            await self._throttle.check(name, address)
            found = await self._store.find(name)
            if found is None:
                await self._hasher.hash(password)  # as slow as a real check: names cannot be probed by timing
                good = False
            else:
                user_id, stored = found
                good = await self._hasher.verify(password, stored)
            if not good:
                await self._throttle.failed(name, address)
                raise RequestRefused(ErrorCode.WRONG_CREDENTIALS)
            await self._throttle.succeeded(name)
            await self._store.record_login(user_id)
        except (RedisClusterError, *MYSQL_UNAVAILABLE) as e:
            raise self._unavailable("login", name, e) from None
        issued = self._issuer.issue(user_id)
        return LoggedIn(user_id, issued.token, issued.expires_at)

    def _unavailable(self, what, name, error):
        self._log.warn("{what} of {user_name}: store unavailable: {error}", what=what, user_name=name, error=error)
        return RequestRefused(ErrorCode.UNAVAILABLE)


def _check_name(name):
    if not NAME.fullmatch(name):
        raise RequestRefused(ErrorCode.INVALID_NAME)
