"""
The game tables (levels, enhancement, items, monsters): a JSON file under
``conf/`` read into a frozen, validated L{GameTables}.  The numbers are the
game designer's; code only checks their shape.
"""

import json
from dataclasses import dataclass
from types import MappingProxyType


class TableError(Exception):
    """The tables file is unreadable or breaks a rule; the message says which."""


TABS = {"equipment": 0, "consumables": 1, "materials": 2}


@dataclass(frozen=True)
class ItemKind:
    """What an item code is: its name, its tab, and how many stack in one slot (1 for equipment)."""

    name: str
    tab: int
    stack: int


@dataclass(frozen=True)
class Drop:
    """A chance, in percent, that a hunt (or a cleared raid) yields C{count} of C{item}."""

    item: int
    percent: int
    count: int


@dataclass(frozen=True)
class GameTables:
    """Progression, enhancement, items, monsters and raid rewards."""

    max_level: int
    exp_to_advance: MappingProxyType  # level -> cumulative exp needed to leave it
    max_enhancement: int
    enhance_success_percent: MappingProxyType  # enhancement level -> chance
    monster_exp: MappingProxyType  # monster kind -> exp granted by a hunt
    hunt_cooldown_ms: int
    monster_drops: MappingProxyType  # monster kind -> (Drop, ...)
    raid_drops: tuple  # (Drop, ...) for each player of a cleared raid
    raid_exp_per_score: int  # exp a cleared raid pays per point of the player's score
    slots: int  # per tab
    items: MappingProxyType  # item code -> ItemKind


def _int_keyed(name, mapping, low, high):
    if not isinstance(mapping, dict):
        raise TableError(f"{name}: expected an object")
    result = {}
    for key, value in mapping.items():
        try:
            level = int(key)
        except ValueError:
            raise TableError(f"{name}: key {key!r} is not a whole number") from None
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise TableError(f"{name}[{key}]: must be a whole number from {low} to {high}")
        result[level] = value
    return result


def _require_keys(name, mapping, keys):
    if set(mapping) != set(keys):
        raise TableError(f"{name}: needs exactly the keys {min(keys)} to {max(keys)}")


def parse_tables(data):
    """Validate decoded JSON and build L{GameTables}."""
    try:
        levels, enhancement, monsters = data["levels"], data["enhancement"], data["monsters"]
        max_level, max_enhancement = levels["max_level"], enhancement["max_level"]
        exp = _int_keyed("levels.exp_to_advance", levels["exp_to_advance"], 1, 10**9)
        chance = _int_keyed("enhancement.success_percent", enhancement["success_percent"], 0, 100)
        monster_exp = _int_keyed("monsters.exp", monsters["exp"], 0, 10**6)
    except (KeyError, TypeError) as e:
        raise TableError(f"missing or malformed entry {e}") from None
    for name, value in (("levels.max_level", max_level), ("enhancement.max_level", max_enhancement)):
        if not isinstance(value, int) or not 1 <= value <= 1000:
            raise TableError(f"{name}: must be a whole number from 1 to 1000")
    _require_keys("levels.exp_to_advance", exp, range(1, max_level))
    if any(exp[level] >= exp[level + 1] for level in range(1, max_level - 1)):
        raise TableError("levels.exp_to_advance: must increase with the level")
    _require_keys("enhancement.success_percent", chance, range(0, max_enhancement))
    if not monster_exp:
        raise TableError("monsters.exp: needs at least one monster kind")
    items = _items(data.get("items", {}))
    slots = data.get("inventory", {}).get("slots", 50)
    if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= 1000:
        raise TableError("inventory.slots: must be a whole number from 1 to 1000")
    cooldown = monsters.get("cooldown_ms", 0)
    if not isinstance(cooldown, int) or isinstance(cooldown, bool) or not 0 <= cooldown <= 3_600_000:
        raise TableError("monsters.cooldown_ms: must be a whole number from 0 to 3600000")
    raid = data.get("raid", {})
    exp_per_score = raid.get("exp_per_score", 1) if isinstance(raid, dict) else None
    if not isinstance(exp_per_score, int) or isinstance(exp_per_score, bool) or not 0 <= exp_per_score <= 1000:
        raise TableError("raid.exp_per_score: must be a whole number from 0 to 1000")
    return GameTables(
        max_level=max_level,
        exp_to_advance=MappingProxyType(exp),
        max_enhancement=max_enhancement,
        enhance_success_percent=MappingProxyType(chance),
        monster_exp=MappingProxyType(monster_exp),
        hunt_cooldown_ms=cooldown,
        monster_drops=MappingProxyType(_drops(monsters.get("drops", {}), monster_exp, items)),
        raid_drops=_drop_list("raid.drops", raid.get("drops", []), items),
        raid_exp_per_score=exp_per_score,
        slots=slots,
        items=MappingProxyType(items),
    )


def _items(entries):
    if not isinstance(entries, dict):
        raise TableError("items: expected an object")
    items = {}
    for key, entry in entries.items():
        name = f"items[{key}]"
        if not key.isdigit() or not 1 <= int(key) <= 2**31 - 1:
            raise TableError(f"{name}: an item code is a whole number from 1 to 2147483647")
        if not isinstance(entry, dict) or entry.get("tab") not in TABS or not isinstance(entry.get("name"), str):
            raise TableError(f"{name}: needs a name and a tab ({', '.join(TABS)})")
        if not entry["name"] or "\n" in entry["name"]:
            raise TableError(f"{name}.name: must not be empty or hold a line feed")
        tab = TABS[entry["tab"]]
        stack = entry.get("stack", 1)
        if not isinstance(stack, int) or isinstance(stack, bool) or not 1 <= stack <= 1_000_000 or (tab == 0 and stack != 1):
            raise TableError(f"{name}.stack: a whole number from 1 to 1000000, and 1 for equipment")
        items[int(key)] = ItemKind(entry["name"], tab, stack)
    return items


def _drops(entries, monster_exp, items):
    if not isinstance(entries, dict):
        raise TableError("monsters.drops: expected an object")
    drops = {}
    for key, entry in entries.items():
        name = f"monsters.drops[{key}]"
        if not key.isdigit() or int(key) not in monster_exp or not isinstance(entry, list):
            raise TableError(f"{name}: must be a list under a known monster kind")
        drops[int(key)] = _drop_list(name, entry, items)
    return drops


def _drop_list(name, entry, items):
    if not isinstance(entry, list):
        raise TableError(f"{name}: expected a list")
    kind = []
    for drop in entry:
        try:
            item, percent, count = drop["item"], drop["percent"], drop["count"]
        except (KeyError, TypeError):
            raise TableError(f"{name}: each drop needs item, percent and count") from None
        if item not in items or not (isinstance(percent, int) and 0 <= percent <= 100) or not (
                isinstance(count, int) and 1 <= count <= items[item].stack):
            raise TableError(f"{name}: item {item!r} must be in items, percent 0-100, count 1 to its stack")
        kind.append(Drop(item, percent, count))
    return tuple(kind)


def load_tables(path):
    """Read and validate the tables file at C{path}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise TableError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TableError(f"{path} is not valid JSON: {e}") from None
    return parse_tables(data)
