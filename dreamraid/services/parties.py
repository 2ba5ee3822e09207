"""
Parties: a player creates one and gets a 6-character invite code; others
join with it, up to the raid size.  When the leader leaves, the member who
joined next leads; the leader may kick.  Every member, on whichever game
server process, is told of every change (L{Presence.tell}).

    {p:<code>}:party        hash: leader, ids and names (space-separated,
                            in join order), size, version (raised by every
                            change, so a queued ticket can tell whether it
                            is the party's as it is now)
    {u:<id>}:party          the code of the user's party
    {u:<id>}:party_claim    the code of a claim of the user's not yet
                            finished, with a TTL (C{claim_ttl})

The two keys live in different slots, so no one script changes both: a
user first claims their own key (at most one party each), then the party
changes, then the claim is marked done; a failure gives the claim back.  A
claim that names a party which does not list the user is stale (its
process died between the two steps) and taken over, but only once it is no
longer under way: a claim still in the middle of its two steps (another
request of the same player's, on any connection or process) is not stale,
and the later request is refused with C{ALREADY_IN_PARTY}.  A player who
logs out or drops leaves their party; one whose old connection closes
because a newer connection replaced it (a raid handoff, or a second login
already authenticated at a game server) does not.  A connection that closes
after the player entered the world again but before the new login reached a
game server finds its session gone and leaves the party (issue 20's resume
keeps it).
"""

import string
from typing import NamedTuple

from twisted.logger import Logger

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.failurelog import REDIS_ERRORS
from dreamraid.services.rediscluster import LUA_SPLIT, Script

CODE_ALPHABET = string.ascii_uppercase + string.digits
CODE_LENGTH = 6

PARTY_CHANGED = "party_changed"

# The reasons of a party_changed push, each with who is told; the wire
# reference (docs/protocol.md) lists them from here.
JOINED, LEFT, KICKED, AWAY, BACK = "joined", "left", "kicked", "away", "back"
CHANGE_REASONS = {
    JOINED: "user_id joined the party; the members already in it are told (the one joining gets the party reply)",
    LEFT: "user_id left the party (leave_party, logout or a dropped connection); the members still in it are told, "
          "with the leader it has now (nobody is told when the last member leaves: the party is gone)",
    KICKED: "the leader removed user_id; the members still in it are told (the leader too), and user_id gets it with "
            "an empty code, leader 0 and no members",
    AWAY: "user_id's connection dropped without a logout: they are still a member, away for [game] resume_grace; "
          "the other members are told (then back, or left once the grace ran out)",
    BACK: "user_id, who was away, resumed; the other members are told",
}


def party_key(code):
    return f"{{p:{code}}}:party"


def membership_key(user_id):
    return f"{{u:{user_id}}}:party"


def claim_key(user_id):
    return f"{{u:{user_id}}}:party_claim"


# Shared: the party's state as a reply.
_LIBRARY = LUA_SPLIT + """
local function state(status)
  local p = redis.call('HMGET', KEYS[1], 'leader', 'ids', 'names', 'version')
  return {status, p[1], p[2], p[3], p[4]}
end
"""

# ARGV: leader id, name, size.  {0} if the code is taken, else the state.
_CREATE = _LIBRARY + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
redis.call('HSET', KEYS[1], 'leader', ARGV[1], 'ids', ARGV[1], 'names', ARGV[2], 'size', ARGV[3], 'version', 1)
return state(1)
"""

# ARGV: id, name.  {-1} no party, {-2} full, else the state (joining twice changes nothing).
_JOIN = _LIBRARY + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local p = redis.call('HMGET', KEYS[1], 'ids', 'names', 'size')
local ids = split(p[1])
for _, id in ipairs(ids) do
  if id == ARGV[1] then return state(1) end
end
if #ids >= tonumber(p[3]) then return {-2} end
redis.call('HSET', KEYS[1], 'ids', p[1] .. ' ' .. ARGV[1], 'names', p[2] .. ' ' .. ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return state(1)
"""

# ARGV: id of the one leaving, id of who removes them (the same, or the
# leader kicking).  {-1} no party, {-3} not the leader, {-4} not a member,
# {0} the party is gone (it was the last member), else the state.
_REMOVE = _LIBRARY + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local p = redis.call('HMGET', KEYS[1], 'leader', 'ids', 'names')
if ARGV[2] ~= ARGV[1] and ARGV[2] ~= p[1] then return {-3} end
local ids, names = split(p[2]), split(p[3])
local kept_ids, kept_names, found = {}, {}, false
for i, id in ipairs(ids) do
  if id == ARGV[1] then found = true else
    kept_ids[#kept_ids + 1] = id
    kept_names[#kept_names + 1] = names[i]
  end
end
if not found then return {-4} end
if #kept_ids == 0 then
  redis.call('DEL', KEYS[1])
  return {0}
end
local leader = p[1]
if leader == ARGV[1] then leader = kept_ids[1] end
redis.call('HSET', KEYS[1], 'leader', leader, 'ids', table.concat(kept_ids, ' '),
           'names', table.concat(kept_names, ' '))
redis.call('HINCRBY', KEYS[1], 'version', 1)
return state(1)
"""

# KEYS: membership, claim under way.  ARGV: code, the stale code to take
# over or '', claim ttl ms.  '' when claimed (and marked under way), else
# the code already there (a code to take over that is still under way
# stays).
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and (current ~= ARGV[2] or redis.call('EXISTS', KEYS[2]) == 1) then return current end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return ''
"""

# KEYS: claim under way.  ARGV: code.  The claim of that code is done.
_CLAIMED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: membership, claim under way.  ARGV: code.  Gives the claim back if
# it is still that code.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# How long a claim counts as under way: far longer than the one party
# script between the claim and its end may take (the router's deadline, 2 s
# by default), short enough that a claim a dead process left blocks its
# player only briefly.
CLAIM_TTL = 10.0


class Party(NamedTuple):
    code: str
    leader: int
    members: list  # [(user_id, name)] in join order
    version: int = 0  # raised by every change of the party


def _party(code, reply):
    ids, names = reply[2].decode().split(), reply[3].decode().split()
    return Party(code, int(reply[1]), [(int(i), n) for i, n in zip(ids, names)], int(reply[4] or 0))


def _body(party, reason, subject):
    return {"code": party.code if party else "", "leader": party.leader if party else 0,
            "members": [{"user_id": u, "name": n} for u, n in party.members] if party else [],
            "reason": reason, "user_id": subject}


class Parties:
    """Parties of live players; every method's refusals are L{RequestRefused}."""

    _log = Logger()

    def __init__(self, router, presence, random, size, claim_ttl=CLAIM_TTL):
        self._router = router
        self._presence = presence
        self._random = random
        self._size = size
        self._claim_ms = int(claim_ttl * 1000)
        self._create = Script(router, _CREATE)
        self._join = Script(router, _JOIN)
        self._remove = Script(router, _REMOVE)
        self._claim = Script(router, _CLAIM)
        self._claimed = Script(router, _CLAIMED)
        self._release_script = Script(router, _RELEASE)

    def _new_code(self):
        return "".join(self._random.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))

    async def _take_membership(self, user_id, code):
        """
        Claim the user's membership for C{code}, marked under way until
        L{_claim_done} or L{_release}.  @raise RequestRefused: ALREADY_IN_PARTY.
        """
        keys = [membership_key(user_id), claim_key(user_id)]
        current = (await self._claim(keys, [code, "", self._claim_ms])).decode()
        if not current:
            return
        if user_id in [u for u, _ in (await self.party_of_code(current) or Party("", 0, [])).members]:
            raise RequestRefused(ErrorCode.ALREADY_IN_PARTY)
        # The claim names a party that does not list the user: stale, unless still under way.
        if (await self._claim(keys, [code, current, self._claim_ms])).decode():
            raise RequestRefused(ErrorCode.ALREADY_IN_PARTY)

    def _claim_done(self, user_id, code):
        """The party lists the user now: their claim of C{code} is no longer under way."""
        return self._claimed([claim_key(user_id)], [code])

    def _release(self, user_id, code):
        """Give the user's membership of C{code} back, if it is still that."""
        return self._release_script([membership_key(user_id), claim_key(user_id)], [code])

    async def party_of_code(self, code):
        reply = await self._router.execute("HMGET", party_key(code), "leader", "ids", "names", "version")
        return None if reply[0] is None else _party(code, [1, *reply])

    async def party_of(self, user_id):
        """The user's L{Party}, or None."""
        code = await self._router.execute("GET", membership_key(user_id))
        party = code and await self.party_of_code(code.decode())
        return party if party and user_id in [u for u, _ in party.members] else None

    async def create(self, user_id, name):
        """A new party led by the user; its L{Party}."""
        for _ in range(8):
            code = self._new_code()
            await self._take_membership(user_id, code)
            reply = await self._create([party_key(code)], [user_id, name, self._size])
            if reply[0] == 1:
                await self._after_change(self._claim_done(user_id, code), "mark the claim done", user_id, code)
                return _party(code, reply)
            await self._release(user_id, code)
        raise RequestRefused(ErrorCode.UNAVAILABLE, "no free party code found")

    async def join(self, user_id, name, code):
        """Join the party C{code}; its L{Party}.  Members already in it are told."""
        code = code.upper()
        if len(code) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in code):
            raise RequestRefused(ErrorCode.NO_SUCH_PARTY)
        await self._take_membership(user_id, code)
        reply = await self._join([party_key(code)], [user_id, name])
        if reply[0] != 1:
            await self._release(user_id, code)
            raise RequestRefused(ErrorCode.NO_SUCH_PARTY if reply[0] == -1 else ErrorCode.PARTY_FULL)
        party = _party(code, reply)
        await self._after_change(self._claim_done(user_id, code), "mark the claim done", user_id, code)
        await self._after_change(self._tell(party, [u for u, _ in party.members if u != user_id], JOINED, user_id),
                                 "tell the members", user_id, code)
        return party

    async def leave(self, user_id):
        """
        Leave the user's party; the others are told (and one leads, if the
        leader left).  The party left behind, or None if it is gone.
        """
        party = await self.party_of(user_id)
        if party is None:
            raise RequestRefused(ErrorCode.NOT_IN_PARTY)
        return await self._remove_member(party.code, user_id, user_id, LEFT)

    async def kick(self, leader_id, user_id):
        """The leader removes a member; the party after.  The kicked member and the rest are told."""
        party = await self.party_of(leader_id)
        if party is None:
            raise RequestRefused(ErrorCode.NOT_IN_PARTY)
        if user_id == leader_id:
            raise RequestRefused(ErrorCode.NOT_A_MEMBER, "the leader leaves with leave_party")
        after = await self._remove_member(party.code, user_id, leader_id, KICKED)
        await self._after_change(self._presence.tell([user_id], PARTY_CHANGED, _body(None, KICKED, user_id)),
                                 "tell the kicked member", user_id, party.code)
        return after

    async def leave_if_any(self, user_id):
        """
        For a player who logs out or drops: leave their party, if they are
        in one; the party left behind, or None.  Never raises.
        """
        try:
            if await self.party_of(user_id) is not None:
                return await self.leave(user_id)
        except Exception as e:
            self._log.warn("user {user_id} left the game but not their party: {error}", user_id=user_id, error=e)
        return None

    async def _remove_member(self, code, user_id, by, reason):
        reply = await self._remove([party_key(code)], [user_id, by])
        if reply[0] == -3:
            raise RequestRefused(ErrorCode.NOT_PARTY_LEADER)
        if reply[0] == -4:
            raise RequestRefused(ErrorCode.NOT_A_MEMBER)
        await self._after_change(self._release(user_id, code), "give the membership back", user_id, code)
        if reply[0] != 1:
            return None
        party = _party(code, reply)
        await self._after_change(self._tell(party, [u for u, _ in party.members], reason, user_id),
                                 "tell the members", user_id, code)
        return party

    async def _after_change(self, step, what, user_id, code):
        """
        A step after the party's own script changed it: the change stands,
        so a store failure here is logged, not raised (the caller goes on to
        withdraw the party's ticket).  A claim not marked done lapses by its
        TTL; a membership not given back is stale, as the party does not
        list the user, and is taken over by their next claim.
        """
        try:
            await step
        except REDIS_ERRORS as e:
            self._log.warn("party {code}: changed for user {user_id}, but could not {what}: {error}",
                           code=code, user_id=user_id, what=what, error=e)

    async def tell_status(self, user_id, reason):
        """Tell the other members of the user's party, if any, C{reason} (L{AWAY}, L{BACK}) about the user."""
        party = await self.party_of(user_id)
        if party is not None:
            await self._tell(party, [u for u, _ in party.members if u != user_id], reason, user_id)

    def _tell(self, party, user_ids, reason, subject):
        return self._presence.tell(user_ids, PARTY_CHANGED, _body(party, reason, subject))
