"""C{twistd dreamraid-game}: the options and service tree of a game server."""

import random

from twisted.application.service import MultiService

from dreamraid.config import GAME_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.services.health import Health
from dreamraid.services.rediscluster import RedisCluster

Options = settings_options("game server", GAME_SECTIONS)


def makeService(options, reactor=None):
    """A game server: Redis Cluster router, client TCP endpoint, liveness, and HTTP health."""
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    top = MultiService()
    redis = settings.redis
    router = RedisCluster.from_settings(reactor, random.Random(), redis)
    router.setServiceParent(top)
    health = Health(
        reactor, {"redis": (router.check, redis.connect_timeout + 2 * redis.command_timeout)}
    )
    add_frontends(top, reactor, "dreamraid-game", settings.game, health)
    return top
