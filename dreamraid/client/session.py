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

L{play} does all of this: it logs in, enters the world and authenticates,
and its client, when a dropped session can no longer be resumed, gets back
in with the refresh token (L{Relogin}); its logout revokes the login.
"""

from twisted.internet import defer
from twisted.logger import Logger

from dreamraid.client import results
from dreamraid.client.connection import ConnectionClosed, RemoteError, connect
from dreamraid.client.game import GameClient, as_advertised
from dreamraid.errors import ErrorCode
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


class Relogin:
    """
    How a client that L{play} logged in gets back in when its session could
    no longer be resumed (the resume grace ran out, the server lost it):
    without the password when it can.  Called, it refreshes with the newest
    refresh token (keeping the rotated one in its place), enters the world
    with the new access token and gives C{(host, port, token)} for the game
    server (the address passed through C{route}); the
    L{dreamraid.client.game.GameClient} authenticates with it.

    Only a refresh the session server refused (C{REFRESH_REFUSED}: expired,
    revoked, used already) or whose reply never came (the token may be
    spent: presenting it again would revoke the login) falls back to the
    password, asked of C{password_callback} (a callable giving it, or a
    Deferred of it); without one that refusal is raised, a
    L{dreamraid.client.RemoteError} with C{REFRESH_REFUSED}.  A session
    server out of reach (nothing sent) is raised as it is: the client tries
    again after its backoff.  L{revoke} ends the login's refresh tokens (at
    logout).  Calls run one at a time, so no refresh token is sent twice.
    """

    _log = Logger()

    def __init__(self, connect, name, login, password_callback=None, route=as_advertised):
        """
        @param connect: a callable giving (an awaitable of) a connected L{SessionClient}.
        @param login: the L{results.Login} the client logged in with.
        """
        self._connect = connect
        self._name = name
        self._password_callback = password_callback
        self._route = route
        self.refresh_token = login.refresh_token  # the newest; None once one was lost in flight
        self._family_token = login.refresh_token  # a token of the login's family, spent or not: what revoke sends
        self._lock = defer.DeferredLock()

    def __call__(self):
        return self._lock.run(lambda: defer.ensureDeferred(self._enter()))

    async def _enter(self):
        session = await self._connect()
        try:
            login = await self._login(session)
            world = await session.enter_world(login.token)
        finally:
            session.close()
        return (*self._route("tcp", (world.host, world.port)), login.token)

    async def _login(self, session):
        """A new L{results.Login}: refreshed, or with the password if the refresh cannot be had."""
        refused = RemoteError(ErrorCode.REFRESH_REFUSED, "no refresh token left: log in with the password")
        token, self.refresh_token = self.refresh_token, None  # spent, or maybe spent, once sent
        if token is not None:
            try:
                login = await session.refresh(token)
            except RemoteError as e:
                if e.code is not ErrorCode.REFRESH_REFUSED:  # the store out of reach: nothing was spent
                    self.refresh_token = token
                    raise
                refused = e
            except defer.CancelledError:
                raise
            except (ConnectionClosed, defer.TimeoutError) as e:
                self._log.info("the refresh's reply never came ({error}): its token may be spent", error=e)
                refused = RemoteError(ErrorCode.REFRESH_REFUSED,
                                      "the refresh's reply never came, its token may be spent: log in with the password")
            else:
                self.refresh_token = self._family_token = login.refresh_token
                return login
        if self._password_callback is None:
            raise refused
        login = await session.login(self._name, await defer.maybeDeferred(self._password_callback))
        self.refresh_token = self._family_token = login.refresh_token
        return login

    def revoke(self):
        """End every refresh token of the login (at logout); a failure is logged, not raised: a Deferred."""
        return self._lock.run(lambda: defer.ensureDeferred(self._revoke()))

    async def _revoke(self):
        token, self.refresh_token, self._family_token = self._family_token, None, None
        if token is None:
            return
        try:
            session = await self._connect()
            try:
                await session.revoke(token)
            finally:
                session.close()
        except Exception as e:
            self._log.warn("cannot revoke the login's refresh tokens at logout: {error}", error=e)


async def play(reactor, host, port, name, password, register=False, password_callback=None, **options):
    """
    Log in through the session server at C{host:port} (creating the
    account first if C{register}), enter the world and authenticate on its
    game server: the L{dreamraid.client.game.GameClient} (C{options} are
    its own; C{route} maps the game server's address too).

    When a dropped session could no longer be resumed, the client gets back
    in by itself through a L{Relogin}: with the login's refresh token, and
    only if the refresh is refused with the password from
    C{password_callback} (a callable giving it, or a Deferred of it), if
    given.  Its logout revokes the login's refresh tokens.
    """
    def session_client():
        return SessionClient.connect(reactor, host, port)

    session = await session_client()
    try:
        if register:
            await session.register(name, password)
        login = await session.login(name, password)
        world = await session.enter_world(login.token)
    finally:
        session.close()
    relogin = Relogin(session_client, name, login, password_callback, options.get("route", as_advertised))
    options.setdefault("relogin", relogin)
    options.setdefault("end_login", relogin.revoke)
    game_host, game_port = options.get("route", as_advertised)("tcp", (world.host, world.port))
    return await GameClient.login(reactor, game_host, game_port, login.token, **options)


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
