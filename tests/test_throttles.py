"""
Logins and registrations raced against real session servers (on the test
stack): however many arrive at once, over many connections or pipelined in
one write, no more passwords are checked than the login throttle allows per
account and per address, and no more accounts are created from one address
than the registration throttle allows, counted across session server
processes.  The servers here have no per-connection limits, so every attempt
reaches the accounts service.
"""

import collections
import random

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from dreamraid import session_tap
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.services.accounts import LoginThrottle, RegistrationThrottle
from dreamraid.services.deferreds import gather
from tests import cluster
from tests.storage import TEST_DATABASE, new_key_pair, prepare_test_database, sql
from tests.support import RunningServer, make_settings, require_stack

PASSWORD = "correct horse"
ACCOUNTS = make_settings().accounts


class Pipelined(FrameReceiver):
    """A client that writes many request frames at once and keeps each reply by its request id; it answers pings."""

    def __init__(self):
        self._waiting = {}
        self._next_id = 1

    def frames(self, message, bodies):
        """The frames of C{message} with each of C{bodies}, and a Deferred of each one's reply."""
        frames, replies = [], []
        for body in bodies:
            request_id, self._next_id = self._next_id, self._next_id + 1
            frames.append(message.encode(request_id, body))
            replies.append(self._waiting.setdefault(request_id, defer.Deferred()).addTimeout(60, reactor))
        return b"".join(frames), replies

    def frameReceived(self, frame):
        if frame.request_id == 0 and frame.message is packets.PING:
            self.transport.write(packets.PONG.encode(0, frame.body))
        elif frame.request_id in self._waiting:
            self._waiting.pop(frame.request_id).callback(frame)

    def codecErrorReceived(self, error):
        raise AssertionError(f"the server sent a frame that does not decode: {error}")

    def connectionLost(self, reason):
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(reason)


def outcome(frame):
    """A reply's message name, or the name of its error code."""
    return ErrorCode(frame.body["code"]).name if frame.message is packets.ERROR else frame.message.name


class RaceCase(TestCase):
    """Session servers with no per-connection limits, on the test database; every count of 127.0.0.1 starts empty."""

    timeout = 120

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        self.private_key, self.public_key = new_key_pair(self)
        self.sync_prefix = f"test{random.getrandbits(48):x}"
        self.router = await cluster.router_for(self)
        await self.clear_counts()
        self.addCleanup(self.clear_counts)

    def clear_counts(self):
        return gather([self.router.execute("DEL", key) for key in (LoginThrottle.address_key("127.0.0.1"),
                                                                   RegistrationThrottle.address_key("127.0.0.1"))])

    def session_server(self, *extra):
        return RunningServer(session_tap, "session", [
            "--mysql-database", TEST_DATABASE, "--accounts-scrypt-n", "1024", "--sync-prefix", self.sync_prefix,
            "--tokens-private-key", self.private_key, "--tokens-public-key", self.public_key,
            "--session-game-servers", "127.0.0.1:9999",
            "--session-rate-limits", "off", "--session-frame-rate", "off", "--session-connections-per-address", "0",
            *extra]).start(self)

    async def connections(self, server, count):
        """C{count} L{Pipelined} clients connected to C{server}, closed after the test."""
        clients = await gather([connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), Pipelined())
                                for _ in range(count)])
        for client in clients:
            self.addCleanup(client.transport.loseConnection)
        return clients

    async def at_once(self, message, bodies_by_client):
        """
        Each client's requests written in one write, all clients' in one
        turn of the reactor: a L{collections.Counter} of the outcomes.
        """
        writes, replies = [], []
        for client, bodies in bodies_by_client:
            data, answered = client.frames(message, bodies)
            writes.append((client, data))
            replies.extend(answered)
        for client, data in writes:
            client.transport.write(data)
        return collections.Counter(outcome(frame) for frame in await gather(replies))

    async def register(self, server, names):
        """Register C{names} one after another (on one connection)."""
        [client] = await self.connections(server, 1)
        for name in names:
            self.assertEqual(await self.at_once(packets.REGISTER, [(client, [{"name": name, "password": PASSWORD}])]),
                             {"registered": 1})

    def new_name(self):
        return f"t_{random.getrandbits(48):x}"


class LoginRaceTests(RaceCase):
    """Wrong passwords sent at once: at most the limit are checked (the rest are LOGIN_THROTTLED)."""

    async def setUp(self):
        await super().setUp()
        self.server = self.session_server("--session-registrations-per-address", "0")

    async def test_one_account_from_many_connections(self):
        """100 connections each send a wrong password for one account at once: at most 5 are checked."""
        name = self.new_name()
        await self.register(self.server, [name])
        clients = await self.connections(self.server, 100)
        told = await self.at_once(packets.LOGIN, [(c, [{"name": name, "password": "wrong-guess"}]) for c in clients])
        self.assertEqual(set(told), {"WRONG_CREDENTIALS", "LOGIN_THROTTLED"}, told)
        self.assertLessEqual(told["WRONG_CREDENTIALS"], ACCOUNTS.failures_per_account, told)
        [client] = await self.connections(self.server, 1)
        self.assertEqual(await self.at_once(packets.LOGIN, [(client, [{"name": name, "password": PASSWORD}])]),
                         {"LOGIN_THROTTLED": 1})

    async def test_one_account_pipelined_in_one_write(self):
        """100 wrong passwords for one account in one write on one connection: at most 5 are checked."""
        name = self.new_name()
        await self.register(self.server, [name])
        [client] = await self.connections(self.server, 1)
        told = await self.at_once(packets.LOGIN, [(client, [{"name": name, "password": f"wrong-{i:04}"}
                                                            for i in range(100)])])
        self.assertEqual(sum(told.values()), 100)
        self.assertLessEqual(100 - told["LOGIN_THROTTLED"], ACCOUNTS.failures_per_account, told)

    async def test_many_accounts_from_one_address(self):
        """
        25 accounts, 4 wrong passwords each (under the account limit), over
        50 connections of two pipelined guesses, at once: at most the
        address's 20 are checked.
        """
        names = [self.new_name() for _ in range(25)]
        await self.register(self.server, names)
        guesses = [{"name": name, "password": f"wrong-{i}"} for name in names for i in range(4)]
        clients = await self.connections(self.server, 50)
        told = await self.at_once(packets.LOGIN, [(c, guesses[2 * i:2 * i + 2]) for i, c in enumerate(clients)])
        self.assertEqual(set(told), {"WRONG_CREDENTIALS", "LOGIN_THROTTLED"}, told)
        self.assertLessEqual(told["WRONG_CREDENTIALS"], ACCOUNTS.failures_per_address, told)

    async def test_good_passwords_keep_no_place(self):
        """
        Good logins are not failures: 100 at once are each logged in or
        throttled, and then more good logins one after another than the
        address's limit leave a wrong guess still checked.
        """
        name = self.new_name()
        await self.register(self.server, [name])
        clients = await self.connections(self.server, 100)
        told = await self.at_once(packets.LOGIN, [(c, [{"name": name, "password": PASSWORD}]) for c in clients])
        self.assertEqual(told["logged_in"] + told["LOGIN_THROTTLED"], 100, told)
        self.assertGreaterEqual(told["logged_in"], 1, told)
        for _ in range(ACCOUNTS.failures_per_address + 1):
            self.assertEqual(await self.at_once(packets.LOGIN, [(clients[0], [{"name": name, "password": PASSWORD}])]),
                             {"logged_in": 1})
        self.assertEqual(await self.at_once(packets.LOGIN, [(clients[1], [{"name": name, "password": "wrong-guess"}])]),
                         {"WRONG_CREDENTIALS": 1})


class RegistrationRaceTests(RaceCase):
    """Registrations from one address, at once and over two session servers, create at most the limit."""

    async def test_at_once_over_two_servers(self):
        """
        100 registrations from 127.0.0.1, over 50 connections of two
        pipelined each, split over two session servers, at once: 10 accounts
        are created (the limit of this test), the rest REGISTER_THROTTLED.
        """
        limit = ["--session-registrations-per-address", "10"]
        servers = [self.session_server(*limit), self.session_server(*limit)]
        clients = [*await self.connections(servers[0], 25), *await self.connections(servers[1], 25)]
        stem = self.new_name()
        bodies = [{"name": f"{stem}_{i}", "password": PASSWORD} for i in range(100)]
        told = await self.at_once(packets.REGISTER, [(c, bodies[2 * i:2 * i + 2]) for i, c in enumerate(clients)])
        self.assertEqual(told, {"registered": 10, "REGISTER_THROTTLED": 90})
        self.assertEqual(await sql("SELECT COUNT(*) FROM users WHERE name LIKE %s", (f"{stem}\\_%",)), ((10,),))
        window = await self.router.execute("PTTL", RegistrationThrottle.address_key("127.0.0.1"))
        self.assertTrue(0 < window <= 600_000, window)

    async def test_refused_registrations_do_not_count(self):
        """
        A taken name refused twenty times, one after another, costs no
        place: the address can still create its limit of accounts.  (While
        a registration is under way it holds its place.)
        """
        server = self.session_server("--session-registrations-per-address", "3")
        taken = self.new_name()
        await self.register(server, [taken])
        [client] = await self.connections(server, 1)
        for _ in range(20):
            self.assertEqual(await self.at_once(packets.REGISTER, [(client, [{"name": taken, "password": PASSWORD}])]),
                             {"NAME_TAKEN": 1})
        await self.register(server, [self.new_name(), self.new_name()])
        self.assertEqual(await self.at_once(packets.REGISTER, [(client, [{"name": self.new_name(),
                                                                           "password": PASSWORD}])]),
                         {"REGISTER_THROTTLED": 1})
