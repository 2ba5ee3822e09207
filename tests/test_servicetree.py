"""The service tree's root stops its services one at a time, the last added first."""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.services.servicetree import InOrder


class Slow(Service):
    def __init__(self, name, log):
        self.name, self.log, self.stopping = name, log, defer.Deferred()

    def stopService(self):
        super().stopService()
        self.log.append(self.name)
        return self.stopping


class InOrderTests(SynchronousTestCase):

    def test_each_stops_after_the_one_added_after_it_has_stopped(self):
        log = []
        top = InOrder()
        router, players, host = (Slow(name, log) for name in ("router", "players", "host"))
        for service in (router, players, host):
            service.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(log, ["host"])
        host.stopping.callback(None)
        self.assertEqual(log, ["host", "players"])
        players.stopping.callback(None)
        self.assertEqual(log, ["host", "players", "router"])
        self.assertNoResult(stopped)
        router.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(top.running)
