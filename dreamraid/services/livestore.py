"""
The live store: how a user's data sits in the Redis Cluster, and the Lua
scripts that move it in and out whole.

Everything of one user shares the hash tag C{{u:<id>}}, so one script on one
slot changes it atomically:

    {u:<id>}:profile    hash: name, level, exp, best, version
    {u:<id>}:inv:<tab>  hash per tab (0 equipment, 1 consumables, 2 materials):
                        slot -> "item_code:enhancement:count"
    {u:<id>}:session    the live token id (jti), with a TTL
    {u:<id>}:raid       the id of the raid the user plays in, until it ends
                        (a clear takes it off as it pays them)
    {u:<id>}:raid_paid  "<raid id> <JSON>": what that raid's pay answered,
                        so a retry after a lost reply gets the same answer

C{version} starts at the MySQL row's C{data_version} and every change of
the user's data adds one to it, so the sync can tell a newer snapshot from an
older one.  A user is "online" while the session key exists.
"""

from typing import NamedTuple

from dreamraid.services.rediscluster import Script

TABS = (0, 1, 2)
EQUIPMENT, CONSUMABLES, MATERIALS = TABS


def profile_key(user_id):
    return f"{{u:{user_id}}}:profile"


def tab_key(user_id, tab):
    return f"{{u:{user_id}}}:inv:{tab}"


def session_key(user_id):
    return f"{{u:{user_id}}}:session"


def raid_mark_key(user_id):
    """Set while the user is a player of a raid: their data stays live until it pays them."""
    return f"{{u:{user_id}}}:raid"


def raid_receipt_key(user_id):
    """What the last raid that paid the user answered, for a retry whose first reply was lost."""
    return f"{{u:{user_id}}}:raid_paid"


def data_keys(user_id):
    """The keys holding the user's data: profile, then one per tab."""
    return [profile_key(user_id)] + [tab_key(user_id, tab) for tab in TABS]


class Item(NamedTuple):
    """What one inventory slot holds."""

    code: int
    enhancement: int = 0
    count: int = 1


def encode_item(item):
    return f"{item.code}:{item.enhancement}:{item.count}"


class Profile(NamedTuple):
    """A user's durable data: the profile and every occupied slot, C{{(tab, slot): Item}}."""

    user_id: int
    name: str
    level: int
    exp: int
    best: int
    version: int
    items: dict


# KEYS: session, profile.  ARGV: jti, ttl in ms.
# Sets the live session; 1 if the user's data is already live, else 0.
_CLAIM = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('EXISTS', KEYS[2])
"""

# KEYS: profile, tab 0, tab 1, tab 2.  ARGV: name, level, exp, best, version,
# then per item: tab, slot, encoded item.  Writes the user's data unless it is
# already live (a newer copy than MySQL's); 1 if written.
_LOAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'level', ARGV[2], 'exp', ARGV[3],
           'best', ARGV[4], 'version', ARGV[5])
for i = 6, #ARGV, 3 do
    redis.call('HSET', KEYS[2 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
return 1
"""

# KEYS: profile, tab 0, tab 1, tab 2.  The profile hash and each tab's hash
# read at one instant, or nil when the user's data is not live.
_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""

# KEYS: session, raid mark, profile, tab 0, tab 1, tab 2.  ARGV: the version
# just made durable.  Removes the user's data if nobody is online with it, the
# user is in no raid (which will pay them at its end) and it has not changed
# since: 1 removed (or already gone), 0 online or raiding, -1 changed.
_EVICT = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local version = redis.call('HGET', KEYS[3], 'version')
if version and version ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return 1
"""

# KEYS: session.  ARGV: jti.  Ends the session only if it is still this one.
_END = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

CLAIMED_LIVE, CLAIMED_EMPTY = 1, 0
EVICTED, STILL_ONLINE, CHANGED = 1, 0, -1


class LiveStore:
    """The scripts over one router; every method is one atomic step on one user's slot."""

    def __init__(self, router):
        self._claim = Script(router, _CLAIM)
        self._load = Script(router, _LOAD)
        self._snapshot = Script(router, _SNAPSHOT)
        self._evict = Script(router, _EVICT)
        self._end = Script(router, _END)

    async def claim_session(self, user_id, jti, ttl):
        """Make C{jti} the user's live session for C{ttl} seconds; whether the data is live already."""
        live = await self._claim([session_key(user_id), profile_key(user_id)], [jti, int(ttl * 1000)])
        return live == CLAIMED_LIVE

    async def load(self, profile):
        """Write C{profile} as the live data unless a live copy exists; whether it was written."""
        args = [profile.name, profile.level, profile.exp, profile.best, profile.version]
        for (tab, slot), item in sorted(profile.items.items()):
            args += [tab, slot, encode_item(item)]
        return await self._load(data_keys(profile.user_id), args) == 1

    def snapshot(self, user_id):
        """A Deferred of the user's live data as a L{Profile}, or C{None} if it is not live."""
        return self._snapshot(data_keys(user_id)).addCallback(_profile, user_id)

    def evict(self, user_id, version):
        """
        Remove the user's live data if offline, in no raid, and still at
        C{version}; a Deferred of L{EVICTED}, L{STILL_ONLINE} or L{CHANGED}.
        """
        return self._evict([session_key(user_id), raid_mark_key(user_id)] + data_keys(user_id), [version])

    async def end_session(self, user_id, jti):
        """End the live session if it is still C{jti} (a newer login's is kept); whether it ended."""
        return await self._end([session_key(user_id)], [jti]) == 1


def _pairs(flat):
    return dict(zip(flat[::2], flat[1::2]))


def _profile(reply, user_id):
    """The L{Profile} of a snapshot script's reply."""
    if not reply:
        return None
    fields = _pairs(reply[0])
    items = {}
    for tab, flat in zip(TABS, reply[1:]):
        for i in range(0, len(flat), 2):
            code, enhancement, count = flat[i + 1].split(b":")
            items[tab, int(flat[i])] = Item(int(code), int(enhancement), int(count))
    return Profile(
        user_id, fields[b"name"].decode("utf-8"), int(fields[b"level"]), int(fields[b"exp"]),
        int(fields.get(b"best", 0)), int(fields[b"version"]), items,
    )
