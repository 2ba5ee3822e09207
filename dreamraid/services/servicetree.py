"""The root of a server's service tree."""

from twisted.application.service import MultiService, Service
from twisted.internet import defer


class InOrder(MultiService):
    """
    Stops its services one after another, the last added first, each once
    the one before has finished stopping.  Twisted's MultiService stops them
    all at once, so the Redis router (added first) would refuse the calls
    that the services stopping after it still make: letting players go,
    paying a raid that just ended.
    """

    def stopService(self):
        Service.stopService(self)
        return defer.ensureDeferred(self._stop_in_turn())

    async def _stop_in_turn(self):
        for service in reversed(list(self)):
            await defer.maybeDeferred(service.stopService)
