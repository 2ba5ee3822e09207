"""
Presence: which game server process holds each user, and the kick that
crosses processes when the same user logs in twice.

    {u:<id>}:presence   the server id holding the user, with a TTL this
                        server renews while the user stays connected

A user enters a game server only with the token that is their live session
(the "double check" after the signature).  Entering renews the session and
takes over the presence; if another process held the user, that process is
told through its kick channel (Redis pub/sub) and closes its connection.
Pushes to users on any process (a party's changes) go the same way, on each
process's notice channel.
"""

import json
from typing import NamedTuple

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import profile_key, session_key
from dreamraid.services.rediscluster import Script


def presence_key(user_id):
    return f"{{u:{user_id}}}:presence"


def handoff_key(user_id):
    return f"{{u:{user_id}}}:handoff"


def kick_channel(server_id):
    return f"kick:{{{server_id}}}"


def notice_channel(server_id):
    return f"notice:{{{server_id}}}"


# KEYS: session, presence, profile.  ARGV: jti, server id, presence ttl ms,
# session ttl ms.  {0} unless jti is the live session and the data is live;
# else {1, the previous holder or '', name, level, exp}.
_ENTER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 0 then return {0} end
local previous = redis.call('GET', KEYS[2]) or ''
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local profile = redis.call('HMGET', KEYS[3], 'name', 'level', 'exp')
return {1, previous, profile[1], profile[2], profile[3]}
"""

# KEYS: session, presence.  ARGV: jti, server id, presence ttl ms, session
# ttl ms.  Renews both while jti is still the live session; 1 if it is.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: session, presence, handoff.  ARGV: jti, server id, '1' to wait for
# a handoff.  Ends the session, and the presence if this server's, while
# jti is still the live session (a newer login keeps both); 1 if it was,
# 0 if not.  Asked to wait, while a handoff ticket waits: ends nothing,
# {the ticket's ms left}.
_LEAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and redis.call('PTTL', KEYS[3]) > 0 then return {redis.call('PTTL', KEYS[3])} end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""


# KEYS: handoff, session, presence, profile.  ARGV: ticket, server id,
# presence ttl ms, session ttl ms.  Uses the ticket up; if it was the user's
# and their data is live, the ticket becomes the live session and this
# server takes the presence: {1, previous holder or '', name, level, exp};
# else {0}.
_HANDOFF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[4]) == 0 then return {0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
local previous = redis.call('GET', KEYS[3]) or ''
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
local profile = redis.call('HMGET', KEYS[4], 'name', 'level', 'exp')
return {1, previous, profile[1], profile[2], profile[3]}
"""


def _left(reply):
    """The leave script's reply: True or False, or the handoff ticket's seconds left."""
    return reply[0] / 1000 if isinstance(reply, list) else bool(reply)


class Entered(NamedTuple):
    user_id: int
    name: str
    level: int
    exp: int
    previous_server: str


class Presence:
    """Presence and sessions of the users connected to one game server process."""

    def __init__(self, router, server_id, presence_ttl, session_ttl):
        self._router = router
        self.server_id = server_id
        self._presence_ms = int(presence_ttl * 1000)
        self._session_ms = int(session_ttl * 1000)
        self._enter = Script(router, _ENTER)
        self._renew = Script(router, _RENEW)
        self._leave = Script(router, _LEAVE)
        self._handoff = Script(router, _HANDOFF)

    async def enter(self, user_id, jti):
        """
        Take the user over for this server; an L{Entered}.  Tells the
        previous holder, if another process, to let go.

        @raise RequestRefused: C{SESSION_NOT_LIVE} unless C{jti} is the live session.
        """
        reply = await self._enter([session_key(user_id), presence_key(user_id), profile_key(user_id)],
                                  [jti, self.server_id, self._presence_ms, self._session_ms])
        if reply[0] != 1:
            raise RequestRefused(ErrorCode.SESSION_NOT_LIVE)
        return await self._entered(user_id, jti, reply)

    def offer_handoff(self, user_id, ticket, ttl):
        """Let the user move to this server with C{ticket}, once, within C{ttl} seconds."""
        return self._router.execute("SET", handoff_key(user_id), ticket, "PX", int(ttl * 1000))

    async def enter_handoff(self, user_id, ticket):
        """
        Take the user over with a handoff ticket, which becomes their live
        session (the previous holder is told to let go); an L{Entered}.

        @raise RequestRefused: C{HANDOFF_REFUSED} for a used, expired or wrong ticket.
        """
        reply = await self._handoff(
            [handoff_key(user_id), session_key(user_id), presence_key(user_id), profile_key(user_id)],
            [ticket, self.server_id, self._presence_ms, self._session_ms])
        if reply[0] != 1:
            raise RequestRefused(ErrorCode.HANDOFF_REFUSED)
        return await self._entered(user_id, ticket, reply)

    async def _entered(self, user_id, jti, reply):
        previous = reply[1].decode()
        if previous and previous != self.server_id:
            await self._router.publish(kick_channel(previous), f"{user_id} {jti}")
        return Entered(user_id, reply[2].decode("utf-8"), int(reply[3]), int(reply[4]), previous)

    def renew(self, user_id, jti):
        """Renew the session and presence; a Deferred of whether the session is still this one."""
        return self._renew([session_key(user_id), presence_key(user_id)],
                           [jti, self.server_id, self._presence_ms, self._session_ms]).addCallback(bool)

    def leave(self, user_id, jti, wait_for_handoff=False):
        """
        End the session and presence if still this connection's; a Deferred
        of whether the session was.  With C{wait_for_handoff} (a connection
        closed, not a logout) and a raid handoff ticket of the user
        waiting, end nothing (the player is moving to the raid's host): a
        Deferred of the seconds the ticket has left, a float.
        """
        keys = [session_key(user_id), presence_key(user_id), handoff_key(user_id)]
        return self._leave(keys, [jti, self.server_id, "1" if wait_for_handoff else "0"]).addCallback(_left)

    async def tell(self, user_ids, event, body):
        """
        Have whichever processes hold C{user_ids} push C{event} (a name the
        client protocol knows) with C{body} (JSON-able) to them; users with
        no presence are skipped.
        """
        holders = await gather([self._router.execute("GET", presence_key(u)) for u in user_ids])
        by_server = {}
        for user_id, server in zip(user_ids, holders):
            if server is not None:
                by_server.setdefault(server.decode(), []).append(user_id)
        await gather([
            self._router.publish(notice_channel(server), json.dumps({"users": users, "event": event, "body": body}))
            for server, users in by_server.items()])

    def listen(self, on_kick, on_notice):
        """
        Call C{on_kick(user_id, jti)} when another process takes over a user
        of this one, and C{on_notice(user_ids, event, body)} for what
        L{tell} sends users of this one; a Subscription.
        """
        kicks = kick_channel(self.server_id).encode()

        def received(channel, message):
            if channel == kicks:
                user_id, jti = message.decode().split(" ", 1)
                on_kick(int(user_id), jti)
            else:
                notice = json.loads(message)
                on_notice(notice["users"], notice["event"], notice["body"])

        return self._router.subscribe([kick_channel(self.server_id), notice_channel(self.server_id)], received)
