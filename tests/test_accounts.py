"""
The accounts service without a stack: logins and registrations are counted
before their passwords are checked or hashed.  Attempt windows are kept in
memory (a fake checked against L{IAttemptWindows}, on a task.Clock); the
hasher holds each check open until the test ends it, so a hundred attempts
are in flight at once, as on a busy session server.
"""

import random

import pymysql
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.accounts import (
    Accounts, IAccountStore, IAttemptWindows, LoginThrottle, NameTaken, Place, RedisAttemptWindows,
    RegistrationThrottle)
from dreamraid.services.refresh import RefreshTokens
from tests.support import make_settings
from tests.test_refresh import MemoryRefreshTokenStore

SETTINGS = make_settings().accounts  # 5 failures an account a minute, 20 an address in 10 minutes
ADDRESS = "192.0.2.7"


@implementer(IAttemptWindows)
class MemoryAttemptWindows:
    """L{IAttemptWindows} in a dict, on a clock: C{{key: [window id, places taken, closes at]}}."""

    def __init__(self, clock):
        self._clock = clock
        self._windows = {}
        self._opened = 0

    def _open(self, key):
        window = self._windows.get(key)
        if window is not None and self._clock.seconds() >= window[2]:
            del self._windows[key]
            return None
        return window

    def take(self, key, limit, window):
        current = self._open(key)
        if current is None:
            self._opened += 1
            current = self._windows[key] = [self._opened, 0, self._clock.seconds() + window]
        if current[1] >= limit:
            return defer.succeed(None)
        current[1] += 1
        return defer.succeed(Place(key, current[0]))

    def give_back(self, place):
        current = self._open(place.key)
        if current is not None and current[0] == place.window and current[1] > 0:
            current[1] -= 1
        return defer.succeed(None)

    def clear(self, key):
        self._windows.pop(key, None)
        return defer.succeed(None)

    def taken(self, key):
        """Places taken in C{key}'s open window (0 when none is open)."""
        current = self._open(key)
        return 0 if current is None else current[1]


class HeldHasher:
    """A password hasher whose every hash and check waits until the test fires it."""

    def __init__(self):
        self.checks = []  # (password, Deferred) of every verify
        self.hashes = []  # (password, Deferred) of every hash

    def hash(self, password):
        d = defer.Deferred()
        self.hashes.append((password, d))
        return d

    def verify(self, password, stored):
        d = defer.Deferred()
        self.checks.append((password, d))
        return d

    def end_checks(self):
        """Answer every check made so far: true for the password C{"right password"}."""
        checks, self.checks = self.checks, []
        for password, d in checks:
            d.callback(password == "right password")
        return len(checks)


@implementer(IAccountStore)
class MemoryAccountStore:
    """L{IAccountStore} in a dict; C{down} makes every call fail as MySQL does when it is unreachable."""

    def __init__(self):
        self.users = {}
        self.down = False

    def _call(self, result):
        if self.down:
            return defer.fail(pymysql.err.OperationalError(2003, "Can't connect to MySQL server"))
        return defer.succeed(result)

    def create(self, name, password_hash):
        if self.down:
            return self._call(None)
        if name.lower() in self.users:
            return defer.fail(NameTaken(name))
        self.users[name.lower()] = (len(self.users) + 1, password_hash)
        return self._call(len(self.users))

    def find(self, name):
        return self._call(self.users.get(name.lower()))

    def record_login(self, user_id):
        return self._call(None)


class FakeIssuer:
    def issue(self, user_id):
        class Issued:
            token, expires_at = f"token-{user_id}", 600
        return Issued()


class AccountsCase(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.windows = MemoryAttemptWindows(self.clock)
        self.store = MemoryAccountStore()
        self.hasher = HeldHasher()
        self.registrations = RegistrationThrottle(self.windows, 10, 600)
        self.refresh_tokens = RefreshTokens(MemoryRefreshTokenStore(), self.clock, random.Random(1), 86400)
        self.accounts = Accounts(self.store, self.hasher, LoginThrottle(self.windows, SETTINGS), self.registrations,
                                 FakeIssuer(), self.refresh_tokens)
        for name in ["victim", *(f"user{i}" for i in range(30))]:
            self.store.users[name] = (len(self.store.users) + 1, "stored")

    def started(self, coroutines):
        """Deferreds of C{coroutines}; those the test leaves unread are read (refusals dropped) at its end."""
        ds = [defer.ensureDeferred(c) for c in coroutines]
        self.addCleanup(lambda: [d.addErrback(lambda failure: failure.trap(RequestRefused)) for d in ds])
        return ds

    def logins(self, name, password, count, address=ADDRESS):
        return self.started(self.accounts.login(name, password, address) for _ in range(count))

    def refused_with(self, d):
        return self.failureResultOf(d, RequestRefused).value.code


class FakesTests(AccountsCase):

    def test_fakes_provide_their_interfaces(self):
        """The fakes and the Redis windows provide the interfaces the service is written against."""
        self.assertTrue(verifyObject(IAttemptWindows, self.windows))
        self.assertTrue(verifyObject(IAttemptWindows, RedisAttemptWindows(None, None)))
        self.assertTrue(verifyObject(IAccountStore, self.store))


class LoginThrottleTests(AccountsCase):
    """Logins are counted before their passwords are checked."""

    def test_logins_at_once_for_one_account(self):
        """
        100 logins for one account at once: 5 passwords are checked, the 95
        others refused at once without a check; the 5 wrong ones lock the
        account until its window closes.
        """
        logins = self.logins("victim", "a guess", 100)
        self.assertEqual(len(self.hasher.checks), SETTINGS.failures_per_account)
        refused = [d for d in logins if d.called]
        self.assertEqual([self.refused_with(d) for d in refused], [ErrorCode.LOGIN_THROTTLED] * 95)
        self.hasher.end_checks()
        self.assertEqual({self.refused_with(d) for d in logins if d not in refused}, {ErrorCode.WRONG_CREDENTIALS})
        self.assertEqual(self.refused_with(self.logins("victim", "right password", 1)[0]), ErrorCode.LOGIN_THROTTLED)
        self.assertEqual(self.hasher.checks, [])
        self.clock.advance(SETTINGS.account_window)
        self.logins("victim", "right password", 1)
        self.assertEqual(len(self.hasher.checks), 1)

    def test_logins_at_once_over_many_accounts(self):
        """Logins from one address for 30 accounts at once: the address's 20 are checked."""
        logins = [d for i in range(30) for d in self.logins(f"user{i}", "a guess", 2)]
        self.assertEqual(len(self.hasher.checks), SETTINGS.failures_per_address)
        self.assertEqual({self.refused_with(d) for d in logins if d.called}, {ErrorCode.LOGIN_THROTTLED})
        self.hasher.end_checks()
        self.logins("user29", "right password", 1, address="198.51.100.1")
        self.assertEqual(len(self.hasher.checks), 1, "another address is not throttled")

    def test_refused_by_the_account_is_not_counted_by_the_address(self):
        """Logins refused for their account give their address place back: they are not guesses."""
        self.logins("victim", "a guess", 5 + 40)
        self.assertEqual(self.windows.taken(LoginThrottle.address_key(ADDRESS)), 5)
        self.logins("user0", "a guess", 1)
        self.assertEqual(len(self.hasher.checks), 6)

    def test_a_good_password_keeps_no_place(self):
        """A good password gives its address place back and clears its account's count."""
        self.logins("victim", "a guess", 3)
        self.hasher.end_checks()
        logged_in = self.logins("victim", "right password", 1)[0]
        self.hasher.end_checks()
        self.assertEqual(self.successResultOf(logged_in).token, "token-1")
        self.assertEqual(self.windows.taken(LoginThrottle.address_key(ADDRESS)), 3)
        self.assertEqual(self.windows.taken(LoginThrottle.account_key("VICTIM")), 0)

    def test_a_login_starts_a_refresh_token_family(self):
        """A good password also returns a refresh token, good for a refresh, living refresh_ttl."""
        logged_in = self.logins("victim", "right password", 1)[0]
        self.hasher.end_checks()
        logged_in = self.successResultOf(logged_in)
        self.assertRegex(logged_in.refresh_token, r"^[A-Za-z0-9_-]{43}$")
        self.assertEqual(logged_in.refresh_expires_at, int(self.clock.seconds()) + 86400)
        refreshed = self.successResultOf(defer.ensureDeferred(self.accounts.refresh(logged_in.refresh_token)))
        self.assertEqual((refreshed.user_id, refreshed.token), (logged_in.user_id, logged_in.token))

    def test_a_store_down_before_the_check_counts_nothing(self):
        """When MySQL fails before the password is checked, the login is UNAVAILABLE and gives its places back."""
        self.store.down = True
        self.assertEqual(self.refused_with(self.logins("victim", "a guess", 1)[0]), ErrorCode.UNAVAILABLE)
        self.assertEqual(self.windows.taken(LoginThrottle.address_key(ADDRESS)), 0)
        self.assertEqual(self.windows.taken(LoginThrottle.account_key("victim")), 0)
        self.flushLoggedErrors()


class RegistrationThrottleTests(AccountsCase):
    """Registrations are counted per address before their passwords are hashed."""

    def register_at_once(self, names, address=ADDRESS):
        return self.started(self.accounts.register(name, "long enough", address) for name in names)

    def end_hashes(self):
        hashes, self.hasher.hashes = self.hasher.hashes, []
        for password, d in hashes:
            d.callback("hash")

    def test_registrations_at_once(self):
        """100 registrations from one address at once: 10 passwords are hashed and 10 accounts created."""
        registering = self.register_at_once([f"new{i}" for i in range(100)])
        self.assertEqual(len(self.hasher.hashes), 10)
        refused = [d for d in registering if d.called]
        self.assertEqual([self.refused_with(d) for d in refused], [ErrorCode.REGISTER_THROTTLED] * 90)
        self.end_hashes()
        created = [self.successResultOf(d) for d in registering if d not in refused]
        self.assertEqual(len(set(created)), 10)
        self.assertEqual(len([name for name in self.store.users if name.startswith("new")]), 10)
        self.assertEqual(self.refused_with(self.register_at_once(["new100"], address=ADDRESS)[0]),
                         ErrorCode.REGISTER_THROTTLED)
        self.register_at_once(["other"], address="198.51.100.1")
        self.assertEqual(len(self.hasher.hashes), 1, "another address is not throttled")
        self.clock.advance(600)
        self.register_at_once(["new101"])
        self.assertEqual(len(self.hasher.hashes), 2)

    def test_refused_registrations_give_their_place_back(self):
        """A taken name and a store that is down create no account, and give their place back."""
        for _ in range(30):
            [taken] = self.register_at_once(["victim"])
            self.end_hashes()
            self.assertEqual(self.refused_with(taken), ErrorCode.NAME_TAKEN)
        self.store.down = True
        down = self.register_at_once(["newcomer"])
        self.end_hashes()
        self.assertEqual(self.refused_with(down[0]), ErrorCode.UNAVAILABLE)
        self.assertEqual(self.windows.taken(RegistrationThrottle.address_key(ADDRESS)), 0)
        self.flushLoggedErrors()

    def test_no_cap(self):
        """With no cap (0) registration takes no place at all."""
        self.accounts = Accounts(self.store, self.hasher, LoginThrottle(self.windows, SETTINGS),
                                 RegistrationThrottle(self.windows, 0, 600), FakeIssuer(), self.refresh_tokens)
        self.register_at_once([f"new{i}" for i in range(50)])
        self.assertEqual(len(self.hasher.hashes), 50)
        self.assertEqual(self.windows.taken(RegistrationThrottle.address_key(ADDRESS)), 0)
