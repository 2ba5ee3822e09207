"""C{twistd dreamraid-session}: the options and service tree of the session server."""

from twisted.application.service import MultiService

from dreamraid.config import SESSION_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.services.database import Database
from dreamraid.services.health import Health, RedisClusterProbe

Options = settings_options("session server", SESSION_SECTIONS)


def makeService(options, reactor=None):
    """The session server: MySQL pool, client TCP endpoint, liveness, and HTTP health."""
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    top = MultiService()
    database = Database(settings.mysql)
    database.setServiceParent(top)
    redis = settings.redis
    health = Health(reactor, {
        "redis": (RedisClusterProbe(redis), redis.connect_timeout + redis.command_timeout),
        "mysql": (database.ping, settings.mysql.connect_timeout * 2),
    })
    add_frontends(top, reactor, "dreamraid-session", settings.session, health)
    return top
