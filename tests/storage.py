"""
The test database: C{dreamraid_test} on the stack's MariaDB, migrated once
per run, with user ids starting at a random high offset so the tests' live
keys never meet a development server's.  Each test gets its own sync and
ranking key prefixes, so leftover jobs or scores of one test never reach
another.
"""

import os
import random

import pymysql
from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from dreamraid.services.database import Database, connect
from dreamraid.services.livestore import LiveStore
from dreamraid.services.loading import MysqlProfileStore, World
from dreamraid.services.matchmaking import GameServers
from dreamraid.services.migrations import load_migrations, thd_migrate
from dreamraid.services.sync import SyncQueue
from dreamraid.services.tokens import TokenIssuer, TokenVerifier, create_key_pair
from tests import cluster
from tests.support import make_settings, require_stack

# DREAMRAID_TEST_DATABASE names another one: a branch whose schema is ahead of
# the others' can run its tests without migrating the database they share.
TEST_DATABASE = os.environ.get("DREAMRAID_TEST_DATABASE", "dreamraid_test")
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


def new_key_pair(testcase):
    """Paths of a fresh token key pair in the test's temporary directory: C{(private, public)}."""
    keys = os.path.abspath(testcase.mktemp())
    private, public = f"{keys}/token.pem", f"{keys}/token.pub"
    create_key_pair(private, public)
    return private, public


def test_settings(**overrides):
    """The shipped settings on the test database, with fast password hashing and unique sync and ranking prefixes."""
    defaults = {
        "mysql_database": TEST_DATABASE,
        "accounts_scrypt_n": "1024",
        "sync_prefix": f"test{random.getrandbits(48):x}",
        "sync_ranking_prefix": f"testranking{random.getrandbits(48):x}",
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


class SessionServicesCase(TestCase):
    """
    The session server's services over the real stores, on the test database,
    with a key pair and a sync prefix of the test's own.
    """

    timeout = 120

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        self.private_key, self.public_key = new_key_pair(self)
        self.settings = test_settings(tokens_private_key=self.private_key, tokens_public_key=self.public_key)
        self.database = Database(self.settings.mysql)
        self.database.startService()
        self.addCleanup(self.database.stopService)
        self.router = await cluster.router_for(self)
        self.live = LiveStore(self.router)
        self.queue = SyncQueue(self.router, reactor, self.settings.sync.shards, self.settings.sync.prefix)
        self.issuer = TokenIssuer(self.settings.tokens, reactor, random.Random())
        game_servers = GameServers(self.router, reactor, f"testmm{random.getrandbits(40):x}",
                                   self.settings.session.game_servers)
        self.world = World(TokenVerifier(self.settings.tokens, reactor), self.live, MysqlProfileStore(self.database),
                           self.queue, game_servers, random.Random(3), 900)

    async def new_user(self, level=1, exp=0, best=0, items=None):
        """A user written straight into MySQL; its id."""
        name = f"u{random.getrandbits(60):x}"[:20]
        await sql("INSERT INTO users (name, password_hash, level, exp) VALUES (%s, 'x', %s, %s)", (name, level, exp))
        [(user_id,)] = await sql("SELECT id FROM users WHERE name = %s", (name,))
        for (tab, slot), item in (items or {}).items():
            await sql("INSERT INTO inventory VALUES (%s, %s, %s, %s, %s, %s)",
                      (user_id, tab, slot, item.code, item.enhancement, item.count))
        if best:
            await sql("INSERT INTO best_scores (user_id, score) VALUES (%s, %s)", (user_id, best))
        return user_id
