"""
Presence: which game server process holds each user, and the kick that
crosses processes when the same user logs in twice.

    {u:<id>}:presence   "<server id> <n>": the authentication holding the
                        user (the server's n-th), with a TTL that server
                        renews while the user stays connected or away
    {u:<id>}:away       the holder, while its connection dropped and the
                        player is away (the resume grace, or a handoff
                        ticket's time after it), with presence_ttl more

A user enters a game server only with the token that is their live session
(the "double check" after the signature).  Entering renews the session and
takes over the presence, so the newest authentication always holds the user,
also when it reused the token of the one before; the holder it replaced, if
on another process, is named on that process's kick channel (Redis pub/sub),
which closes exactly that connection.  Renewing and leaving act only while
the presence still names the connection's own authentication: a replaced
connection's renewal finds it replaced (and closes it, in case the kick was
lost), and its leave ends nothing, so the newer connection's session lives
on.  Pushes to users on any process (a party's changes) go the same way as
kicks, on each process's notice channel.
"""

import enum
import itertools
import json
from typing import NamedTuple

from twisted.logger import Logger

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import profile_key, session_key
from dreamraid.services.rediscluster import Script


def presence_key(user_id):
    return f"{{u:{user_id}}}:presence"


def away_key(user_id):
    return f"{{u:{user_id}}}:away"


def handoff_key(user_id):
    return f"{{u:{user_id}}}:handoff"


def kick_channel(server_id):
    return f"kick:{{{server_id}}}"


def notice_channel(server_id):
    return f"notice:{{{server_id}}}"


# KEYS: session, presence, profile, away.  ARGV: jti, holder, presence ttl
# ms, session ttl ms.  {0} unless jti is the live session and the data is
# live; else {1, the previous holder or '', name, level, exp, the away
# holder or ''} (the player is no longer away).
_ENTER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 0 then return {0} end
local previous = redis.call('GET', KEYS[2]) or ''
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local away = redis.call('GET', KEYS[4]) or ''
if away ~= '' then redis.call('DEL', KEYS[4]) end
local profile = redis.call('HMGET', KEYS[3], 'name', 'level', 'exp')
return {1, previous, profile[1], profile[2], profile[3], away}
"""

# KEYS: presence, away.  ARGV: holder, ms.  While the presence is still
# holder's, marks the user away (the away key names the holder) for ms: 1;
# else 0.
_AWAY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: session, presence.  ARGV: jti, holder, presence ttl ms, session
# ttl ms.  Renews both while the presence is still this holder's (or has
# lapsed: nobody took the user over) and jti the live session: 1; -1 if
# another authentication holds the user; 0 if the session is not jti.
_RENEW = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return -1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: session, presence, handoff, away.  ARGV: jti, holder, '1' to wait for a
# handoff.  -1 if another authentication holds the user (it goes on with the
# session, a raid handoff among them).  Asked to wait, while jti is still the
# session and a handoff ticket waits: ends nothing, {the ticket's ms left}.
# Else gives up the presence and ends the session if it is still jti: 1 if
# it did, 0 if not.
_LEAVE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return -1 end
local live = redis.call('GET', KEYS[1]) == ARGV[1]
if live and ARGV[3] == '1' and redis.call('PTTL', KEYS[3]) > 0 then return {redis.call('PTTL', KEYS[3])} end
if holder then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[4])
if not live then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
return 1
"""


# KEYS: handoff, session, presence, profile, away.  ARGV: ticket, holder,
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
local away = redis.call('GET', KEYS[5]) or ''
if away ~= '' then redis.call('DEL', KEYS[5]) end
local profile = redis.call('HMGET', KEYS[4], 'name', 'level', 'exp')
return {1, previous, profile[1], profile[2], profile[3], away}
"""


# KEYS: presence, handoff.  ARGV: this server's id, ticket, ms, the holder
# expected (or '' for any).  Where a raid's host gives the user their
# place: {'', 0} if nobody holds the user, {holder, -1} if another than the
# one expected does (nothing offered either way).  A holder on this server
# (the host) needs no ticket, and any ticket still waiting is taken off, as
# it would never be used and a leave would wait for it: {holder, 0}.  Else
# the ticket waits ms: {holder, 1}.
_OFFER_PLACE = """
local holder = redis.call('GET', KEYS[1])
if not holder then return {'', 0} end
if ARGV[4] ~= '' and holder ~= ARGV[4] then return {holder, -1} end
if string.match(holder, '^[^ ]*') == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return {holder, 0}
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {holder, 1}
"""

# KEYS: handoff.  ARGV: ticket.  Takes the ticket off if it is still the one
# waiting (not a newer offer's, nor used): 1 if it was, else 0.
_WITHDRAW_PLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class Left(enum.Enum):
    """What a connection's leave found."""

    REPLACED = -1  # a newer authentication holds the user and goes on with the session: nothing ended
    NOT_LIVE = 0  # nobody holds the user now, but the session was not this one's (a newer login's, or gone)
    ENDED = 1  # this connection held the user and its session ended


def _left(reply):
    """The leave script's reply: a L{Left}, or the seconds a handoff ticket still waits (a float)."""
    return reply[0] / 1000 if isinstance(reply, list) else Left(reply)


def _renewal_outcome(reply):
    return None if reply == 1 else ErrorCode.LOGGED_IN_ELSEWHERE if reply == -1 else ErrorCode.SESSION_NOT_LIVE


class Entered(NamedTuple):
    user_id: int
    name: str
    level: int
    exp: int
    holder: str  # this authentication's presence: what the connection renews and leaves with
    was_away: bool = False  # the player was marked away (its connection had dropped)


def holder_server(holder):
    """The server id in a presence value."""
    return holder.split(" ", 1)[0]


def holder_number(holder):
    """The n of a presence value: on one server, a later authentication has a larger one."""
    return int(holder.rsplit(" ", 1)[1])


class Presence:
    """Presence and sessions of the users connected to one game server process."""

    _log = Logger()

    def __init__(self, router, server_id, presence_ttl, session_ttl):
        self._router = router
        self.server_id = server_id
        self._authentications = itertools.count(1)
        self._presence_ms = int(presence_ttl * 1000)
        self._session_ms = int(session_ttl * 1000)
        self._enter = Script(router, _ENTER)
        self._renew = Script(router, _RENEW)
        self._leave = Script(router, _LEAVE)
        self._handoff = Script(router, _HANDOFF)
        self._away = Script(router, _AWAY)
        self._offer_place = Script(router, _OFFER_PLACE)
        self._withdraw_place = Script(router, _WITHDRAW_PLACE)

    async def enter(self, user_id, jti):
        """
        Take the user over for this server; an L{Entered}.  Tells the
        previous holder, if another process, to let go.

        @raise RequestRefused: C{SESSION_NOT_LIVE} unless C{jti} is the live session.
        """
        holder = self._new_holder()
        reply = await self._enter([session_key(user_id), presence_key(user_id), profile_key(user_id),
                                   away_key(user_id)], [jti, holder, self._presence_ms, self._session_ms])
        if reply[0] != 1:
            raise RequestRefused(ErrorCode.SESSION_NOT_LIVE)
        return self._entered(user_id, holder, reply)

    def _new_holder(self):
        """A presence value no other authentication, here or on any process, has had."""
        return f"{self.server_id} {next(self._authentications)}"

    def offer_handoff(self, user_id, ticket, ttl):
        """Let the user move to this server with C{ticket}, once, within C{ttl} seconds."""
        return self._router.execute("SET", handoff_key(user_id), ticket, "PX", int(ttl * 1000))

    async def offer_place(self, user_id, ticket, ttl, expected=None):
        """
        A raid hosted here gives the user their place, if C{expected} (a
        holder; None: any) holds them: C{(holder, offered)}, the
        authentication holding the user now (None: nobody) and whether
        C{ticket} was offered (as L{offer_handoff}).  Nothing is offered if
        nobody holds the user or another than C{expected} does.  A holder on
        this server needs no ticket: none is offered, and any ticket still
        waiting is taken off (unused, it would hold up the user's leave for
        its time).
        """
        holder, offered = await self._offer_place([presence_key(user_id), handoff_key(user_id)],
                                                  [self.server_id, ticket, int(ttl * 1000), expected or ""])
        return (holder.decode() if holder else None), offered == 1

    def withdraw_place(self, user_id, ticket):
        """
        Take off the ticket L{offer_place} offered, if it still waits (no
        newer offer replaced it and it was not used): the raid ended before
        the player was told it, and unused it would hold up the user's leave
        for its time.  A Deferred of whether it was taken off.
        """
        return self._withdraw_place([handoff_key(user_id)], [ticket]).addCallback(bool)

    async def enter_handoff(self, user_id, ticket):
        """
        Take the user over with a handoff ticket, which becomes their live
        session (the previous holder is told to let go); an L{Entered}.

        @raise RequestRefused: C{HANDOFF_REFUSED} for a used, expired or wrong ticket.
        """
        holder = self._new_holder()
        reply = await self._handoff(
            [handoff_key(user_id), session_key(user_id), presence_key(user_id), profile_key(user_id),
             away_key(user_id)],
            [ticket, holder, self._presence_ms, self._session_ms])
        if reply[0] != 1:
            raise RequestRefused(ErrorCode.HANDOFF_REFUSED)
        return self._entered(user_id, holder, reply)

    def _entered(self, user_id, holder, reply):
        """
        The user is this authentication's now: tell the holder it replaced,
        if on another process, without waiting (the caller registers the
        connection at once, so no other authentication of the user here can
        come between).  A kick that cannot be sent is logged: the replaced
        connection's next renewal finds it replaced all the same.
        """
        previous = reply[1].decode()
        if previous and holder_server(previous) != self.server_id:
            self._router.publish(kick_channel(holder_server(previous)), f"{user_id} {previous}").addErrback(
                lambda f: self._log.warn("user {user_id}: cannot tell {previous} to let go ({error}); its renewal "
                                         "will", user_id=user_id, previous=previous, error=f.getErrorMessage()))
        return Entered(user_id, reply[2].decode("utf-8"), int(reply[3]), int(reply[4]), holder,
                       len(reply) > 5 and bool(reply[5]))

    def mark_away(self, user_id, holder, seconds):
        """
        Mark the user away for C{seconds} while the presence is still
        C{holder}'s (its connection dropped; the holder keeps renewing it);
        a Deferred of whether it was.  Any authentication, and the leave,
        take the mark off.
        """
        return self._away([presence_key(user_id), away_key(user_id)], [holder, int(seconds * 1000)]).addCallback(bool)

    def renew(self, user_id, jti, holder):
        """
        Renew the session and presence of the authentication C{holder}; a
        Deferred of None if they are still its, else of the L{ErrorCode} to
        close its connection with: C{LOGGED_IN_ELSEWHERE} (a newer
        authentication holds the user) or C{SESSION_NOT_LIVE}.
        """
        return self._renew([session_key(user_id), presence_key(user_id)],
                           [jti, holder, self._presence_ms, self._session_ms]).addCallback(_renewal_outcome)

    def leave(self, user_id, jti, holder, wait_for_handoff=False):
        """
        The authentication C{holder} leaves: unless a newer one holds the
        user, give up the presence and end the session if it is still
        C{jti}; a Deferred of what it found, a L{Left}.  With
        C{wait_for_handoff} (a connection closed, not a logout) and a raid
        handoff ticket of the user waiting, end nothing (the player is
        moving to the raid's host): a Deferred of the seconds the ticket has
        left, a float.
        """
        keys = [session_key(user_id), presence_key(user_id), handoff_key(user_id), away_key(user_id)]
        return self._leave(keys, [jti, holder, "1" if wait_for_handoff else "0"]).addCallback(_left)

    async def tell(self, user_ids, event, body):
        """
        Have whichever processes hold C{user_ids} push C{event} (a name the
        client protocol knows) with C{body} (JSON-able) to them; users with
        no presence are skipped.
        """
        holders = await gather([self._router.execute("GET", presence_key(u)) for u in user_ids])
        by_server = {}
        for user_id, holder in zip(user_ids, holders):
            if holder is not None:
                by_server.setdefault(holder_server(holder.decode()), []).append(user_id)
        await gather([
            self._router.publish(notice_channel(server), json.dumps({"users": users, "event": event, "body": body}))
            for server, users in by_server.items()])

    def tell_holder(self, user_id, holder, event, body):
        """
        Have the authentication C{holder} of C{user_id}, and no other, push
        C{event} with C{body}: the process it is on drops the notice if the
        user is no longer held by it (resumed or left since), or is away.
        """
        return self._router.publish(notice_channel(holder_server(holder)), json.dumps(
            {"users": [user_id], "holder": holder, "event": event, "body": body}))

    def ask(self, server_id, event, body):
        """Have the process C{server_id} hear C{event} with C{body} (JSON-able) as a notice to no user."""
        return self._router.publish(notice_channel(server_id), json.dumps({"users": [], "event": event, "body": body}))

    def listen(self, on_kick, on_notice):
        """
        Call C{on_kick(user_id, holder)} when another process takes over the
        authentication C{holder} of a user of this one, and
        C{on_notice(user_ids, event, body, holder)} for what L{tell} (holder
        None) and L{tell_holder} send users of this one; a Subscription.
        """
        kicks = kick_channel(self.server_id).encode()

        def received(channel, message):
            if channel == kicks:
                user_id, holder = message.decode().split(" ", 1)
                on_kick(int(user_id), holder)
            else:
                notice = json.loads(message)
                on_notice(notice["users"], notice["event"], notice["body"], notice.get("holder"))

        return self._router.subscribe([kick_channel(self.server_id), notice_channel(self.server_id)], received)
