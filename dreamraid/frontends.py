"""
The listening side every server has: the client TCP endpoint with its
liveness sweep, and the HTTP endpoint with C{/health} and C{/metrics}.
"""

import gc

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from dreamraid.protocols.http import http_root
from dreamraid.protocols.server import ServerFactory
from dreamraid.services.liveness import Liveness
from dreamraid.services.metrics import Metrics


class FrozenHeap(Service):
    """
    Moves everything alive when the server starts (modules, tables, the
    service tree) out of the garbage collector's reach: a full collection
    then walks only what requests made, not the whole program each time.
    """

    def startService(self):
        super().startService()
        gc.freeze()


def add_frontends(parent, reactor, server_name, settings, health, factory_class=ServerFactory, *services):
    """
    Add the client and HTTP endpoint services of one server to C{parent}.

    @param settings: the server's L{dreamraid.config.ServerSettings}.
    @param factory_class: the client factory, built with the server's name,
        settings, liveness and then C{services}.
    @return: the client factory (its C{metrics}, when on, take more watches).
    """
    FrozenHeap().setServiceParent(parent)
    liveness = Liveness(reactor, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
    liveness.setServiceParent(parent)
    factory = factory_class(server_name, settings, liveness, *services)
    if settings.metrics == "on":
        factory.metrics = Metrics(liveness.clock, server_name)  # one clock: a request's start is when liveness heard it
        factory.metrics.setServiceParent(parent)
        factory.metrics.watch("dreamraid_connections", "Client connections open", "gauge", lambda: len(liveness))
        factory.metrics.watch(
            "dreamraid_limited",
            "What the abuse limits did: requests and connections refused, slow readers dropped, frame budgets spent",
            "counter", lambda: factory.limited, "what")
    clients = StreamServerEndpointService(serverFromString(reactor, settings.listen), factory)
    clients.setServiceParent(parent)
    web = Site(http_root(health, factory.metrics))
    web.noisy = False
    StreamServerEndpointService(serverFromString(reactor, settings.http_listen), web).setServiceParent(parent)
    return factory
