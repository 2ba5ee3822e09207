"""
The raids a game server process hosts: the process whose matchmaking pass
formed a raid runs its fight in memory (L{dreamraid.services.raids.Raid}).

At forming, each player gets (through whichever process holds them) where
the raid is hosted, a handoff ticket to move there, and the raid's UDP
channel: its number, their member number and their own key, which signs
the datagrams they send and those sent to them.  Each member's key is
derived from a secret the host keeps (L{member_keys}), so a member knows
only its own and cannot sign datagrams as another.  Players ready and hit
over TCP on the host; the boss's HP goes out over UDP after every change
and at least once a second, and the players' positions are relayed ten
times a second.  At the end a clear pays (exp, drops, best score, the
ranking board), the players are free to queue again, and each hears the
result.

While a raid runs, its players' data stays live in Redis (a raid mark in
their slot keeps the sync from unloading it), so a player who dropped is
still paid at the end.  A player's pay takes their mark off in the same
script and is paid only while the mark names the raid, so the end can be
retried through Redis failures (a lost reply included) without paying
anyone twice.
"""

import functools
import hashlib
import itertools
import json
from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.failurelog import REDIS_ERRORS, FailureLog
from dreamraid.services.limits import TokenBucket
from dreamraid.services.livestore import profile_key, raid_mark_key, tab_key
from dreamraid.services.players import PLACE_AGAIN
from dreamraid.services.rediscluster import Script
from dreamraid.services.raids import Raid, Stage, hit_damage, longest_life

RAID_FOUND = "raid_found"
RAID_FIGHT = "raid_fight"
RAID_RESULT = "raid_result"
# Seconds a handoff ticket may wait to be used.
HANDOFF_TTL = 30.0
# Each raid's positions are relayed this often.  The raids take turns in
# BUCKETS slices of that time, so a host of many raids sends a little every
# few milliseconds rather than everything at once.
RELAY_INTERVAL = 0.1
BUCKETS = 10
# The boss's HP goes out at least once a second (SPEC).  Without a change
# it is repeated at the raid's first turn HP_REPEAT_AFTER seconds or more
# after it last went to every player: turns come RELAY_INTERVAL apart, so
# the gap is 0.8 to 0.9 s on time, and a reactor running up to 0.1 s late
# still keeps it under a second.  (Repeating once a full second had passed
# made gaps of up to 1.1 s.)
HP_REPEAT_AFTER = 0.8
# Bytes of a raid's secret and of each member's key (the MAC key of its datagrams).
KEY_SIZE = 16
# Each step of a raid's end (a player's pay, the ranking, freeing the
# players) is tried again after a Redis failure, after a pause that starts
# at RETRY_FIRST seconds and doubles up to RETRY_MAX (each with jitter),
# until the raid's longest life has passed: its raid marks are gone by then.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0

# KEYS: a player's raid mark.  ARGV: raid id.  Takes the mark off if it
# still names this raid (a later raid's is left alone).
_UNMARK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def member_keys(secret, count):
    """
    The datagram keys of a raid's C{count} members: member C{m}'s is keyed
    BLAKE2b of the byte C{m} under the raid's C{secret}, which never leaves
    the host.
    """
    return tuple(hashlib.blake2b(bytes([member]), key=secret, digest_size=KEY_SIZE).digest()
                 for member in range(count))


class _Hosted:
    """One raid on this host: the fight, and its UDP channel."""

    def __init__(self, raid, number, keys, members, names, until):
        self.raid = raid
        self.until = until  # when its raid marks have surely expired, on the host's clock
        self.number = number
        self.keys = keys  # member number -> that member's datagram key
        self.members = members  # user ids; a player's index is their member number
        self.names = names
        self.addresses = {}  # member number -> UDP address bound by its hello
        self.last_sequence = {}  # member number -> highest datagram sequence heard
        self.positions = {}  # member number -> (x, y, state)
        self.buckets = {}  # member number -> its TokenBucket of datagrams, when the rate is not off
        self.over_rate = set()  # member numbers logged as sending past the rate
        self.sent = 0  # sequence of the datagrams the host sends
        self.hp_sent_at = 0.0  # when the boss's HP last went to every player
        self.told = {}  # member number -> the authentication (presence holder) last given its place
        self.placing = {}  # member number -> DeferredLock: one place given at a time, in order

    @property
    def over(self):
        """The fight ended (cleared, failed or abandoned): nobody is given a place in it any more."""
        return self.raid.stage in (Stage.CLEARED, Stage.FAILED)

    def checkpoint(self):
        """The raid's state as its checkpoint stores it (JSON)."""
        raid = self.raid
        return json.dumps({"stage": raid.stage.value, "hp": raid.hp, "sequence": raid.sequence,
                           "deadline": raid.deadline, "scores": {str(u): s for u, s in raid.scores.items()}})


class Standing(NamedTuple):
    """A raid as a resumed player is told it: the boss's HP, the ms left of the fight (0: not fighting), their score."""

    raid_id: str
    hp: int
    ms_left: int
    score: int


class Channel(NamedTuple):
    """What the UDP protocol needs to check a raid's datagrams: each member's key, by member number."""

    keys: tuple


class RaidHost(Service):
    """
    Hosts raids formed on this process.  C{udp} and C{udp_address} are set
    by the realtime protocol once it listens; datagrams go out through it.
    """

    _log = Logger()

    def __init__(self, router, presence, players, inventory, ranking, matchmaker, clock, random, settings, address):
        """
        @param matchmaker: the L{dreamraid.services.matchmaking.Matchmaker}
            that keeps the host's lease and frees a raid's players.
        @param address: this server's client address (C{host:port}) for handoffs.
        """
        self._router = router
        self._presence = presence
        self._players = players
        self._inventory = inventory
        self._ranking = ranking
        self._clock = clock
        self._random = random
        self._settings = settings
        self.address = address
        self.udp_address = None
        self._matchmaker = matchmaker
        self._raids = {}  # raid id -> _Hosted
        self._by_number = {}  # raid number -> _Hosted
        self._buckets = [{} for _ in range(BUCKETS)]  # raid number % BUCKETS -> {raid id: _Hosted}
        self._relay = None
        self._keeping = None
        self._finishing = set()  # Deferreds of raids paying their players
        self._pauses = set()  # Deferreds of the pauses between their retries
        self._life = longest_life(settings)
        self._unmark = Script(router, _UNMARK)
        self._failures = FailureLog(self._log, clock)
        self._ticks = 0
        self._keeps = 0
        self.udp = None
        self._datagram_rate = settings.datagram_rate
        self._world_bound = settings.world_bound
        players.when_asked_to_place(self.place_again)
        self.counters = dict.fromkeys(("received", "sent", "forged", "replayed", "unknown", "rate_limited",
                                       "bad_position", "relayed", "unsent"), 0)

    def startService(self):
        super().startService()
        self._relay = task.LoopingCall.withCount(self._relay_ticks)
        self._relay.clock = self._clock
        self._relay.start(RELAY_INTERVAL / BUCKETS, now=False)
        self._keeping = task.LoopingCall(lambda: defer.ensureDeferred(self._keep()))
        self._keeping.clock = self._clock
        self._keeping.start(1.0 / BUCKETS)

    def stopService(self):
        super().stopService()
        for loop in (self._relay, self._keeping):
            if loop.running:
                loop.stop()
        for pause in list(self._pauses):
            pause.cancel()
        return defer.ensureDeferred(self._abandon_all())

    async def _abandon_all(self):
        """
        Shutting down: let raids that ended finish paying (each step tried
        once more), end the rest as failed, free their players and tell them.
        """
        await gather(list(self._finishing))
        for hosted in list(self._raids.values()):
            hosted.raid.abandon()
            self._drop(hosted)
            raid_id = hosted.raid.raid_id
            try:
                await gather([self._unmark([raid_mark_key(u)], [raid_id]) for u in hosted.members])
                await self._matchmaker.release(raid_id)
            except REDIS_ERRORS as e:
                self._log.warn("raid {raid_id} abandoned at shutdown; its players wait for the lease: {error}",
                               raid_id=raid_id, error=e)
            else:
                await self._tell_failed(raid_id, hosted.members)

    async def _keep(self):
        """
        Every tenth of a second: renew this host's lease with the checkpoints
        of a tenth of its raids (each raid's every second, a little at a
        time); every second, end the raids of dead hosts.  A failure is
        logged, and the next tick tries again.
        """
        self._keeps += 1
        bucket = self._keeps % BUCKETS
        checkpoints = {raid_id: h.checkpoint() for raid_id, h in self._buckets[bucket].items()}
        try:
            for raid_id in await self._matchmaker.renew(self._presence.server_id, self.address, checkpoints):
                self._ended_elsewhere(raid_id)
            if bucket:
                return
            for raid_id, members in await self._matchmaker.reap():
                hosted = self._raids.get(raid_id)
                if hosted is not None:
                    # This host's own lease lapsed (Redis was out of reach): its raid is over too.
                    hosted.raid.abandon()
                    self._drop(hosted)
                self._log.warn("raid {raid_id}: its host stopped renewing; ended as failed", raid_id=raid_id)
                await self._tell_failed(raid_id, members)
        except Exception:
            self._failures.failed("raid host: cannot renew the lease or check others'")

    def _ended_elsewhere(self, raid_id):
        """
        Matchmaking no longer lists the raid as this host's: another server
        ended it (this host's lease lapsed), or Redis lost it.  A raid still
        waiting or fighting is dropped, its raid marks are taken off, and its
        players are told it failed (again, if the other server's word got
        through: a client takes only the first result of a raid).
        """
        hosted = self._raids.get(raid_id)
        if hosted is None or hosted.raid.stage not in (Stage.WAITING, Stage.FIGHTING):
            return  # its own end is under way
        hosted.raid.abandon()
        self._drop(hosted)
        self._log.warn("raid {raid_id}: ended by another server (this host's lease lapsed); dropped",
                       raid_id=raid_id)
        self._ending(raid_id, gather([self._unmark_all(raid_id, hosted.until, hosted.members),
                                      self._tell_failed(raid_id, hosted.members)]),
                     "raid {raid_id}: cannot end it here")

    def _ending(self, raid_id, work, failed):
        """
        Run a raid's end, C{work} (a coroutine or Deferred), in the
        background: shutdown waits for it, and a failure is logged as
        C{failed}.
        """
        d = defer.ensureDeferred(work)
        d.addErrback(lambda f: self._log.failure(failed, f, raid_id=raid_id))
        self._finishing.add(d)
        d.addBoth(lambda _: self._finishing.discard(d))

    async def _tell_failed(self, raid_id, members):
        """Tell the players the raid failed: it paid nothing, and each keeps the level and best they had."""
        standings = await gather([self._standing(u) for u in members])
        await gather([self._tell(raid_id, u, {
            "raid_id": raid_id, "cleared": False, "score": 0, "team_score": 0, "exp_gained": 0, "level": level,
            "best": best, "changed": []}) for u, (level, best) in zip(members, standings)])

    async def _standing(self, user_id):
        """C{(level, best score)} of a player as stored now, for a result that paid nothing; (0, 0) if unreadable."""
        try:
            level, best = await self._router.execute("HMGET", profile_key(user_id), "level", "best")
        except REDIS_ERRORS:
            return 0, 0
        return int(level or 0), int(best or 0)

    async def _tell(self, raid_id, user_id, body):
        """Push a raid's result to one player; a failure is logged, and the others are told all the same."""
        try:
            await self._presence.tell([user_id], RAID_RESULT, body)
        except REDIS_ERRORS as e:
            self._log.warn("raid {raid_id}: cannot tell user {user_id} its result: {error}",
                           raid_id=raid_id, user_id=user_id, error=e)

    def __len__(self):
        return len(self._raids)

    # -- forming ------------------------------------------------------------------

    def host(self, formed):
        """Take a raid this process's matchmaking formed (a L{Formed})."""
        d = defer.ensureDeferred(self._host(formed.raid_id, formed.members))
        d.addErrback(lambda f: self._log.failure("cannot host raid {raid_id}", f, raid_id=formed.raid_id))

    async def _host(self, raid_id, members):
        """
        Read the players' levels and weapons and mark them as in the raid,
        then give each their place and start the raid.  A Redis failure
        before the raid is set up ends it as failed at once (L{_not_hosted}),
        so its players are not held until its longest life passes; a
        player who cannot be given their place is logged, and the raid goes
        on without them.
        """
        until = self._clock.seconds() + self._life
        try:
            profiles = await gather([self._router.execute("HMGET", profile_key(u), "name", "level") for u in members])
            weapons = await gather([self._router.execute("HGET", tab_key(u, 0), 0) for u in members])
            await gather([self._router.execute("SET", raid_mark_key(u), raid_id, "PX", int(self._life * 1000))
                          for u in members])
        except REDIS_ERRORS as e:
            await self._not_hosted(raid_id, until, members, e)
            return
        damage = {}
        for user_id, (_, level), weapon in zip(members, profiles, weapons):
            enhancement = int(weapon.split(b":")[1]) if weapon else 0
            damage[user_id] = hit_damage(int(level or 1), enhancement)
        names = {u: (name or b"").decode() for u, (name, _) in zip(members, profiles)}
        number = self._random.getrandbits(32)
        while number in self._by_number:
            number = self._random.getrandbits(32)
        keys = member_keys(self._random.getrandbits(8 * KEY_SIZE).to_bytes(KEY_SIZE, "big"), len(members))
        hosted = _Hosted(Raid(raid_id, damage, self._settings, self._clock, functools.partial(self._event, raid_id)),
                         number, keys, list(members), names, until)
        if self._datagram_rate is not None:
            now = self._clock.seconds()
            hosted.buckets = {member: TokenBucket(self._datagram_rate, now) for member in range(len(members))}
        self._raids[raid_id] = self._by_number[number] = self._buckets[number % BUCKETS][raid_id] = hosted
        await gather([self._give_place(hosted, member) for member in range(len(members))])
        if self._raids.get(raid_id) is not hosted:
            return  # ended meanwhile (by another server, or the host is stopping)
        hosted.raid.start()
        self._log.info("raid {raid_id} hosted for users {user_ids} (raid number {number})",
                       raid_id=raid_id, user_ids=list(members), number=number)

    async def _give_place(self, hosted, member, again=False, asked_by=None):
        """
        Tell player C{member} where the raid is (raid_found), at forming or
        C{again} after a resume (L{place_again}), one at a time per member.
        The push goes to the authentication holding the player now, and to
        it only; one elsewhere gets a handoff ticket, one on this host none
        (and any unused ticket of theirs is taken off, so their leave does
        not wait for it).  A place again gets a new datagram key (datagrams
        under the old one, which a dead socket may still hold, are forged
        now), and the member's old UDP address and sequence are forgotten
        until they greet again.  It is not given if the raid is over, also
        if it ends while the place is offered (the ticket offered, if still
        waiting, is taken off, and the key is kept), nor to the
        authentication C{asked_by} (the resume that asked) if the place was
        given to it already: a resume racing the raid's forming hears
        raid_found once.  A Redis failure is logged.
        """
        lock = hosted.placing.setdefault(member, defer.DeferredLock())
        await lock.acquire()
        try:
            await self._place(hosted, member, again, asked_by)
        finally:
            lock.release()

    async def _place(self, hosted, member, again, asked_by):
        raid_id, user_id = hosted.raid.raid_id, hosted.members[member]
        if self._raids.get(raid_id) is not hosted or hosted.over:
            return  # over meanwhile: its result, not a place, is what the player hears
        if asked_by is not None and hosted.told.get(member) == asked_by:
            self._log.info("raid {raid_id}: user {user_id} resumed after being told where it is; not told again",
                           raid_id=raid_id, user_id=user_id)
            return
        ticket = f"{self._random.getrandbits(128):032x}"
        try:
            holder, offered = await self._presence.offer_place(user_id, ticket, HANDOFF_TTL, asked_by)
            if self._raids.get(raid_id) is not hosted or hosted.over:
                # Over while the place was offered: not told, and its ticket, unused, would hold up their leave.
                if offered:
                    await self._presence.withdraw_place(user_id, ticket)
                self._log.info("raid {raid_id}: over before user {user_id} was told where it is; not told",
                               raid_id=raid_id, user_id=user_id)
                return
            if holder is None or holder != (asked_by or holder):
                # Offline, or the resume that asked was itself replaced: a newer resume asks for itself.
                self._log.info("raid {raid_id}: user {user_id} is not held by {asked}; not told where it is",
                               raid_id=raid_id, user_id=user_id, asked=asked_by or "anyone")
                return
            if again:
                keys = list(hosted.keys)
                keys[member] = self._random.getrandbits(8 * KEY_SIZE).to_bytes(KEY_SIZE, "big")
                hosted.keys = tuple(keys)
                hosted.addresses.pop(member, None)
                hosted.last_sequence.pop(member, None)
                hosted.positions.pop(member, None)
            await self._presence.tell_holder(user_id, holder, RAID_FOUND, {
                "raid_id": raid_id, "host": self.address, "ticket": ticket if offered else "",
                "udp": self.udp_address, "raid_number": hosted.number, "member": member,
                "key": hosted.keys[member].hex(), "members": hosted.members})
            raid = hosted.raid
            if again and raid.stage is Stage.FIGHTING:  # told after the raid_found, on the same channel
                await self._presence.tell_holder(user_id, holder, RAID_FIGHT, {
                    "raid_id": raid_id, "hp": raid.hp, "sequence": raid.sequence,
                    "deadline_ms": int(raid.deadline * 1000)})
            hosted.told[member] = holder
        except REDIS_ERRORS as e:
            self._log.warn("raid {raid_id}: cannot tell user {user_id} where it is ({error}); it goes on without "
                           "them", raid_id=raid_id, user_id=user_id, error=e)

    async def _not_hosted(self, raid_id, until, members, error):
        """Setting the raid up failed with C{error}: take the marks off, free the players and tell them it failed."""
        self._log.warn("raid {raid_id}: cannot set it up ({error}); ended as failed", raid_id=raid_id, error=error)
        await self._unmark_all(raid_id, until, members)
        await self._retried_or_logged(raid_id, until, "freeing its players", functools.partial(
            self._matchmaker.release, raid_id))
        await self._tell_failed(raid_id, members)

    # -- resumed players -------------------------------------------------------------

    async def rejoin(self, user_id, raid_id, host_server, holder=None):
        """
        The player resumed, as the authentication C{holder}, while in raid
        C{raid_id} (hosted by C{host_server}): give them their place again
        (L{place_again}), here or by asking the host; their L{Standing},
        from the raid itself if hosted here, else from its checkpoint (at
        most a second old, and written at once when the fight ends).  A raid
        over (its players being paid) gives no place: the standing says its
        end (no time left), and its result follows as to every player.
        """
        hosted = self._raids.get(raid_id)
        if hosted is not None and user_id in hosted.members:
            self.place_again(user_id, raid_id, holder)
            raid = hosted.raid
            left = max(0.0, raid.deadline - self._clock.seconds()) if raid.stage is Stage.FIGHTING else 0.0
            return Standing(raid_id, raid.hp, int(left * 1000), raid.scores.get(user_id, 0))
        if host_server:
            await self._presence.ask(host_server, PLACE_AGAIN, {"user_id": user_id, "raid_id": raid_id,
                                                                "holder": holder})
        checkpoint = await self._matchmaker.checkpoint(raid_id) or {}
        fighting = checkpoint.get("stage") == Stage.FIGHTING.value and checkpoint.get("deadline")
        left = max(0.0, checkpoint["deadline"] - self._clock.seconds()) if fighting else 0.0
        return Standing(raid_id, int(checkpoint.get("hp", self._settings.boss_hp)), int(left * 1000),
                        int(checkpoint.get("scores", {}).get(str(user_id), 0)))

    def place_again(self, user_id, raid_id, holder=None):
        """
        Give a player of a raid hosted here, who resumed as the
        authentication C{holder} (None: whoever holds them now), their place
        again (L{_give_place}): a new datagram key and a raid_found push,
        with a handoff ticket if they are elsewhere.  Nothing if the raid is
        over (its result is on its way to them), or if that authentication
        was told where the raid is already (the forming's push reached it).
        A place again in a raid that is fighting is followed by a raid_fight
        push as the fight is now (the one at its start may have come while
        the player was away).
        """
        hosted = self._raids.get(raid_id)
        if hosted is None or user_id not in hosted.members:
            return
        if hosted.over:
            self._log.info("raid {raid_id}: user {user_id} resumed as it ended; no place, its result follows",
                           raid_id=raid_id, user_id=user_id)
            return
        self._ending(raid_id, self._give_place(hosted, hosted.members.index(user_id), again=True, asked_by=holder),
                     "raid {raid_id}: cannot give a player their place again")

    # -- requests -----------------------------------------------------------------

    def _hosted(self, raid_id):
        hosted = self._raids.get(raid_id)
        if hosted is None:
            raise RequestRefused(ErrorCode.NOT_IN_RAID, "no such raid on this server")
        return hosted

    def ready(self, user_id, raid_id):
        """The player is ready.  @raise RequestRefused: NOT_IN_RAID."""
        self._hosted(raid_id).raid.ready(user_id)

    def hit(self, user_id, raid_id):
        """The player hits the boss; a L{dreamraid.services.raids.Hit}.  @raise RequestRefused: see L{Raid.hit}."""
        return self._hosted(raid_id).raid.hit(user_id)

    # -- what the fight does --------------------------------------------------------

    def _event(self, raid_id, event, body):
        hosted = self._raids[raid_id]
        if event == "fight":
            self._push(hosted, RAID_FIGHT, {"raid_id": raid_id, "hp": body["hp"], "sequence": body["sequence"],
                                            "deadline_ms": int(body["deadline"] * 1000)})
            self._send_hp(hosted)
        elif event == "hp":
            self._send_hp(hosted)
        elif event == "ended":
            self._ending(raid_id, self._finish(hosted, body), "raid {raid_id} ended, but its end failed")

    def _push(self, hosted, event, body, user_ids=None):
        """Push to the raid's players connected to this process."""
        for user_id in hosted.members if user_ids is None else user_ids:
            connection = self._players.connection_of(user_id)
            if connection is not None:
                connection.push(event, body)

    async def _finish(self, hosted, result):
        """
        The raid ended.  A clear pays each player (which takes their raid
        mark off) and puts the scores on the board; a fail takes the marks
        off.  Then the players are freed, and each is told what the raid
        paid them.  Each step goes on through Redis failures (L{_retried});
        a player whose pay never settled is not told.
        """
        raid_id, members = hosted.raid.raid_id, hosted.members
        self._send_hp(hosted)
        await self._checkpoint_ended(hosted)
        if result.cleared:
            paid = await self._pay(hosted, result)
            scores = [(u, hosted.names[u], result.scores[u]) for u, rewarded in paid.items()
                      if rewarded is not None and result.scores[u] > 0]
            await self._retried_or_logged(raid_id, hosted.until, "recording its scores", functools.partial(
                self._ranking.record, scores))
        else:
            paid = dict.fromkeys(members)
            await self._unmark_all(raid_id, hosted.until, members)
        self._drop(hosted)
        await self._retried_or_logged(raid_id, hosted.until, "freeing its players", functools.partial(
            self._matchmaker.release, raid_id))
        self._log.info("raid {raid_id} ended: {outcome}, team score {team_score}, scores {scores}",
                       raid_id=raid_id, outcome="cleared" if result.cleared else "failed",
                       team_score=result.team_score, scores={str(u): s for u, s in result.scores.items()})
        if not result.cleared:
            await self._tell_failed(raid_id, members)
            return
        await gather([self._tell(raid_id, u, {
            "raid_id": raid_id, "cleared": result.cleared, "score": result.scores[u],
            "team_score": result.team_score, "exp_gained": rewarded.exp_gained if rewarded else 0,
            "level": rewarded.level if rewarded else 0, "best": rewarded.best if rewarded else 0,
            "changed": [item._asdict() for item in rewarded.changed] if rewarded else []})
            for u, rewarded in paid.items()])

    async def _checkpoint_ended(self, hosted):
        """
        Write the ended raid's checkpoint now, not at its next turn, so a
        player resuming on another process is told it is over; a failure is
        logged (that turn writes it).
        """
        try:
            await self._matchmaker.renew(self._presence.server_id, self.address,
                                         {hosted.raid.raid_id: hosted.checkpoint()})
        except REDIS_ERRORS as e:
            self._log.warn("raid {raid_id}: cannot checkpoint its end ({error})", raid_id=hosted.raid.raid_id,
                           error=e)

    async def _pay(self, hosted, result):
        """
        Pay each player of a cleared raid, each on their own; C{{user id:
        L{Rewarded} or None}} (None: their mark had gone, the raid did not
        pay them), leaving out those whose pay never settled.
        """
        raid_id, members = hosted.raid.raid_id, hosted.members
        outcomes = await defer.DeferredList([defer.ensureDeferred(self._retried(
            raid_id, hosted.until, "paying user {user_id}", functools.partial(
                self._inventory.reward, u, raid_id, result.scores[u], self._life), user_id=u)) for u in members],
            consumeErrors=True)
        paid = {}
        for user_id, (ok, value) in zip(members, outcomes):
            if ok:
                paid[user_id] = value
            else:
                self._log.error("raid {raid_id}: gave up paying user {user_id} (score {score}), who is not told: "
                                "{error}", raid_id=raid_id, user_id=user_id, score=result.scores[user_id],
                                error=value.value)
        return paid

    async def _retried(self, raid_id, until, step, call, **fields):
        """
        C{call()} (a Deferred) until it succeeds; its result.  After a Redis
        failure it is called again after a jittered pause on the clock, from
        RETRY_FIRST doubling up to RETRY_MAX; the first failure is logged.
        Gives up, raising the last failure, once the service has stopped or
        the raid's longest life (C{until}) would have passed; any other
        failure is raised at once.  C{step} names the step in the log, with
        C{fields}.
        """
        for failures in itertools.count():
            try:
                return await call()
            except REDIS_ERRORS as e:
                pause = min(RETRY_MAX, RETRY_FIRST * 2 ** failures) * (0.5 + self._random.random() / 2)
                if not self.running or self._clock.seconds() + pause > until:
                    raise
                if not failures:
                    self._log.warn("raid {raid_id}: " + step + " failed ({error}); trying again",
                                   raid_id=raid_id, error=e, **fields)
            pausing = task.deferLater(self._clock, pause)
            self._pauses.add(pausing)
            try:
                await pausing
            except defer.CancelledError:
                pass  # the service is stopping: one last try
            finally:
                self._pauses.discard(pausing)

    async def _retried_or_logged(self, raid_id, until, step, call, **fields):
        """L{_retried}, but giving up is logged rather than raised."""
        try:
            await self._retried(raid_id, until, step, call, **fields)
        except REDIS_ERRORS as e:
            self._log.error("raid {raid_id}: gave up " + step + ": {error}", raid_id=raid_id, error=e, **fields)

    def _unmark_all(self, raid_id, until, members):
        """Take the raid's marks off its players (each retried, then logged); a Deferred."""
        return gather([self._retried_or_logged(raid_id, until, "taking user {user_id}'s raid mark off",
                                               functools.partial(self._unmark, [raid_mark_key(u)], [raid_id]),
                                               user_id=u) for u in members])

    def _drop(self, hosted):
        self._raids.pop(hosted.raid.raid_id, None)
        self._by_number.pop(hosted.number, None)
        self._buckets[hosted.number % BUCKETS].pop(hosted.raid.raid_id, None)

    # -- UDP ----------------------------------------------------------------------

    def channel(self, number):
        """The L{Channel} of raid C{number}, or None (the datagram is then counted as unknown)."""
        hosted = self._by_number.get(number)
        if hosted is None:
            self.counters["unknown"] += 1
            return None
        return Channel(hosted.keys)

    def forged(self):
        """A datagram whose MAC did not verify was dropped."""
        self.counters["forged"] += 1

    def unsent(self, error):
        """A datagram to a player could not be sent (C{error}, an OSError) and was dropped."""
        self.counters["unsent"] += 1
        if self.counters["unsent"] == 1:
            self._log.warn("raid UDP: a datagram could not be sent ({error}); such drops are counted as unsent",
                           error=error)

    def admit(self, number, member, sequence):
        """
        Whether to take a datagram of raid C{number} whose MAC verified
        under member C{member}'s key, before its body is decoded.  Not if
        it repeats or precedes a sequence the member already sent
        (replayed), or is past the member's C{datagram_rate}
        (rate_limited); each is counted.  A datagram past the rate still
        raises the member's sequence, so it cannot be replayed later.  A
        member's first datagram past the rate in a raid is logged, naming
        the user.
        """
        hosted = self._by_number.get(number)
        if hosted is None:
            self.counters["unknown"] += 1
            return False
        if sequence <= hosted.last_sequence.get(member, 0):
            self.counters["replayed"] += 1
            return False
        hosted.last_sequence[member] = sequence
        bucket = hosted.buckets.get(member)
        if bucket is not None and not bucket.allow(self._clock.seconds()):
            self.counters["rate_limited"] += 1
            if member not in hosted.over_rate:
                hosted.over_rate.add(member)
                self._log.warn("raid {raid_id}: user {user_id} (member {member}) sends datagrams past [raids] "
                               "datagram_rate; the excess is dropped and counted as rate_limited (logged once a "
                               "raid)", raid_id=hosted.raid.raid_id, user_id=hosted.members[member], member=member)
            return False
        return True

    def datagram(self, number, member, event, body, address):
        """
        A datagram L{admit} took: C{event} is C{"hello"} or C{"position"}.
        A position whose x or y is not a finite number within
        C{world_bound} is dropped and counted (bad_position).
        """
        hosted = self._by_number.get(number)
        if hosted is None:
            self.counters["unknown"] += 1
            return
        if event == "position" and not (abs(body["x"]) <= self._world_bound and abs(body["y"]) <= self._world_bound):
            # Written so that NaN, which compares false with everything, fails it too.
            self.counters["bad_position"] += 1
            return
        hosted.addresses[member] = address
        self.counters["received"] += 1
        if event == "hello":
            self._send_hp(hosted, [member])
        else:
            hosted.positions[member] = (body["x"], body["y"], body["state"])

    def _send_hp(self, hosted, members=None):
        raid = hosted.raid
        if members is None:
            hosted.hp_sent_at = self._clock.seconds()
        self._send(hosted, "boss_hp", {"hp": raid.hp, "hp_sequence": raid.sequence}, members)

    def _send(self, hosted, event, body, members=None):
        if self.udp is None:
            return
        for member in hosted.addresses if members is None else members:
            hosted.sent += 1
            self.counters["sent"] += 1
            self.udp.send(hosted.addresses[member], event, hosted.keys[member], hosted.number, member,
                          hosted.sent, body)

    def _relay_ticks(self, count):
        """
        The relay timer fired, C{count} ticks after its last: the reactor
        may have been late.  The buckets whose turns it missed (all of them,
        at most) take them now, so a busy reactor does not stretch each
        raid's HP gap and relay period by the ticks it missed.
        """
        for _ in range(min(count, BUCKETS)):
            self._relay_tick()

    def _relay_tick(self):
        self._ticks += 1
        bucket, now = self._ticks % BUCKETS, self._clock.seconds()
        for hosted in list(self._buckets[bucket].values()):
            if now - hosted.hp_sent_at >= HP_REPEAT_AFTER:
                self._send_hp(hosted)
            for member in list(hosted.addresses):
                others = [{"member": m, "x": x, "y": y, "state": state}
                          for m, (x, y, state) in hosted.positions.items() if m != member]
                if others:
                    self._send(hosted, "positions", {"players": others}, [member])
                    self.counters["relayed"] += 1
