"""
The MariaDB pool: a call whose pooled connection died before it (MariaDB
restarted) runs once more on a fresh connection, and no call is run again
once it may have done something (a timeout, an error of its statement, a
second lost connection).  Unit tests on fake connections; one test restarts
the stack's MariaDB (scripts/stack.sh mysql-stop, mysql-start), so it runs
only under the stack lock.
"""

import random

import pymysql
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dreamraid import session_tap
from dreamraid.protocols import packets
from dreamraid.services.database import MYSQL_UNAVAILABLE, Database, _thd_once_more_if_gone, is_lost_connection
from tests.storage import TEST_DATABASE, new_key_pair, prepare_test_database, test_settings
from tests.support import RunningServer, log_lines, require_stack, stack


def lost(code=2013):
    return pymysql.err.OperationalError(code, "Lost connection to MySQL server during query")


def timed_out():
    """The error PyMySQL raises when a read times out (the server may be alive, only slow)."""
    try:
        raise TimeoutError("timed out")
    except TimeoutError:
        try:
            raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query (timed out)")
        except pymysql.err.OperationalError as e:
            return e


class FakeConnection:
    """A pooled connection that counts reconnections; C{fail_connect} makes them fail as a down server does."""

    def __init__(self, fail_connect=False):
        self.connects = 0
        self.fail_connect = fail_connect

    def connect(self):
        self.connects += 1
        if self.fail_connect:
            raise pymysql.err.OperationalError(2003, "Can't connect to MySQL server")


def failing(*errors):
    """A thread function that raises C{errors} in turn, then returns its calls; C{.calls} counts them."""
    def thd(connection, argument):
        thd.calls += 1
        if thd.calls <= len(errors):
            raise errors[thd.calls - 1]
        return (argument, thd.calls)
    thd.calls = 0
    return thd


class LostConnectionTests(SynchronousTestCase):

    def test_which_errors_are_a_dead_connection(self):
        """Gone away, lost and already closed are; a timeout, a deadlock, a duplicate and a refused connect are not."""
        self.assertTrue(is_lost_connection(lost(2013)))
        self.assertTrue(is_lost_connection(lost(2006)))
        self.assertTrue(is_lost_connection(pymysql.err.InterfaceError(0, "")))
        self.assertFalse(is_lost_connection(timed_out()))
        self.assertFalse(is_lost_connection(pymysql.err.OperationalError(1213, "Deadlock found")))
        self.assertFalse(is_lost_connection(pymysql.err.IntegrityError(1062, "Duplicate entry")))
        self.assertFalse(is_lost_connection(pymysql.err.OperationalError(2003, "Can't connect")))

    def test_a_dead_connection_is_retried_once_on_a_fresh_one(self):
        """A call that meets a dead connection reconnects and runs once more, returning the second run's result."""
        for error in [lost(2013), lost(2006), pymysql.err.InterfaceError(0, "")]:
            connection, thd = FakeConnection(), failing(error)
            self.assertEqual(_thd_once_more_if_gone(connection, thd, "x"), ("x", 2))
            self.assertEqual(connection.connects, 1)

    def test_only_once(self):
        """A second lost connection is raised, not retried again."""
        connection, thd = FakeConnection(), failing(lost(), lost())
        self.assertRaises(pymysql.err.OperationalError, _thd_once_more_if_gone, connection, thd, "x")
        self.assertEqual((thd.calls, connection.connects), (2, 1))

    def test_not_retried(self):
        """A timeout (the statement may still run) and a statement's own error are raised at once."""
        for error in [timed_out(), pymysql.err.OperationalError(1213, "Deadlock found"),
                      pymysql.err.IntegrityError(1062, "Duplicate entry"), ValueError("a bug")]:
            connection, thd = FakeConnection(), failing(error)
            self.assertRaises(type(error), _thd_once_more_if_gone, connection, thd, "x")
            self.assertEqual((thd.calls, connection.connects), (1, 0), error)

    def test_server_still_down(self):
        """When the fresh connection cannot be opened, that error is raised and the call is not run again."""
        connection, thd = FakeConnection(fail_connect=True), failing(lost())
        with self.assertRaises(pymysql.err.OperationalError) as raised:
            _thd_once_more_if_gone(connection, thd, "x")
        self.assertEqual(raised.exception.args[0], 2003)
        self.assertEqual(thd.calls, 1)


def _thd_count_users(cursor):
    cursor.execute("SELECT COUNT(*) FROM users")
    return cursor.fetchone()[0]


class MariaDBRestartTests(TestCase):
    """The real MariaDB restarted under a session server whose pool holds one connection."""

    timeout = 120

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        self.private_key, self.public_key = new_key_pair(self)

    async def test_first_calls_after_a_restart(self):
        """
        After MariaDB restarts, the first register (a call on a connection)
        is answered REGISTERED, and the first transaction returns its rows,
        though each pool's only connection died with the old server.
        """
        one = ["--mysql-pool-min", "1", "--mysql-pool-max", "1"]
        server = RunningServer(session_tap, "session", [
            "--mysql-database", TEST_DATABASE, "--accounts-scrypt-n", "1024",
            "--sync-prefix", f"test{random.getrandbits(48):x}", "--tokens-private-key", self.private_key,
            "--tokens-public-key", self.public_key, "--session-game-servers", "127.0.0.1:9999", *one]).start(self)
        database = Database(test_settings(mysql_pool_min="1", mysql_pool_max="1").mysql)
        database.startService()
        self.addCleanup(database.stopService)
        client = await server.client(self)
        name = f"r_{random.getrandbits(48):x}"
        await client.request(packets.REGISTER, {"name": f"{name}_1", "password": "correct horse"})
        self.assertGreater(await database.interact(_thd_count_users), 0)
        # The servers' background work (the board loader) may meet the stopped server and log it.
        self.addCleanup(self.flushLoggedErrors, *MYSQL_UNAVAILABLE)
        self.addCleanup(stack, "mysql-start")
        lines = log_lines(self)
        await stack("mysql-stop")
        await stack("mysql-start")
        _, registered = await client.request(packets.REGISTER, {"name": f"{name}_2", "password": "correct horse"})
        self.assertIn("user_id", registered)
        self.assertGreater(await database.interact(_thd_count_users), 0)
        self.assertTrue([line for line in lines if "found dead" in line], "no call met a dead connection")
