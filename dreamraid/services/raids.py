"""
One raid's fight, in memory on the game server process that hosts it: the
wait for its players to be ready, hits with server-computed damage, the
boss's HP with a sequence number, and the end.

    waiting --all ready, or ready_grace passed--> fighting
    fighting --boss HP 0--> cleared      (scores as earned)
    fighting --time_limit passed--> failed   (every score 0)

Time comes from the injected clock.  What happens is handed to
C{on_event(event, body)}; the host turns events into pushes and
datagrams, and the result into rewards.
"""

import enum
from typing import NamedTuple

from dreamraid.errors import ErrorCode, RequestRefused


def longest_life(settings):
    """Seconds from forming after which a raid has surely ended: its players are free again then at the latest."""
    return settings.ready_grace + settings.time_limit + 30


def hit_damage(level, enhancement):
    """A hit's damage: 1 + level // 3 + the enhancement of the item in equipment slot 0."""
    return 1 + level // 3 + enhancement


class Stage(enum.Enum):
    WAITING = "waiting"
    FIGHTING = "fighting"
    CLEARED = "cleared"
    FAILED = "failed"


class Hit(NamedTuple):
    """A hit that landed: the damage it scored (only the HP left, for the killing hit) and the boss after it."""

    damage: int
    hp: int
    sequence: int


class Result(NamedTuple):
    """How a raid ended: cleared or not, each player's score and the team's."""

    cleared: bool
    scores: dict
    team_score: int


class Raid:
    """
    A raid of C{damage_by_player} (user id -> damage of one hit) on the
    settings' boss.  L{start} begins the wait for the players.
    """

    def __init__(self, raid_id, damage_by_player, settings, clock, on_event):
        self.raid_id = raid_id
        self._damage = dict(damage_by_player)
        self._settings = settings
        self._clock = clock
        self._on_event = on_event
        self.stage = Stage.WAITING
        self.hp = settings.boss_hp
        # Goes up with every change of HP, so a client can drop late news.
        self.sequence = 0
        self.deadline = None
        self.scores = dict.fromkeys(self._damage, 0)
        self._ready = set()
        self._last_hit = {}
        self._timer = None

    @property
    def players(self):
        return list(self._damage)

    def start(self):
        """Wait up to C{ready_grace} for every player to be ready."""
        self._timer = self._clock.callLater(self._settings.ready_grace, self._fight)

    def ready(self, user_id):
        """A player is ready; the fight begins when all are.  @raise RequestRefused: NOT_IN_RAID."""
        self._check_player(user_id)
        if self.stage is Stage.WAITING:
            self._ready.add(user_id)
            if self._ready == set(self._damage):
                self._timer.cancel()
                self._fight()

    def hit(self, user_id):
        """
        A player hits the boss; the L{Hit}.

        @raise RequestRefused: NOT_IN_RAID, RAID_NOT_FIGHTING, HIT_TOO_SOON.
        """
        self._check_player(user_id)
        if self.stage is not Stage.FIGHTING:
            raise RequestRefused(ErrorCode.RAID_NOT_FIGHTING)
        now = self._clock.seconds()
        last = self._last_hit.get(user_id)
        if last is not None and now - last < self._settings.hit_interval:
            raise RequestRefused(ErrorCode.HIT_TOO_SOON)
        self._last_hit[user_id] = now
        damage = min(self._damage[user_id], self.hp)
        self.hp -= damage
        self.scores[user_id] += damage
        self.sequence += 1
        hit = Hit(damage, self.hp, self.sequence)
        self._on_event("hp", {"hp": self.hp, "sequence": self.sequence, "by": user_id, "damage": damage})
        if self.hp == 0:
            self._end(cleared=True)
        return hit

    def abandon(self):
        """Stop the raid where it stands, as failed, telling nobody (its host is going away)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.stage = Stage.FAILED

    def _check_player(self, user_id):
        if user_id not in self._damage:
            raise RequestRefused(ErrorCode.NOT_IN_RAID)

    def _fight(self):
        self.stage = Stage.FIGHTING
        self.deadline = self._clock.seconds() + self._settings.time_limit
        self._timer = self._clock.callLater(self._settings.time_limit, self._end, cleared=False)
        self._on_event("fight", {"hp": self.hp, "sequence": self.sequence, "deadline": self.deadline,
                                 "ready": sorted(self._ready)})

    def _end(self, cleared):
        if self._timer.active():
            self._timer.cancel()
        self.stage = Stage.CLEARED if cleared else Stage.FAILED
        if not cleared:
            self.scores = dict.fromkeys(self.scores, 0)
        result = Result(cleared, dict(self.scores), sum(self.scores.values()))
        self._on_event("ended", result)
