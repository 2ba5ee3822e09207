"""
The session server's client protocol: register, login, refresh and revoke
(refresh tokens) and enter world, each
decoded here and handed to the account and world services.  A connection
counts as authenticated once it has logged in or entered the world.
"""

from dreamraid.protocols import packets
from dreamraid.protocols.server import ServerFactory, ServerProtocol, handles


class SessionProtocol(ServerProtocol):
    """One client of the session server."""

    @handles(packets.REGISTER, needs_auth=False)
    async def register(self, body):
        address = self.transport.getPeer().host
        user_id = await self.factory.accounts.register(body["name"], body["password"], address)
        return packets.REGISTERED, {"user_id": user_id}

    @handles(packets.LOGIN, needs_auth=False)
    async def login(self, body):
        address = self.transport.getPeer().host
        logged_in = await self.factory.accounts.login(body["name"], body["password"], address)
        self.factory.liveness.authenticated(self.state)
        return packets.LOGGED_IN, logged_in._asdict()

    @handles(packets.REFRESH, needs_auth=False)
    async def refresh(self, body):
        logged_in = await self.factory.accounts.refresh(body["refresh_token"])
        self.factory.liveness.authenticated(self.state)
        return packets.LOGGED_IN, logged_in._asdict()

    @handles(packets.REVOKE, needs_auth=False)
    async def revoke(self, body):
        await self.factory.accounts.revoke(body["refresh_token"])
        return packets.REVOKED, {}

    @handles(packets.ENTER_WORLD, needs_auth=False)
    async def enter_world(self, body):
        entered = await self.factory.world.enter(body["token"])
        self.factory.liveness.authenticated(self.state)
        return packets.WORLD_ENTERED, entered._asdict()


class SessionFactory(ServerFactory):
    """Builds L{SessionProtocol}s over one session server's services."""

    protocol = SessionProtocol

    def __init__(self, server_name, settings, liveness, accounts, world):
        super().__init__(server_name, settings, liveness)
        self.accounts = accounts
        self.world = world
