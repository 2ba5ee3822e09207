"""
Accounts: registration, login with throttling, and the password hashes.

Passwords are kept only as salted scrypt hashes, computed in a thread so the
reactor never waits on them.  Login attempts are counted in Redis per account
and per address (shared by every session server) in fixed windows, each
counted atomically before its password is checked: past a limit, login is
refused without a check, however many attempts arrive at once.  Accounts
created per address are counted the same way.
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


class Place(NamedTuple):
    """One place taken in a key's window: the key and the window's id."""

    key: str
    window: int


class IAttemptWindows(Interface):
    """
    Attempts counted in fixed windows, shared by every session server: a
    window opens with its first attempt and lasts its length; each attempt
    takes a place in it first, and the places are few.
    """

    def take(key, limit, window):
        """
        A Deferred of a L{Place} in C{key}'s open window (one of C{window}
        seconds opens if none is), or of C{None} when C{limit} places of it
        are taken already: counting and comparing are one atomic step.
        """

    def give_back(place):
        """A Deferred that fires once C{place} is free again; nothing if its window has closed since."""

    def clear(key):
        """A Deferred that fires once C{key}'s window is closed, with every place in it."""


# KEYS: the window (a hash: n places taken, w its id).  ARGV: limit, window in
# ms, the id of a window that opens now.  The window's id, or nil when full.
_TAKE = """
local window = redis.call('HGET', KEYS[1], 'w')
if not window then
  redis.call('HSET', KEYS[1], 'w', ARGV[3], 'n', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[3])
end
if tonumber(redis.call('HGET', KEYS[1], 'n')) >= tonumber(ARGV[1]) then return false end
redis.call('HINCRBY', KEYS[1], 'n', 1)
return tonumber(window)
"""

# KEYS: the window.  ARGV: the id of the window the place was taken in: a
# later window of the same key is left alone.
_GIVE_BACK = """
if redis.call('HGET', KEYS[1], 'w') == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'n')) > 0 then
  redis.call('HINCRBY', KEYS[1], 'n', -1)
end
return 0
"""


@implementer(IAttemptWindows)
class RedisAttemptWindows:
    """L{IAttemptWindows} in the Redis Cluster: one hash a key, changed only by one Lua script a call."""

    def __init__(self, router, random):
        self._router = router
        self._random = random
        self._take = Script(router, _TAKE)
        self._give_back = Script(router, _GIVE_BACK)

    def take(self, key, limit, window):
        window_id = self._random.getrandbits(52)  # exact as a Lua number
        d = self._take([key], [limit, int(window * 1000), window_id])
        return d.addCallback(lambda taken: None if taken is None else Place(key, int(taken)))

    def give_back(self, place):
        return self._give_back([place.key], [place.window])

    def clear(self, key):
        return self._router.execute("DEL", key)


class LoginAttempt(NamedTuple):
    """The places one login attempt holds: its address's, then its account's."""

    address: Place
    account: Place


class LoginThrottle:
    """
    Password checks per account and per address, counted before each check:
    a login takes a place in its address's window, then one in its
    account's, and only then is its password checked.  A wrong password
    keeps both places (a failure); a right one gives the address's back and
    clears the account's window.  However many logins arrive at once, no
    more passwords are checked in a window than either limit.

    The two keys are in different slots of the cluster, so each is counted
    atomically on its own, address first: a flood from one address that
    sprays many accounts is stopped without touching (and briefly holding)
    the accounts' places, and a login refused at its account gives its
    address place back, so it is not counted as a guess.
    """

    def __init__(self, windows, settings):
        self._windows = windows
        self._settings = settings

    @staticmethod
    def account_key(name):
        return f"attempts:{{login:{name.lower()}}}"

    @staticmethod
    def address_key(address):
        return f"attempts:{{addr:{address}}}"

    async def reserve(self, name, address):
        """
        The L{LoginAttempt} whose password may be checked now.
        @raise RequestRefused: C{LOGIN_THROTTLED} when either window is full.
        """
        s = self._settings
        by_address = await self._windows.take(self.address_key(address), s.failures_per_address, s.address_window)
        if by_address is None:
            raise RequestRefused(ErrorCode.LOGIN_THROTTLED)
        try:
            by_account = await self._windows.take(self.account_key(name), s.failures_per_account, s.account_window)
        except BaseException:
            await self._windows.give_back(by_address)
            raise
        if by_account is None:
            await self._windows.give_back(by_address)
            raise RequestRefused(ErrorCode.LOGIN_THROTTLED)
        return LoginAttempt(by_address, by_account)

    async def unchecked(self, attempt):
        """The attempt's password was not checked (a store failed first): both places are given back."""
        await gather([self._windows.give_back(attempt.address), self._windows.give_back(attempt.account)])

    async def succeeded(self, attempt):
        """A good password: the address's place is given back, the account's window cleared."""
        await gather([self._windows.give_back(attempt.address), self._windows.clear(attempt.account.key)])


class RegistrationThrottle:
    """
    Accounts created per address in a window (0: no cap), counted like
    logins: a registration takes a place before its password is hashed,
    and gives it back if no account was created (a taken name, a store
    down), so at most C{limit} accounts are created in a window however
    many registrations arrive at once, on any session server.
    """

    def __init__(self, windows, limit, window):
        self._windows = windows
        self._limit = limit
        self._window = window

    @staticmethod
    def address_key(address):
        return f"attempts:{{register:{address}}}"

    async def reserve(self, address):
        """
        The L{Place} the registration holds (C{None} with no cap).
        @raise RequestRefused: C{REGISTER_THROTTLED} when the window is full.
        """
        if not self._limit:
            return None
        place = await self._windows.take(self.address_key(address), self._limit, self._window)
        if place is None:
            raise RequestRefused(ErrorCode.REGISTER_THROTTLED)
        return place

    async def not_created(self, place):
        """No account was created: its place is given back."""
        if place is not None:
            await self._windows.give_back(place)


class LoggedIn(NamedTuple):
    """A login's or a refresh's answer: the access token and the refresh token, each with its expiry."""

    user_id: int
    token: str
    expires_at: int
    refresh_token: str
    refresh_expires_at: int


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
    """Register and log in; a login returns a signed token and a refresh token, which gets new ones."""

    _log = Logger()

    def __init__(self, store, hasher, throttle, registrations, issuer, refresh_tokens):
        """@param refresh_tokens: the L{dreamraid.services.refresh.RefreshTokens}."""
        self._store = store
        self._hasher = hasher
        self._throttle = throttle
        self._registrations = registrations
        self._issuer = issuer
        self._refresh_tokens = refresh_tokens

    async def register(self, name, password, address):
        """The new user's id.  @raise RequestRefused: bad name or password, throttled, name taken, store down."""
        _check_name(name)
        if not PASSWORD_LENGTH[0] <= len(password) <= PASSWORD_LENGTH[1]:
            raise RequestRefused(ErrorCode.INVALID_PASSWORD)
        try:
            place = await self._registrations.reserve(address)
            try:
                password_hash = await self._hasher.hash(password)
                return await self._store.create(name, password_hash)
            except BaseException:
                await self._registrations.not_created(place)
                raise
        except NameTaken:
            raise RequestRefused(ErrorCode.NAME_TAKEN) from None
        except (RedisClusterError, *MYSQL_UNAVAILABLE) as e:
            raise self._unavailable("register", name, e) from None

    async def login(self, name, password, address):
        """
        A L{LoggedIn}.  The attempt is counted (L{LoginThrottle}) before the
        password is checked.  @raise RequestRefused: throttled, wrong name or
        password, store down.
        """
        _check_name(name)
        try:
            attempt = await self._throttle.reserve(name, address)
            try:
                user_id, good = await self._check(name, password)
            except BaseException:
                await self._throttle.unchecked(attempt)
                raise
            if not good:
                raise RequestRefused(ErrorCode.WRONG_CREDENTIALS)  # the attempt keeps its places
            await self._throttle.succeeded(attempt)
            await self._store.record_login(user_id)
            refresh = await self._refresh_tokens.start(user_id)
        except (RedisClusterError, *MYSQL_UNAVAILABLE) as e:
            raise self._unavailable("login", name, e) from None
        issued = self._issuer.issue(user_id)
        return LoggedIn(user_id, issued.token, issued.expires_at, refresh.token, refresh.expires_at)

    async def refresh(self, refresh_token):
        """
        A L{LoggedIn} with a new token and a new refresh token, for a refresh
        token (which is spent).  @raise RequestRefused: C{REFRESH_REFUSED},
        store down.
        """
        try:
            user_id, refresh = await self._refresh_tokens.rotate(refresh_token)
        except MYSQL_UNAVAILABLE as e:
            raise self._unavailable("refresh", "a refresh token", e) from None
        issued = self._issuer.issue(user_id)
        return LoggedIn(user_id, issued.token, issued.expires_at, refresh.token, refresh.expires_at)

    async def revoke(self, refresh_token):
        """End every refresh token of the login C{refresh_token} belongs to.  @raise RequestRefused: store down."""
        try:
            await self._refresh_tokens.revoke(refresh_token)
        except MYSQL_UNAVAILABLE as e:
            raise self._unavailable("revoke", "a refresh token", e) from None

    async def _check(self, name, password):
        """C{(user_id, whether the password is the user's)}; an unknown name costs a hash too."""
        found = await self._store.find(name)
        if found is None:
            await self._hasher.hash(password)  # as slow as a real check: names cannot be probed by timing
            return None, False
        user_id, stored = found
        return user_id, await self._hasher.verify(password, stored)

    def _unavailable(self, what, name, error):
        self._log.warn("{what} of {user_name}: store unavailable: {error}", what=what, user_name=name, error=error)
        return RequestRefused(ErrorCode.UNAVAILABLE)


def _check_name(name):
    if not NAME.fullmatch(name):
        raise RequestRefused(ErrorCode.INVALID_NAME)
