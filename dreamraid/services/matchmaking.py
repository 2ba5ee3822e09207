"""
Matchmaking: tickets (a party, or a solo player as a party of one) wait per
level group and are formed into raids of C{raid_size} players, first come
first served, across every game server process.

Every key carries one hash tag (C{[raids] matchmaking_prefix}), so the
queues of all groups share a slot and one script forms a raid atomically:
a player is never in two tickets or two raids.  That slot is by nature one
hot spot; a pass costs one script call, and passes are cheap.

    {mm}:queue:<group>   sorted set: ticket id -> enqueued at (ms)
    {mm}:tickets         hash: ticket id -> "group at order size server members..."
    {mm}:order           counter: the order of tickets queued in the same ms
    {mm}:raid_host       hash: raid id -> the server id hosting it
    {mm}:leases          sorted set: server id -> until when it is alive (ms)
    {mm}:servers         hash: server id -> its client address (host:port)
    {mm}:checkpoints     hash: raid id -> its state as JSON, every second
    {mm}:players         hash: user id -> ticket id, or "r:<raid id>"
    {mm}:raid_until      sorted set: raid id -> when its players are free again
    {mm}:raid_members    hash: raid id -> its players
    {mm}:ticket_parties  hash: ticket id -> "code version" of the party
                         it was queued as (a party's ticket only)

A pass takes the oldest ticket and fills a raid with the next compatible
ones in order; then the next oldest, and so on.  Tickets are compatible in
the same group, or in neighbouring groups once either has waited
C{widen_after}.  The process whose pass formed a raid hosts it, and keeps
a lease while it lives; when the lease lapses (the host died), the raid is
ended as failed by whichever process notices first, and its players are
free.  Hosts and the others compare their clocks here: keep them in sync
well within C{host_lease}.  Each lease carries its server's client
address, so session servers hand players only to game servers alive
(L{GameServers}).  A ticket names the server that queued it (its leader's),
and a pass drops the tickets of servers whose lease lapsed: a game server
that died leaves no players behind in the queue.
"""

import json
import string
from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.failurelog import REDIS_ERRORS, FailureLog
from dreamraid.services.livestore import profile_key
from dreamraid.services.rediscluster import LUA_SPLIT, Script

GROUPS = 6
# Tickets of each group a pass looks at, oldest first.
SCAN = 100
MATCHMAKING = "matchmaking"
# The matchmaking push telling a ticket's members it no longer waits.
CANCELLED = {"state": "cancelled", "group": 0}
# A server whose lease lapsed this long ago (ms) is taken off the leases.
FORGET_SERVER_AFTER_MS = 3_600_000
# The tickets of a server whose lease lapsed this long ago (ms) are dropped:
# longer than a failover of the matchmaking slot (7-8 s here), during which
# no server can renew, so that one does not drop every other server's.
TICKET_GRACE_MS = 30_000


def _queued_as(party):
    """What a ticket records of the party it holds: C{"code version"}, or '' for a player alone."""
    return f"{party.code} {party.version}" if party else ""


def level_group(level):
    """Levels 1-2 group 1, 3-5 group 2, ... 15 group 6."""
    return level // 3 + 1


def matchmaking_keys(prefix):
    """Every key of the matchmaking under C{prefix}, as the scripts take them."""
    tag = f"{{{prefix}}}"
    return ([f"{tag}:queue:{g}" for g in range(1, GROUPS + 1)]
            + [f"{tag}:{name}" for name in ("tickets", "players", "raid_until", "raid_members", "order", "raid_host",
                                            "leases", "checkpoints", "servers", "ticket_parties")])


# KEYS: the queues of groups 1..6, tickets, players, raid_until, raid_members,
# order, raid_host, leases, checkpoints, servers, ticket_parties.
_LIBRARY = LUA_SPLIT + """
local G = %d
local TICKETS, PLAYERS, UNTIL, MEMBERS, ORDER = KEYS[G + 1], KEYS[G + 2], KEYS[G + 3], KEYS[G + 4], KEYS[G + 5]
local HOSTS, LEASES, CHECKPOINTS, SERVERS = KEYS[G + 6], KEYS[G + 7], KEYS[G + 8], KEYS[G + 9]
local PARTIES = KEYS[G + 10]
-- The raid is over: its players are free, its records gone.
local function forget_raid(raid)
  local members = redis.call('HGET', MEMBERS, raid) or ''
  for _, m in ipairs(split(members)) do
    if redis.call('HGET', PLAYERS, m) == 'r:' .. raid then redis.call('HDEL', PLAYERS, m) end
  end
  redis.call('ZREM', UNTIL, raid)
  redis.call('HDEL', MEMBERS, raid)
  redis.call('HDEL', HOSTS, raid)
  redis.call('HDEL', CHECKPOINTS, raid)
  return members
end
-- A ticket's server, or '' for one queued before tickets named it.
local function ticket_server(t)
  if #t == 5 + tonumber(t[4]) then return t[5] end
  return ''
end
local function drop_ticket(id)
  local t = split(redis.call('HGET', TICKETS, id))
  redis.call('ZREM', KEYS[tonumber(t[1])], id)
  redis.call('HDEL', TICKETS, id)
  redis.call('HDEL', PARTIES, id)
  local members = {}
  for i = #t - tonumber(t[4]) + 1, #t do members[#members + 1] = t[i] end
  return members
end
""" % GROUPS

# ARGV: ticket id, group, now ms, server id, lease ms, the party's "code
# version" (or '' for a player alone), members...  {1}, or {-1, member}
# when a member already waits or raids.  The queuing server is alive: its
# lease is renewed.
_ENQUEUE = _LIBRARY + """
for i = 7, #ARGV do
  if redis.call('HEXISTS', PLAYERS, ARGV[i]) == 1 then return {-1, ARGV[i]} end
end
local members = {}
for i = 7, #ARGV do
  redis.call('HSET', PLAYERS, ARGV[i], ARGV[1])
  members[#members + 1] = ARGV[i]
end
if ARGV[6] ~= '' then redis.call('HSET', PARTIES, ARGV[1], ARGV[6]) end
local order = redis.call('INCR', ORDER)
redis.call('HSET', TICKETS, ARGV[1], table.concat({ARGV[2], ARGV[3], order, #members, ARGV[4], unpack(members)}, ' '))
redis.call('ZADD', KEYS[tonumber(ARGV[2])], ARGV[3], ARGV[1])
redis.call('ZADD', LEASES, 'GT', tonumber(ARGV[3]) + tonumber(ARGV[5]), ARGV[4])
return {1}
"""

# ARGV: a party's code and version, or '' and '', then user ids.  Takes
# out the waiting ticket of each user (a party's is found through any of
# its members), but not one queued as that party at that version or later:
# {tickets taken out, their members...}.
_CANCEL = _LIBRARY + """
local count, members = 0, {}
for i = 3, #ARGV do
  local user = ARGV[i]
  local id = redis.call('HGET', PLAYERS, user)
  if id and string.sub(id, 1, 2) ~= 'r:' then
    local queued_as = split(redis.call('HGET', PARTIES, id) or '')
    if redis.call('HEXISTS', TICKETS, id) == 0 then
      redis.call('HDEL', PLAYERS, user)
    elseif ARGV[1] ~= '' and queued_as[1] == ARGV[1] and tonumber(queued_as[2]) >= tonumber(ARGV[2]) then
      -- queued as the party is now: a change after this one's withdraws it
    else
      count = count + 1
      for _, m in ipairs(drop_ticket(id)) do
        redis.call('HDEL', PLAYERS, m)
        members[#members + 1] = m
      end
    end
  end
end
return {count, unpack(members)}
"""

# ARGV: ticket id.  Takes out that ticket if it still waits: {1, members...}, else {0}.
_CANCEL_TICKET = _LIBRARY + """
if redis.call('HEXISTS', TICKETS, ARGV[1]) == 0 then return {0} end
local members = drop_ticket(ARGV[1])
for _, m in ipairs(members) do
  if redis.call('HGET', PLAYERS, m) == ARGV[1] then redis.call('HDEL', PLAYERS, m) end
end
return {1, unpack(members)}
"""

# ARGV: now ms, raid size, widen ms, new raid id, raid lasts ms, scan, server
# id, lease ms, ticket grace ms.
# Frees the players of raids past their time, drops the tickets of servers
# whose lease lapsed over ticket grace ms ago and passes over those whose
# lease lapsed since (this server's is renewed first: it is alive), then
# forms at most one raid: {0, dropped}, or {1, dropped, raid id,
# "group:waited ms ..." of its tickets, members...}, where dropped is the
# space-separated players of the tickets dropped.
_MATCH = _LIBRARY + """
local now, size, widen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', LEASES, 'GT', now + tonumber(ARGV[8]), ARGV[7])
for _, raid in ipairs(redis.call('ZRANGEBYSCORE', UNTIL, '-inf', now, 'LIMIT', 0, 100)) do
  forget_raid(raid)
end
-- A server is 'live' (its tickets are matched), 'lapsed' (within the grace:
-- its tickets wait, unmatched) or 'gone' (its tickets are dropped).
local tickets, dropped, servers = {}, {}, {}
for g = 1, G do
  local queued = redis.call('ZRANGE', KEYS[g], 0, tonumber(ARGV[6]) - 1, 'WITHSCORES')
  for i = 1, #queued, 2 do
    local t = split(redis.call('HGET', TICKETS, queued[i]))
    local server = ticket_server(t)
    if servers[server] == nil then
      local lease = redis.call('ZSCORE', LEASES, server)
      if lease and tonumber(lease) >= now then servers[server] = 'live'
      elseif lease and tonumber(lease) >= now - tonumber(ARGV[9]) then servers[server] = 'lapsed'
      else servers[server] = 'gone' end
    end
    if servers[server] == 'live' then
      tickets[#tickets + 1] = {id = queued[i], group = g, at = tonumber(queued[i + 1]), order = tonumber(t[3]),
                               size = tonumber(t[4])}
    elseif servers[server] == 'gone' then
      for _, m in ipairs(drop_ticket(queued[i])) do
        redis.call('HDEL', PLAYERS, m)
        dropped[#dropped + 1] = m
      end
    end
  end
end
dropped = table.concat(dropped, ' ')
table.sort(tickets, function(a, b)
  if a.at ~= b.at then return a.at < b.at end
  return a.order < b.order
end)
for i, anchor in ipairs(tickets) do
  local chosen, total = {anchor}, anchor.size
  local anchor_wide = now - anchor.at >= widen
  for j, other in ipairs(tickets) do
    if total == size then break end
    if j ~= i and total + other.size <= size then
      local gap = math.abs(other.group - anchor.group)
      if gap == 0 or (gap == 1 and (anchor_wide or now - other.at >= widen)) then
        chosen[#chosen + 1] = other
        total = total + other.size
      end
    end
  end
  if total == size then
    local members, waits = {}, {}
    for _, t in ipairs(chosen) do
      waits[#waits + 1] = t.group .. ':' .. (now - t.at)
      for _, m in ipairs(drop_ticket(t.id)) do
        members[#members + 1] = m
        redis.call('HSET', PLAYERS, m, 'r:' .. ARGV[4])
      end
    end
    redis.call('ZADD', UNTIL, now + tonumber(ARGV[5]), ARGV[4])
    redis.call('HSET', MEMBERS, ARGV[4], table.concat(members, ' '))
    redis.call('HSET', HOSTS, ARGV[4], ARGV[7])
    return {1, dropped, ARGV[4], table.concat(waits, ' '), unpack(members)}
  end
end
return {0, dropped}
"""


# ARGV: raid id.  Frees its players (if still marked with this raid).
_RELEASE = _LIBRARY + """
forget_raid(ARGV[1])
return 1
"""

# ARGV: server id, until ms, its client address, then raid id and checkpoint
# pairs.  Renews the host's lease, records its address (once: a server id is
# one process, at one address, so no write each tick), and stores its
# raids' checkpoints: the ids
# of those raids no longer this host's (ended by another server, or lost
# with Redis's data).
_RENEW = _LIBRARY + """
redis.call('ZADD', LEASES, ARGV[2], ARGV[1])
redis.call('HSETNX', SERVERS, ARGV[1], ARGV[3])
local gone = {}
for i = 4, #ARGV, 2 do
  if redis.call('HGET', HOSTS, ARGV[i]) == ARGV[1] then
    redis.call('HSET', CHECKPOINTS, ARGV[i], ARGV[i + 1])
  else
    gone[#gone + 1] = ARGV[i]
  end
end
return gone
"""

# ARGV: now ms, forget ms.  Ends the raids whose host's lease has lapsed (at
# most 100 a call): {raid id, its players (space-separated), ...}.  Forgets
# (at most 100 a call) servers whose lease lapsed over forget ms ago.
_REAP = _LIBRARY + """
local now, reaped = tonumber(ARGV[1]), {}
for _, server in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)) do
  redis.call('ZREM', LEASES, server)
  redis.call('HDEL', SERVERS, server)
end
local hosts = redis.call('HGETALL', HOSTS)
for i = 1, #hosts, 2 do
  if #reaped >= 200 then break end
  local lease = redis.call('ZSCORE', LEASES, hosts[i + 1])
  if not lease or tonumber(lease) < now then
    reaped[#reaped + 1] = hosts[i]
    reaped[#reaped + 1] = forget_raid(hosts[i])
  end
end
return reaped
"""


class Formed(NamedTuple):
    """A raid a pass formed: its id and players, hosted by the process that formed it."""

    raid_id: str
    members: list


class Matchmaker(Service):
    """
    Queues tickets and forms raids: a pass after each new ticket and every
    C{match_interval}.  Each raid formed here goes to C{on_formed(Formed)}
    (the raid host, which tells its players).
    """

    _log = Logger()

    def __init__(self, router, presence, parties, clock, random, settings, raid_lasts, on_formed):
        """
        @param raid_lasts: seconds after forming when a raid's players are
            free to queue again even if no one says the raid ended.
        """
        self._router = router
        self._presence = presence
        self._parties = parties
        self._clock = clock
        self._random = random
        self._size = settings.raid_size
        self._widen_ms = int(settings.widen_after * 1000)
        self._interval = settings.match_interval
        self._lasts_ms = int(raid_lasts * 1000)
        self._lease_ms = int(settings.host_lease * 1000)
        self._on_formed = on_formed
        self._keys = matchmaking_keys(settings.matchmaking_prefix)
        self.waited = None  # or a histogram, labelled by group, of the seconds formed raids' tickets waited
        self._enqueue = Script(router, _ENQUEUE)
        self._cancel = Script(router, _CANCEL)
        self._cancel_ticket = Script(router, _CANCEL_TICKET)
        self._match = Script(router, _MATCH)
        self._release = Script(router, _RELEASE)
        self._renew = Script(router, _RENEW)
        self._reap = Script(router, _REAP)
        self._passes = None
        self._in_flight = set()  # the Deferreds of passes under way
        self._failures = FailureLog(self._log, clock)

    def startService(self):
        super().startService()
        self._passes = task.LoopingCall(self._kick)
        self._passes.clock = self._clock
        self._passes.start(self._interval, now=False)

    def stopService(self):
        """Stop the timer; fires once the passes under way are over, so no raid they form is dropped."""
        super().stopService()
        if self._passes.running:
            self._passes.stop()
        return self.passes_done()

    def _kick(self):
        """Start a pass (from the timer, or after a ticket); its Deferred, which does not fail."""
        d = defer.ensureDeferred(self._pass_logged())
        self._in_flight.add(d)
        d.addBoth(lambda result: (self._in_flight.discard(d), result)[1])
        return d

    def passes_done(self):
        """A Deferred that fires once every pass under way now has ended."""
        return defer.DeferredList(list(self._in_flight)).addCallback(lambda _: None)

    def _now_ms(self):
        return int(self._clock.seconds() * 1000)

    def _new_id(self):
        return "".join(self._random.choice(string.ascii_lowercase + string.digits) for _ in range(16))

    async def enqueue(self, user_id):
        """
        Queue the user's party (the user must lead it) or the user alone;
        the level group.  The other members are told.

        The party is read before its ticket is written, in another slot, so
        the ticket records the party's version, and the party is read again
        once the ticket waits: if it changed in between (a join, a leave),
        the ticket is taken out, whoever was told it was queued is told it
        is not, and the request is refused.  A change after that second
        read takes the ticket out itself (L{withdraw}).

        @raise RequestRefused: NOT_PARTY_LEADER, ALREADY_QUEUED, PARTY_CHANGED_WHILE_QUEUEING.
        """
        party = await self._led_party(user_id)
        members = [u for u, _ in party.members] if party else [user_id]
        levels = await gather([self._router.execute("HGET", profile_key(u), "level") for u in members])
        group = level_group(max(int(level or 1) for level in levels))
        ticket = self._new_id()
        reply = await self._enqueue(self._keys, [ticket, group, self._now_ms(), self._presence.server_id,
                                                 self._lease_ms, _queued_as(party), *members])
        if reply[0] != 1:
            raise RequestRefused(ErrorCode.ALREADY_QUEUED)
        others = [u for u in members if u != user_id]
        try:
            await self._presence.tell(others, MATCHMAKING, {"state": "queued", "group": group})
            changed = _queued_as(await self._parties.party_of(user_id)) != _queued_as(party)
        except REDIS_ERRORS:
            # Whether the party changed cannot be told: a request refused UNAVAILABLE leaves no ticket.
            await self._take_out_unconfirmed(ticket, others)
            raise
        if changed:
            await self._cancel_ticket(self._keys, [ticket])
            # After the queued push, so that one is not the last they hear.
            await self._presence.tell(others, MATCHMAKING, CANCELLED)
            raise RequestRefused(ErrorCode.PARTY_CHANGED_WHILE_QUEUEING)
        # A pass right after this request's reply, not before it.
        self._clock.callLater(0, self._kick)
        return group

    async def _take_out_unconfirmed(self, ticket, others):
        """An enqueue that failed after writing C{ticket}: take it out, and tell C{others}; failures are logged."""
        try:
            await self._cancel_ticket(self._keys, [ticket])
            await self._presence.tell(others, MATCHMAKING, CANCELLED)
        except REDIS_ERRORS as e:
            self._log.warn("matchmaking: ticket {ticket} was queued by a request that failed, and may still wait: "
                           "{error}", ticket=ticket, error=e)

    async def _led_party(self, user_id):
        """The user's L{Party}, or None.  @raise RequestRefused: NOT_PARTY_LEADER."""
        party = await self._parties.party_of(user_id)
        if party is not None and party.leader != user_id:
            raise RequestRefused(ErrorCode.NOT_PARTY_LEADER, "the party's leader queues it")
        return party

    async def cancel(self, user_id):
        """Take the user's waiting ticket out of the queue; its members are told.  @raise RequestRefused: NOT_QUEUED."""
        reply = await self._cancel(self._keys, ["", "", user_id])
        if reply[0] == 0:
            raise RequestRefused(ErrorCode.NOT_QUEUED)
        members = [int(m) for m in reply[1:]]
        await self._presence.tell([u for u in members if u != user_id], MATCHMAKING, CANCELLED)

    async def withdraw(self, user_ids, party=None):
        """
        The one way a party change (a join, a leave, a kick) or a player
        leaving the game takes tickets out of the queue: take out the
        waiting ticket of each of C{user_ids} (a party's is found through
        any of its members) unless it was queued as C{party} (the
        L{Party} as the change left it, or None) or a later version of
        it, and tell every member of each ticket taken out, and every
        member of C{party}, C{matchmaking: cancelled}, on whichever
        process holds them.  Call it after the change: a ticket queued
        before the change is then taken out here, one queued after it is
        the party as it is (L{enqueue}).  Never raises (a failure is
        logged); whether a ticket was taken out.
        """
        user_ids = list(user_ids)
        stamp = [party.code, party.version] if party else ["", ""]
        try:
            reply = await self._cancel(self._keys, [*stamp, *user_ids])
        except REDIS_ERRORS as e:
            self._log.warn("users {user_ids}: their party changed or they left, but their ticket may still wait: "
                           "{error}", user_ids=user_ids, error=e)
            return False
        if reply[0] == 0:
            return False
        members = [int(m) for m in reply[1:]] + [u for u, _ in (party.members if party else [])]
        told = list(dict.fromkeys(members))
        try:
            await self._presence.tell(told, MATCHMAKING, CANCELLED)
        except REDIS_ERRORS as e:
            self._log.warn("matchmaking: cannot tell users {user_ids} their ticket was withdrawn: {error}",
                           user_ids=told, error=e)
        return True

    async def place_of(self, user_id):
        """
        Where the user is in matchmaking now: C{("queued", level group)},
        C{("raid", raid id, server id of its host or '')}, or None.
        """
        players, tickets, hosts = self._keys[GROUPS + 1], self._keys[GROUPS], self._keys[GROUPS + 5]
        place = await self._router.execute("HGET", players, user_id)
        if place is None:
            return None
        place = place.decode()
        if place.startswith("r:"):
            host = await self._router.execute("HGET", hosts, place[2:])
            return "raid", place[2:], (host or b"").decode()
        ticket = await self._router.execute("HGET", tickets, place)
        return None if ticket is None else ("queued", int(ticket.split()[0]))

    async def checkpoint(self, raid_id):
        """The raid's last checkpoint (stage, hp, sequence, deadline, scores by user id text), or None."""
        state = await self._router.execute("HGET", self._keys[GROUPS + 7], raid_id)
        return None if state is None else json.loads(state)

    async def queue_lengths(self):
        """C{{level group: tickets waiting}}, every group."""
        counts = await gather([self._router.execute("ZCARD", key) for key in self._keys[:GROUPS]])
        return dict(zip(range(1, GROUPS + 1), counts))

    async def release(self, raid_id):
        """The raid ended: its players may queue again."""
        await self._release(self._keys, [raid_id])

    async def renew(self, server_id, address, checkpoints):
        """
        The host C{server_id}, which clients reach at C{address}
        (C{host:port}), is alive for another C{host_lease}; C{checkpoints}:
        C{{raid id: JSON state}}.  The ids among them of raids no longer this
        host's (another server ended them when this host's lease lapsed, or
        Redis lost them).
        """
        args = [server_id, self._now_ms() + self._lease_ms, address]
        for raid_id, state in checkpoints.items():
            args += [raid_id, state]
        return [raid_id.decode() for raid_id in await self._renew(self._keys, args)]

    async def reap(self):
        """End the raids of hosts whose lease lapsed; C{[(raid id, [players])]}, freed already."""
        reply = await self._reap(self._keys, [self._now_ms(), FORGET_SERVER_AFTER_MS])
        return [(reply[i].decode(), [int(m) for m in reply[i + 1].split()]) for i in range(0, len(reply), 2)]

    async def run_pass(self):
        """
        Form every raid the queues allow now; the L{Formed} raids, each
        handed to C{on_formed}.  The members of tickets dropped because
        their server's lease lapsed are told their ticket was cancelled.
        """
        formed = []
        while True:
            reply = await self._match(self._keys, [self._now_ms(), self._size, self._widen_ms, self._new_id(),
                                                   self._lasts_ms, SCAN, self._presence.server_id, self._lease_ms,
                                                   TICKET_GRACE_MS])
            if reply[0] == 1:
                raid = Formed(reply[2].decode(), [int(m) for m in reply[4:]])
                formed.append(raid)
                if self.waited is not None:
                    for wait in reply[3].split():
                        group, waited_ms = wait.split(b":")
                        self.waited.labels(group.decode()).observe(int(waited_ms) / 1000)
                self._on_formed(raid)
            dropped = [int(m) for m in reply[1].split()]
            if dropped:
                await self._tell_dropped(dropped)
            if reply[0] != 1:
                return formed

    async def _tell_dropped(self, user_ids):
        """Tell the players of tickets dropped (their server stopped renewing) that they were cancelled; logged."""
        self._log.info("matchmaking: dropped the tickets of users {user_ids}, whose server stopped renewing",
                       user_ids=user_ids)
        try:
            await self._presence.tell(user_ids, MATCHMAKING, CANCELLED)
        except REDIS_ERRORS as e:
            self._log.warn("matchmaking: cannot tell users {user_ids} their tickets were dropped: {error}",
                           user_ids=user_ids, error=e)

    async def _pass_logged(self):
        """A pass from the timer or after a ticket: a failure is logged and the next pass tries again."""
        try:
            await self.run_pass()
        except Exception:
            self._failures.failed("matchmaking: a pass failed")


class GameServers:
    """
    The game servers a session server hands players to: those of the
    configured C{(host, port)}s whose lease is fresh (each game server's
    renewal records the address it gives clients), read at most every
    C{refresh} seconds.  When none is known alive (none registered under
    this matchmaking prefix, or Redis unreadable), every configured one.
    """

    _log = Logger()

    def __init__(self, router, clock, prefix, configured, refresh=1.0):
        self._router = router
        self._clock = clock
        keys = matchmaking_keys(prefix)
        self._leases, self._servers = keys[GROUPS + 6], keys[GROUPS + 8]
        self.configured = list(configured)
        self._refresh = refresh
        self._read_at = None
        self._alive = []
        self._failures = FailureLog(self._log, clock)

    async def alive(self):
        """The configured game servers alive now (a non-empty list of C{(host, port)})."""
        now = self._clock.seconds()
        if self._read_at is None or now - self._read_at >= self._refresh:
            self._read_at = now
            try:
                self._alive = await self._read(now)
            except REDIS_ERRORS:
                self._failures.failed("game servers: cannot read which are alive; handing out every configured one")
                self._alive = []
        return self._alive or self.configured

    async def _read(self, now):
        fresh = set(await self._router.execute("ZRANGEBYSCORE", self._leases, int(now * 1000), "+inf"))
        flat = await self._router.execute("HGETALL", self._servers)
        addresses = {flat[i + 1].decode() for i in range(0, len(flat), 2) if flat[i] in fresh}
        return [(host, port) for host, port in self.configured if f"{host}:{port}" in addresses]
