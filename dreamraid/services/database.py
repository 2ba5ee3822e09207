"""
MySQL/MariaDB access for the session server: an adbapi connection pool (a
Service) whose work runs as named thread functions, so PyMySQL never blocks
the reactor.  Only the session server talks to MySQL.
"""

import pymysql
from twisted.application.service import Service
from twisted.enterprise import adbapi

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
        """C{function(connection, *args)} in a pool thread; a Deferred of its result, timed into C{latency}."""
        return self._timed(self.pool.runWithConnection(function, *args))

    def interact(self, function, *args):
        """C{function(cursor, *args)} in one transaction in a pool thread; timed like L{run}."""
        return self._timed(self.pool.runInteraction(function, *args))

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
