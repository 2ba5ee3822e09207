"""
The listening side every server has: the client TCP endpoint with its
liveness sweep, and the HTTP endpoint with C{/health}.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from dreamraid.protocols.http import http_root
from dreamraid.protocols.server import ServerFactory
from dreamraid.services.liveness import Liveness


def add_frontends(parent, reactor, server_name, settings, health):
    """
    Add the client and HTTP endpoint services of one server to C{parent}.

    @param settings: the server's L{dreamraid.config.ServerSettings}.
    @return: the client L{ServerFactory}.
    """
    liveness = Liveness(reactor, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
    liveness.setServiceParent(parent)
    factory = ServerFactory(server_name, settings, liveness)
    clients = StreamServerEndpointService(serverFromString(reactor, settings.listen), factory)
    clients.setServiceParent(parent)
    web = Site(http_root(health))
    web.noisy = False
    StreamServerEndpointService(serverFromString(reactor, settings.http_listen), web).setServiceParent(parent)
    return factory
