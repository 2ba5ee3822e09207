"""
The test database: C{dreamraid_test} on the stack's MariaDB, migrated once
per run, with user ids starting at a random high offset so the tests' live
keys never meet a development server's.  Each test gets its own sync key
prefix, so leftover jobs of one test never reach another.
"""

import random

import pymysql
from twisted.internet import reactor, threads

from dreamraid.admin import connect
from dreamraid.services.migrations import load_migrations, thd_migrate
from tests.support import make_settings

TEST_DATABASE = "dreamraid_test"
_prepared = []


def _thd_prepare():
    mysql = make_settings().mysql
    with pymysql.connect(host=mysql.host, port=mysql.port, user=mysql.user, password=mysql.password,
                         connect_timeout=mysql.connect_timeout) as server:
        with server.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {TEST_DATABASE} "
                           "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    with connect(mysql, TEST_DATABASE) as connection:
        thd_migrate(connection, load_migrations())
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE users AUTO_INCREMENT = %s", (random.randrange(10**9, 10**12),))
        connection.commit()


async def prepare_test_database():
    """Create and migrate the test database (once per run)."""
    if not _prepared:
        await threads.deferToThreadPool(reactor, reactor.getThreadPool(), _thd_prepare)
        _prepared.append(True)


def test_settings(**overrides):
    """The shipped settings on the test database, with fast password hashing and a unique sync prefix."""
    defaults = {
        "mysql_database": TEST_DATABASE,
        "accounts_scrypt_n": "1024",
        "sync_prefix": f"test{random.getrandbits(48):x}",
    }
    return make_settings(**{**defaults, **overrides})


def sql(query, args=None):
    """A Deferred of the rows of one query on the test database (committed)."""
    def thd():
        with connect(make_settings().mysql, TEST_DATABASE) as connection:
            with connection.cursor() as cursor:
                cursor.execute(query, args)
                rows = cursor.fetchall()
            connection.commit()
            return rows
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd)
