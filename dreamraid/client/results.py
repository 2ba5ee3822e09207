"""What the client library's calls return: plain typed records of the servers' replies and pushes."""

from typing import NamedTuple


class Login(NamedTuple):
    """
    A login or a refresh: the token for enter_world and the game server and
    when it expires (Unix seconds), and the refresh token that gets the next
    ones without the password (each works once) and when it expires.
    """

    user_id: int
    token: str
    expires_at: int
    refresh_token: str
    refresh_expires_at: int


class World(NamedTuple):
    """Where enter_world sends the player: the game server to authenticate on with the same token."""

    user_id: int
    host: str
    port: int


class Resumed(NamedTuple):
    """
    A resume's reply: who the player is and what was kept, as it is now:
    the party's code ('' for none), the level group of the ticket waiting
    (0 for none), and the raid the player is in ('' for none) with the
    boss's HP, the seconds left of its fight and the player's own score.
    """

    player: "Player"
    party_code: str
    queued_group: int
    raid_id: str
    boss_hp: int
    seconds_left: float
    score: int


def resumed(body):
    return Resumed(Player(body["user_id"], body["name"], body["level"], body["exp"]), body["party_code"],
                   body["queued_group"], body["raid_id"], body["boss_hp"], body["ms_left"] / 1000, body["score"])


class Player(NamedTuple):
    """Who a game connection is, as authenticated."""

    user_id: int
    name: str
    level: int
    exp: int


class SlotItem(NamedTuple):
    """One inventory slot; an item code of 0 is a slot a change emptied."""

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
    changed: tuple  # of SlotItem: where the drops went


class Enhanced(NamedTuple):
    slot: int
    success: bool
    enhancement: int


class RankEntry(NamedTuple):
    rank: int
    user_id: int
    name: str
    score: int


class Rank(NamedTuple):
    """The player's own place: rank 0 before their first scored raid."""

    rank: int
    score: int


class Member(NamedTuple):
    user_id: int
    name: str


class Party(NamedTuple):
    """A party: its invite code, leader and members in join order."""

    code: str
    leader: int
    members: tuple  # of Member


class PartyChange(NamedTuple):
    """A party_changed push: who joined, left or was kicked, and the party now (code empty for the kicked)."""

    reason: str
    user_id: int
    party: Party


class Hit(NamedTuple):
    """The reply to a hit: the damage it scored and the boss's HP after it, with its sequence."""

    damage: int
    hp: int
    sequence: int


class Fight(NamedTuple):
    """The fight began: the boss's HP and the deadline (Unix seconds)."""

    hp: int
    deadline: float


class RaidResult(NamedTuple):
    raid_id: str
    cleared: bool
    score: int
    team_score: int
    exp_gained: int
    level: int
    best: int
    changed: tuple  # of SlotItem: where the drops went


class ItemKind(NamedTuple):
    """What an item code is: its name, its tab (0 equipment, 1 consumables, 2 materials) and its stack size."""

    name: str
    tab: int
    stack: int


class GameTables(NamedTuple):
    """The game tables a server plays by (its game_tables reply); every mapping is keyed by number."""

    max_level: int
    exp_to_advance: dict  # level -> cumulative exp needed to leave it
    max_enhancement: int
    enhance_chances: dict  # enhancement level -> percent chance of the next
    slots: int  # per tab
    hunt_cooldown_ms: int
    monster_exp: dict  # monster kind -> exp a hunt grants
    raid_exp_per_score: int
    items: dict  # item code -> ItemKind


def game_tables(body):
    """The L{GameTables} of a tables body."""
    names = body["item_names"].split("\n") if body["items"] else []
    return GameTables(
        body["max_level"], {e["level"]: e["exp"] for e in body["exp_to_advance"]},
        body["max_enhancement"], {e["enhancement"]: e["percent"] for e in body["enhance_chances"]},
        body["slots"], body["hunt_cooldown_ms"], {m["monster"]: m["exp"] for m in body["monsters"]},
        body["raid_exp_per_score"],
        {i["item_code"]: ItemKind(name, i["tab"], i["stack"]) for i, name in zip(body["items"], names)})


def slot_items(records):
    return tuple(SlotItem(**r) for r in records)


def party(body):
    """The L{Party} of a party or party_changed body, or None when its code is empty (no party)."""
    if not body["code"]:
        return None
    names = body["names"].split(" ")
    return Party(body["code"], body["leader"],
                 tuple(Member(m["user_id"], name) for m, name in zip(body["members"], names)))


def raid_result(body):
    return RaidResult(**{**body, "changed": slot_items(body["changed"])})
