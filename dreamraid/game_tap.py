"""C{twistd dreamraid-game}: the options and service tree of a game server."""

from twisted.application.service import MultiService

from dreamraid.config import GAME_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.services.health import Health, RedisClusterProbe

Options = settings_options("game server", GAME_SECTIONS)


def makeService(options, reactor=None):
    """A game server: client TCP endpoint, liveness, and HTTP health."""
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    top = MultiService()
    redis = settings.redis
    health = Health(
        reactor, {"redis": (RedisClusterProbe(redis), redis.connect_timeout + redis.command_timeout)}
    )
    add_frontends(top, reactor, "dreamraid-game", settings.game, health)
    return top
