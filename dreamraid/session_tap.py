"""C{twistd dreamraid-session}: the options and service tree of the session server."""

import random

from twisted.application.service import MultiService

from dreamraid.config import SESSION_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.services.database import Database
from dreamraid.services.health import Health
from dreamraid.services.rediscluster import RedisCluster

Options = settings_options("session server", SESSION_SECTIONS)


def makeService(options, reactor=None):
    """The session server: MySQL pool, Redis Cluster router, client TCP endpoint, liveness, and HTTP health."""
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    top = MultiService()
    database = Database(settings.mysql)
    database.setServiceParent(top)
    redis = settings.redis
    router = RedisCluster.from_settings(reactor, random.Random(), redis)
    router.setServiceParent(top)
    health = Health(reactor, {
        "redis": (router.check, redis.connect_timeout + 2 * redis.command_timeout),
        "mysql": (database.ping, settings.mysql.connect_timeout * 2),
    })
    add_frontends(top, reactor, "dreamraid-session", settings.session, health)
    return top
