"""
A client of the session server: create an account, log in, and enter the
world, which names the game server to play on.

    session = await SessionClient.connect(reactor, "127.0.0.1", 9091)
    login = await session.login("alice", "correct horse")
    world = await session.enter_world(login.token)
    game = await GameClient.login(reactor, world.host, world.port, login.token)

Later, once the token has expired (10 minutes), without the password:

    login = await session.refresh(login.refresh_token)   # keep the new refresh token
    world = await session.enter_world(login.token)

and at logout, besides the game server's logout:

    await session.revoke(login.refresh_token)
"""

from twisted.internet import defer

from dreamraid.client import results
from dreamraid.client.connection import connect
from dreamraid.client.game import GameClient
from dreamraid.protocols import packets


class SessionClient:
    """One connection to the session server; refused requests raise L{dreamraid.client.RemoteError}."""

    def __init__(self, connection):
        self.connection = connection

    @classmethod
    async def connect(cls, reactor, host, port):
        return cls(await connect(reactor, host, port))

    async def _body(self, message, **body):
        return (await self.connection.request(message, body))[1]

    async def register(self, name, password):
        """Create an account; the new user's id."""
        return (await self._body(packets.REGISTER, name=name, password=password))["user_id"]

    async def login(self, name, password):
        """A L{results.Login} with the token."""
        return results.Login(**await self._body(packets.LOGIN, name=name, password=password))

    async def refresh(self, refresh_token):
        """
        A new L{results.Login} for a refresh token, which is spent: keep the
        new refresh token in its place.  A refused one (C{REFRESH_REFUSED}:
        expired, revoked, or used before) means logging in with the
        password.  A refresh whose reply never came (a drop, a timeout) may
        have spent the token: trying it again would revoke the login's
        tokens, so log in with the password instead.
        """
        return results.Login(**await self._body(packets.REFRESH, refresh_token=refresh_token))

    async def revoke(self, refresh_token):
        """End every refresh token of the login C{refresh_token} came from (at logout)."""
        await self._body(packets.REVOKE, refresh_token=refresh_token)

    async def enter_world(self, token):
        """Make the token the live session; the L{results.World} to play in."""
        return results.World(**await self._body(packets.ENTER_WORLD, token=token))

    def close(self):
        if self.connection.connected:
            self.connection.close()


async def play(reactor, host, port, name, password, register=False, password_callback=None, **options):
    """
    Log in through the session server at C{host:port} (creating the
    account first if C{register}), enter the world and authenticate on its
    game server: the L{dreamraid.client.game.GameClient} (C{options} are
    its own).  With C{password_callback} (a callable giving the password,
    or a Deferred of it) the client logs in and enters the world again by
    itself when a dropped session could no longer be resumed.
    """
    async def enter():
        session = await SessionClient.connect(reactor, host, port)
        try:
            login = await session.login(name, await defer.maybeDeferred(password_callback))
            world = await session.enter_world(login.token)
        finally:
            session.close()
        return world.host, world.port, login.token

    session = await SessionClient.connect(reactor, host, port)
    try:
        if register:
            await session.register(name, password)
        login = await session.login(name, password)
        world = await session.enter_world(login.token)
    finally:
        session.close()
    if password_callback is not None:
        options.setdefault("relogin", enter)
    return await GameClient.login(reactor, world.host, world.port, login.token, **options)


def listen_address(listen):
    """C{(host, port)} a client reaches a server at from its listen endpoint (C{tcp:9091:interface=127.0.0.1})."""
    kind, *parts = listen.split(":")
    named = dict(p.split("=", 1) for p in parts if "=" in p)
    positional = [p for p in parts if "=" not in p]
    if kind != "tcp" or not (positional or "port" in named):
        raise ValueError(f"cannot tell the session server's address from {listen!r}: give --session HOST:PORT")
    host = named.get("interface", "")
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), int(named.get("port") or positional[0])


def host_port(text):
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--session: expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)
