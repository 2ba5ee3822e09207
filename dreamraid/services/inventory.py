"""
Progression and inventory: hunting (exp, level-ups, drops) and every
inventory change, each one Lua script on the user's slot, so two requests
racing (on one process or two) can never duplicate or lose an item.

The server decides everything: the rolls come from the injected random
source and go into the scripts as numbers; the client only names slots.
Every change adds one to the profile's C{version} (see L{livestore}).

What a player is told is what is stored: a reply lists every slot the
change touched, with what it holds after it.  Drops (a hunt's, a raid's)
go in as far as they fit, and what has no room is lost and never listed; a
grant is all or nothing.

Inside the scripts an item is the text C{code:enhancement:count}.
"""

from typing import NamedTuple

from twisted.internet import defer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.livestore import CONSUMABLES, EQUIPMENT, TABS, data_keys, raid_mark_key, raid_receipt_key
from dreamraid.services.rediscluster import Script

# Shared by the scripts below: parse an item, count the room for an item in
# a tab, add items of one code to a tab (first topping up stacks of that
# code, then the lowest free slots; the count that did not fit is returned),
# and report changed slots.  KEYS[1] is always the profile, KEYS[2 + tab] the tabs.
_LIBRARY = """
local function parse(text)
  local code, enhancement, count = string.match(text, '(%d+):(%d+):(%d+)')
  return tonumber(code), tonumber(enhancement), tonumber(count)
end
local changed = {}
local function touch(tab, slot)
  changed[#changed + 1] = tab
  changed[#changed + 1] = slot
  changed[#changed + 1] = redis.call('HGET', KEYS[2 + tab], slot) or ''
end
local function add(tab, code, count, stack, slots)
  local key = KEYS[2 + tab]
  if stack > 1 then
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      local c, e, n = parse(all[i + 1])
      if count > 0 and c == code and n < stack then
        local put = math.min(stack - n, count)
        redis.call('HSET', key, all[i], code .. ':0:' .. (n + put))
        count = count - put
        touch(tab, tonumber(all[i]))
      end
    end
  end
  for slot = 0, slots - 1 do
    if count <= 0 then break end
    if redis.call('HEXISTS', key, slot) == 0 then
      local put = math.min(stack, count)
      redis.call('HSET', key, slot, code .. ':' .. 0 .. ':' .. put)
      count = count - put
      touch(tab, slot)
    end
  end
  return count
end
-- How many of an item fit in a tab: the room left in the stacks of its code,
-- then a full stack in each free slot.
local function room(tab, code, stack, slots)
  local all = redis.call('HGETALL', KEYS[2 + tab])
  local fits = slots * stack
  for i = 1, #all, 2 do
    if tonumber(all[i]) < slots then fits = fits - stack end
    local c, e, n = parse(all[i + 1])
    if stack > 1 and c == code and n < stack then fits = fits + stack - n end
  end
  return fits
end
local function changed_version()
  redis.call('HINCRBY', KEYS[1], 'version', 1)
end
-- Add exp and apply every level-up it allows; the threshold to leave level
-- L is ARGV[first + L - 1].  Returns exp, level, levels gained.
local function gain(amount, max_level, n, first)
  local exp = redis.call('HINCRBY', KEYS[1], 'exp', amount)
  local level = tonumber(redis.call('HGET', KEYS[1], 'level'))
  local gained = 0
  while level < max_level and level <= n and exp >= tonumber(ARGV[first + level - 1]) do
    level = level + 1
    gained = gained + 1
  end
  if gained > 0 then redis.call('HSET', KEYS[1], 'level', level) end
  return exp, level, gained
end
"""

# ARGV: now ms, cooldown ms, exp, max level, slots, #thresholds, thresholds...,
# then per drop: item code, tab, count, stack.
# {-1} while cooling down, else {exp, level, levels gained, changed...}.
_HUNT = _LIBRARY + """
local now, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
local ready = tonumber(redis.call('HGET', KEYS[1], 'hunt_ready') or '0')
if now < ready then return {-1} end
redis.call('HSET', KEYS[1], 'hunt_ready', now + cooldown)
local slots, n = tonumber(ARGV[5]), tonumber(ARGV[6])
local exp, level, gained = gain(tonumber(ARGV[3]), tonumber(ARGV[4]), n, 7)
for i = 7 + n, #ARGV, 4 do
  add(tonumber(ARGV[i + 1]), tonumber(ARGV[i]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), slots)
end
changed_version()
local reply = {exp, level, gained}
for i = 1, #changed do reply[#reply + 1] = changed[i] end
return reply
"""

# KEYS: the user's data keys, then their raid mark and raid receipt.  ARGV:
# raid id, receipt ttl ms, exp, score, max level, slots, #thresholds,
# thresholds..., then per drop: item code, tab, count, stack.  Pays only while
# the mark names this raid, and takes the mark off as it pays: the answer,
# {exp, level, levels gained, best, changed...}, is kept as the receipt, and
# a call again (its first reply lost) gets it back without paying twice.
# {-8} (NOT_MARKED) when the mark names another raid or none and no receipt
# of this raid is kept.  Drops with no room are lost (see _LIBRARY's add).
_REWARD = _LIBRARY + """
local raid = ARGV[1]
if redis.call('GET', KEYS[5]) ~= raid then
  local receipt = redis.call('GET', KEYS[6])
  if receipt and string.sub(receipt, 1, #raid + 1) == raid .. ' ' then
    return cjson.decode(string.sub(receipt, #raid + 2))
  end
  return {-8}
end
redis.call('DEL', KEYS[5])
local slots, n = tonumber(ARGV[6]), tonumber(ARGV[7])
local exp, level, gained = gain(tonumber(ARGV[3]), tonumber(ARGV[5]), n, 8)
local best = tonumber(redis.call('HGET', KEYS[1], 'best') or '0')
if tonumber(ARGV[4]) > best then
  best = tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'best', best)
end
for i = 8 + n, #ARGV, 4 do
  add(tonumber(ARGV[i + 1]), tonumber(ARGV[i]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), slots)
end
changed_version()
local reply = {exp, level, gained, best}
for i = 1, #changed do reply[#reply + 1] = changed[i] end
redis.call('SET', KEYS[6], raid .. ' ' .. cjson.encode(reply), 'PX', ARGV[2])
return reply
"""

# ARGV: tab, slot.  {0} if empty, else {1, changed...}.
_DELETE = _LIBRARY + """
local tab, slot = tonumber(ARGV[1]), ARGV[2]
if redis.call('HDEL', KEYS[2 + tab], slot) == 0 then return {0} end
touch(tab, tonumber(slot))
changed_version()
return {1, unpack(changed)}
"""

# STACKS (prepended by Inventory): item code -> stack size, for the codes
# that stack.  ARGV: tab, from, to.  {0} if from is empty, else {1, changed...}.
_MOVE = _LIBRARY + """
local tab, from, to = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local key = KEYS[2 + tab]
local moving = redis.call('HGET', key, from)
if not moving then return {0} end
local code, enhancement, count = parse(moving)
local stack = STACKS[code] or 1
local target = redis.call('HGET', key, to)
if from == to then return {1} end
if not target then
  redis.call('HSET', key, to, moving)
  redis.call('HDEL', key, from)
else
  local c, e, n = parse(target)
  if c == code and stack > 1 and n < stack then
    local put = math.min(stack - n, count)
    redis.call('HSET', key, to, c .. ':0:' .. (n + put))
    if count - put > 0 then
      redis.call('HSET', key, from, code .. ':0:' .. (count - put))
    else
      redis.call('HDEL', key, from)
    end
  else
    redis.call('HSET', key, to, moving)
    redis.call('HSET', key, from, target)
  end
end
touch(tab, tonumber(from))
touch(tab, tonumber(to))
changed_version()
return {1, unpack(changed)}
"""

# KIND (prepended by Inventory): the codes the tables call consumables.
# ARGV: slot of the consumables tab.  {0} if empty, {-2} if its item is not a
# consumable (the tables changed), else {1, code, changed...}.
_USE = _LIBRARY + """
local key, slot = KEYS[3], ARGV[1]
local item = redis.call('HGET', key, slot)
if not item then return {0} end
local code, enhancement, count = parse(item)
if not KIND[code] then return {-2} end
if count > 1 then
  redis.call('HSET', key, slot, code .. ':0:' .. (count - 1))
else
  redis.call('HDEL', key, slot)
end
touch(1, tonumber(slot))
changed_version()
return {1, code, unpack(changed)}
"""

# KIND (prepended by Inventory): the codes the tables call equipment.
# ARGV: slot of the equipment tab, a roll from 0 to 99, the max level, then
# the success percent at each level from 0.  {0} empty, {-2} not equipment
# (the tables changed), {-1, level} at the max, else {1 or 2 (failed), the
# level now}.
_ENHANCE = _LIBRARY + """
local key, slot = KEYS[2], ARGV[1]
local item = redis.call('HGET', key, slot)
if not item then return {0} end
local code, enhancement, count = parse(item)
if not KIND[code] then return {-2} end
local max = tonumber(ARGV[3])
if enhancement >= max then return {-1, enhancement} end
if tonumber(ARGV[2]) >= tonumber(ARGV[4 + enhancement]) then return {2, enhancement} end
redis.call('HSET', key, slot, code .. ':' .. (enhancement + 1) .. ':' .. count)
changed_version()
return {1, enhancement + 1}
"""

# ARGV: tab, code, count, stack, slots.  All or nothing: {how many do not
# fit} changing nothing, or {0, changed...}.
_GRANT = _LIBRARY + """
local tab, code, count, stack, slots = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                       tonumber(ARGV[4]), tonumber(ARGV[5])
local fits = room(tab, code, stack, slots)
if count > fits then return {count - fits} end
add(tab, code, count, stack, slots)
changed_version()
return {0, unpack(changed)}
"""

# A user's data is live on a game server while its profile exists; scripts on
# a user whose data is gone (unloaded) would recreate keys out of nothing, so
# every change first checks it.
_LIVE_CHECK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-9} end
"""
NOT_LIVE = -9
NOT_MARKED = -8
WRONG_KIND = -2


class SlotItem(NamedTuple):
    """One slot's content; C{code} 0 for an emptied slot."""

    tab: int
    slot: int
    item_code: int
    enhancement: int
    count: int


class Hunted(NamedTuple):
    exp_gained: int
    level: int
    exp: int
    levels_gained: int
    changed: list


class Rewarded(NamedTuple):
    """What a raid paid one player: exp, the level after, levels gained, the best score now, slots changed."""

    exp_gained: int
    level: int
    exp: int
    levels_gained: int
    best: int
    changed: list


class Enhanced(NamedTuple):
    slot: int
    success: bool
    enhancement: int


def _changed(flat):
    """L{SlotItem}s of a script's C{tab, slot, item text} triples."""
    items = []
    for i in range(0, len(flat), 3):
        text = flat[i + 2]
        code, enhancement, count = (int(x) for x in text.split(b":")) if text else (0, 0, 0)
        items.append(SlotItem(int(flat[i]), int(flat[i + 1]), code, enhancement, count))
    return items


def _live(reply):
    if reply[0] == NOT_LIVE:
        raise RequestRefused(ErrorCode.SESSION_NOT_LIVE, "the user's data is no longer live")
    return reply


def _slots_changed(reply, skip=1):
    """
    The changed slots after the reply's first C{skip} values; EMPTY_SLOT
    when the script found nothing, WRONG_ITEM_KIND when the item is not of
    the kind the request takes.
    """
    if reply[0] == 0:
        raise RequestRefused(ErrorCode.EMPTY_SLOT)
    if reply[0] == WRONG_KIND:
        raise RequestRefused(ErrorCode.WRONG_ITEM_KIND)
    return _changed(reply[skip:])


def _hunted(reply, exp):
    if reply[0] == -1:
        raise RequestRefused(ErrorCode.HUNT_COOLDOWN)
    return Hunted(exp, int(reply[1]), int(reply[0]), int(reply[2]), _changed(reply[3:]))


def _rewarded(reply, exp):
    if reply[0] == NOT_MARKED:
        return None
    return Rewarded(exp, int(reply[1]), int(reply[0]), int(reply[2]), int(reply[3]), _changed(reply[4:]))


def _enhanced(reply, slot):
    if reply[0] == 0:
        raise RequestRefused(ErrorCode.EMPTY_SLOT)
    if reply[0] == WRONG_KIND:
        raise RequestRefused(ErrorCode.WRONG_ITEM_KIND, "only equipment is enhanced")
    if reply[0] == -1:
        raise RequestRefused(ErrorCode.MAX_ENHANCEMENT)
    return Enhanced(slot, reply[0] == 1, int(reply[1]))


def _granted(reply):
    if reply[0] > 0:
        raise RequestRefused(ErrorCode.INVENTORY_FULL, f"{reply[0]} would not fit")
    return _changed(reply[1:])


def _listed(replies):
    items = []
    for tab, flat in zip(TABS, replies):
        items += _changed([v for i in range(0, len(flat), 2) for v in (tab, flat[i], flat[i + 1])])
    return sorted(items)


def _kind_table(tables, tab):
    """The Lua table C{KIND}: the item codes the tables put in C{tab}."""
    codes = ", ".join(f"[{code}] = true" for code, kind in sorted(tables.items.items()) if kind.tab == tab)
    return f"local KIND = {{{codes}}}\n"


class Inventory:
    """
    Hunting and inventory changes of live users, by the game tables, with
    server-side rolls.  Each method returns a Deferred, failed with
    L{RequestRefused} when the request breaks a rule: these are the game
    server's hot path, so they are plain callback chains, not coroutines.
    """

    def __init__(self, router, tables, clock, random):
        self._router = router
        self._tables = tables
        self._clock = clock
        self._random = random
        # A merge needs the stack size of whatever is in the slot, so the
        # move script carries the stack table: one script call per move.
        stacks = ", ".join(f"[{code}] = {kind.stack}" for code, kind in sorted(tables.items.items()) if kind.stack > 1)
        move = f"local STACKS = {{{stacks}}}\n" + _MOVE
        # Use and enhance take only items the tables (which may have changed
        # since an item was stored) put in the tab they work on.
        use, enhance = (_kind_table(tables, CONSUMABLES) + _USE, _kind_table(tables, EQUIPMENT) + _ENHANCE)
        # By name, for benchmarks that call a script without the service around it.
        self.scripts = {name: Script(router, _LIVE_CHECK + source) for name, source in (
            ("hunt", _HUNT), ("reward", _REWARD), ("delete", _DELETE), ("move", move), ("use", use), ("enhance", enhance),
            ("grant", _GRANT))}
        t = tables
        self._thresholds = [t.exp_to_advance[level] for level in range(1, t.max_level)]
        self._chances = [t.enhance_success_percent[level] for level in range(t.max_enhancement)]

    def _run(self, name, user_id, args):
        return self.scripts[name](data_keys(user_id), args).addCallback(_live)

    def _bad_slot(self, tab, *slots):
        """A failed Deferred for a slot outside the tab (or a tab that does not exist), else None."""
        if tab not in TABS or not all(0 <= slot < self._tables.slots for slot in slots):
            return defer.fail(RequestRefused(ErrorCode.BAD_SLOT))
        return None

    def list(self, user_id):
        """Every occupied slot, as L{SlotItem}s."""
        keys = data_keys(user_id)[1:]
        return defer.ensureDeferred(self._router.transaction([("HGETALL", key) for key in keys])).addCallback(_listed)

    def hunt(self, user_id, monster):
        """Hunt one monster: exp, level-ups and drops rolled here; a L{Hunted}.  Refused: unknown monster, cooldown."""
        t = self._tables
        exp = t.monster_exp.get(monster)
        if exp is None:
            return defer.fail(RequestRefused(ErrorCode.UNKNOWN_MONSTER))
        args = [int(self._clock.seconds() * 1000), t.hunt_cooldown_ms, exp, t.max_level, t.slots,
                len(self._thresholds), *self._thresholds]
        for drop in t.monster_drops.get(monster, ()):
            if self._random.randrange(100) < drop.percent:
                kind = t.items[drop.item]
                args += [drop.item, kind.tab, drop.count, kind.stack]
        return self._run("hunt", user_id, args).addCallback(_hunted, exp)

    def reward(self, user_id, raid_id, score, keep):
        """
        Pay a player of the cleared raid C{raid_id}: exp by their score, the
        table's drops rolled here (what does not fit is lost), and their best
        score raised; a L{Rewarded}.  Pays only while the player's raid mark
        names the raid, and takes it off: calling again (after a reply was
        lost) never pays twice, and answers what the raid paid for C{keep}
        seconds after; C{None} when the raid did not pay them (its mark had
        expired or names another raid).
        """
        t = self._tables
        exp = score * t.raid_exp_per_score
        args = [raid_id, int(keep * 1000), exp, score, t.max_level, t.slots, len(self._thresholds), *self._thresholds]
        for drop in t.raid_drops:
            if self._random.randrange(100) < drop.percent:
                kind = t.items[drop.item]
                args += [drop.item, kind.tab, drop.count, kind.stack]
        keys = [*data_keys(user_id), raid_mark_key(user_id), raid_receipt_key(user_id)]
        return self.scripts["reward"](keys, args).addCallback(_live).addCallback(_rewarded, exp)

    def delete(self, user_id, tab, slot):
        """Empty a slot; the changed slots."""
        return self._bad_slot(tab, slot) or self._run("delete", user_id, [tab, slot]).addCallback(_slots_changed)

    def move(self, user_id, tab, from_slot, to_slot):
        """Move, swap or merge within a tab; the changed slots."""
        return self._bad_slot(tab, from_slot, to_slot) or self._run(
            "move", user_id, [tab, from_slot, to_slot]).addCallback(_slots_changed)

    def use(self, user_id, slot):
        """Use one consumable; the changed slots."""
        return self._bad_slot(CONSUMABLES, slot) or self._run("use", user_id, [slot]).addCallback(_slots_changed, 2)

    def enhance(self, user_id, slot):
        """Roll for one enhancement level of the equipment in C{slot}; an L{Enhanced}."""
        refused = self._bad_slot(EQUIPMENT, slot)
        if refused is not None:
            return refused
        roll = self._random.randrange(100)
        args = [slot, roll, self._tables.max_enhancement, *self._chances]
        return self._run("enhance", user_id, args).addCallback(_enhanced, slot)

    def grant(self, user_id, item_code, count):
        """
        Development only: add C{count} of an item to its tab, all or nothing;
        the changed slots.  Refused with UNKNOWN_ITEM for a code not in the
        tables, BAD_RANGE for a count of 0, and INVENTORY_FULL, changing
        nothing, when they do not all fit.
        """
        kind = self._tables.items.get(item_code)
        if kind is None:
            return defer.fail(RequestRefused(ErrorCode.UNKNOWN_ITEM))
        if count < 1:
            return defer.fail(RequestRefused(ErrorCode.BAD_RANGE, "a grant's count is 1 or more"))
        args = [kind.tab, item_code, count, kind.stack, self._tables.slots]
        return self._run("grant", user_id, args).addCallback(_granted)
