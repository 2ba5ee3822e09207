"""
MySQL/MariaDB access for the session server: an adbapi connection pool (a
Service) whose work runs as named thread functions, so PyMySQL never blocks
the reactor.  Only the session server talks to MySQL.

Thread functions never commit: the pool commits after them.  So a call whose
pooled connection turns out to be dead (MariaDB restarted since it was last
used) has committed nothing, and the server rolls back whatever it began:
the call runs once more on a fresh connection, in the same thread, instead
of failing.  A timeout is not a dead connection (the statement may still be
running), and a failed commit is not retried.
"""

import pymysql
from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.logger import Logger

# Any error the driver raises.
MySQLError = pymysql.MySQLError
_DUPLICATE_ENTRY = 1062


def is_duplicate_entry(error):
    """Whether C{error} is MySQL refusing a row that repeats a unique key."""
    return isinstance(error, pymysql.err.IntegrityError) and error.args[0] == _DUPLICATE_ENTRY


def connect(mysql, database=None):
    """
    A blocking PyMySQL connection for the settings' MariaDB (to C{database}
    if given), for commands that run outside a reactor.
    """
    return pymysql.connect(
        host=mysql.host, port=mysql.port, user=mysql.user, password=mysql.password,
        database=database or mysql.database, charset="utf8mb4",
        connect_timeout=mysql.connect_timeout, read_timeout=mysql.read_timeout,
        write_timeout=mysql.read_timeout,
    )


# What a call through the pool raises when MySQL is down, the connection
# broke, or a lock wait or deadlock aborted the transaction: worth a retry
# later.  Other errors are bugs and are not retried.
MYSQL_UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError, adbapi.ConnectionLost)


# PyMySQL's codes for a connection found dead: the server has gone away (a
# write failed), and lost connection (a read found it closed).
_CONNECTION_GONE = (2006, 2013)
_log = Logger(namespace="dreamraid.services.database")


def is_lost_connection(error):
    """
    Whether C{error} says the connection was dead (closed by the server, as
    by a restart), rather than that a statement failed or a read timed out.
    """
    if isinstance(error, pymysql.err.InterfaceError):
        return error.args[:1] == (0,)  # PyMySQL's "the connection is closed"
    if isinstance(error, pymysql.err.OperationalError) and error.args[:1] and error.args[0] in _CONNECTION_GONE:
        # A read that timed out raises the same code: the server may only be slow.
        return not isinstance(error.__context__, TimeoutError)
    return False


def _thd_once_more_if_gone(connection, function, *args):
    """
    C{function(connection, *args)}; if it finds the connection dead, once
    more on a fresh one.  Safe because it has not committed (see the module
    docstring); C{connection} is the pool's, which PyMySQL reopens in place.
    """
    try:
        return function(connection, *args)
    except MySQLError as e:
        if not is_lost_connection(e):
            raise
        _log.info("MySQL connection found dead ({error}); running {function} once more on a new one",
                  error=e, function=getattr(function, "__name__", function))
    connection.connect()
    return function(connection, *args)


def _thd_in_cursor(connection, function, *args):
    """C{function(cursor, *args)} on a cursor of C{connection}."""
    with connection.cursor() as cursor:
        return function(cursor, *args)


def _thd_ping(connection):
    """Reconnect if the server went away, then prove it answers a query."""
    connection.ping(reconnect=True)
    cursor = connection.cursor()
    try:
        cursor.execute("SELECT 1")
        cursor.fetchall()
    finally:
        cursor.close()


class Database(Service):
    """The pool, opened when the service starts and closed when it stops."""

    pool = None
    latency = None  # or a histogram to observe each call's seconds on (then a clock is needed)

    def __init__(self, settings, clock=None):
        self._settings = settings
        self._clock = clock

    def startService(self):
        super().startService()
        s = self._settings
        self.pool = adbapi.ConnectionPool(
            "pymysql",
            host=s.host, port=s.port, user=s.user, password=s.password, database=s.database,
            charset="utf8mb4", connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout, write_timeout=s.read_timeout,
            # Row locks only, no gap locks: concurrent syncs of different
            # users never deadlock on neighbouring inventory rows.
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            cp_min=s.pool_min, cp_max=s.pool_max, cp_reconnect=True, cp_noisy=False,
        )

    def stopService(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        return super().stopService()

    def run(self, function, *args):
        """
        C{function(connection, *args)} in one transaction in a pool thread
        (once more if the connection was dead; it must not commit): a
        Deferred of its result, timed into C{latency}.
        """
        return self._timed(self.pool.runWithConnection(_thd_once_more_if_gone, function, *args))

    def interact(self, function, *args):
        """C{function(cursor, *args)} in one transaction in a pool thread, like L{run}."""
        return self.run(_thd_in_cursor, function, *args)

    def _timed(self, d):
        if self.latency is not None:
            started = self._clock.seconds()
            d.addBoth(self._observe, started)
        return d

    def _observe(self, result, started):
        self.latency.observe(self._clock.seconds() - started)
        return result

    def ping(self):
        """A Deferred that fires when MySQL answers, and fails when it does not."""
        return self.run(_thd_ping)
