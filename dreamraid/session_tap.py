"""C{twistd dreamraid-session}: the options and service tree of the session server."""

import random

from twisted.internet import threads

from dreamraid.config import SESSION_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.protocols.session import SessionFactory
from dreamraid.services.accounts import (
    Accounts, LoginThrottle, MysqlAccountStore, PasswordHasher, RedisAttemptWindows, RegistrationThrottle)
from dreamraid.services.database import Database
from dreamraid.services.health import Health
from dreamraid.services.livestore import LiveStore
from dreamraid.services.loading import MysqlProfileStore, World
from dreamraid.services.matchmaking import GameServers
from dreamraid.services.ranking import BoardLoader, Ranking
from dreamraid.services.refresh import MysqlRefreshTokenStore, RefreshTokenPruner, RefreshTokens
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.servicetree import InOrder
from dreamraid.services.sync import MysqlSnapshotStore, SyncQueue, SyncWorker
from dreamraid.services.tokens import TokenIssuer, TokenKeyError, TokenVerifier

Options = settings_options("session server", SESSION_SECTIONS)


def makeService(options, reactor=None):
    """
    The session server: MySQL pool, Redis Cluster router, accounts and
    refresh tokens (with their pruner), enter world, the sync worker, the
    ranking board's loader, the client TCP endpoint with liveness, and HTTP
    health.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    secure_random = random.SystemRandom()
    top = InOrder()
    database = Database(settings.mysql, reactor)
    database.setServiceParent(top)
    redis = settings.redis
    router = RedisCluster.from_settings(reactor, random.Random(), redis)
    router.setServiceParent(top)

    def run_in_thread(function, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    try:
        issuer = TokenIssuer(settings.tokens, reactor, secure_random)
        verifier = TokenVerifier(settings.tokens, reactor)
    except TokenKeyError as e:
        raise SystemExit(f"dreamraid-session: {e} (dreamraid-admin keys creates the key pair)") from None
    a = settings.accounts
    hasher = PasswordHasher(run_in_thread, secure_random, a.scrypt_n, a.scrypt_r, a.scrypt_p)
    windows = RedisAttemptWindows(router, secure_random)
    registrations = RegistrationThrottle(windows, settings.session.registrations_per_address,
                                         settings.session.registration_window)
    refresh_store = MysqlRefreshTokenStore(database)
    refresh_tokens = RefreshTokens(refresh_store, reactor, secure_random, settings.tokens.refresh_ttl)
    RefreshTokenPruner(refresh_store, reactor).setServiceParent(top)
    accounts = Accounts(MysqlAccountStore(database), hasher, LoginThrottle(windows, a), registrations, issuer,
                        refresh_tokens)
    live = LiveStore(router)
    queue = SyncQueue(router, reactor, settings.sync.shards, settings.sync.prefix)
    game_servers = GameServers(router, reactor, settings.raids.matchmaking_prefix, settings.session.game_servers)
    world = World(verifier, live, MysqlProfileStore(database), queue, game_servers, secure_random,
                  settings.sync.session_ttl)
    sync = SyncWorker(router, queue, live, MysqlSnapshotStore(database), reactor, settings.sync)
    sync.setServiceParent(top)
    BoardLoader(Ranking(router, settings.sync.ranking_prefix), database, reactor, settings.session.board_check_interval).setServiceParent(top)

    health = Health(reactor, {
        "redis": (router.check, redis.connect_timeout + 2 * redis.command_timeout),
        "mysql": (database.ping, settings.mysql.connect_timeout * 2),
    })
    factory = add_frontends(top, reactor, "dreamraid-session", settings.session, health, SessionFactory, accounts,
                            world)
    if factory.metrics is not None:
        factory.metrics.watch_router(router)
        factory.metrics.watch("dreamraid_sync", "The sync worker's batches, users written, jobs acknowledged...",
                              "counter", lambda: dict(sync.counters), "kind")
        database.latency = factory.metrics.histogram("dreamraid_mysql_query_seconds",
                                                     "Seconds a MySQL call took, queueing for a connection included")
        jobs = factory.metrics.gauge("dreamraid_sync_backlog", "Sync jobs not yet acknowledged (every shard)")
        oldest = factory.metrics.gauge("dreamraid_sync_oldest_job_seconds",
                                       "Age of the oldest sync job not yet acknowledged, 0 with none")

        async def sync_backlog():
            count, age = await queue.backlog()
            jobs.set(count)
            oldest.set(age)
        factory.metrics.every(sync_backlog)
    return top
