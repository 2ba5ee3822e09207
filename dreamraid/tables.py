"""
The game tables (levels, enhancement, monsters): a JSON file under ``conf/``
read into a frozen, validated L{GameTables}.  The numbers are the game
designer's; code only checks their shape.
"""

import json
from dataclasses import dataclass
from types import MappingProxyType


class TableError(Exception):
    """The tables file is unreadable or breaks a rule; the message says which."""


@dataclass(frozen=True)
class GameTables:
    """Progression and enhancement rules."""

    max_level: int
    exp_to_advance: MappingProxyType  # level -> cumulative exp needed to leave it
    max_enhancement: int
    enhance_success_percent: MappingProxyType  # enhancement level -> chance
    monster_exp: MappingProxyType  # monster kind -> exp granted by a hunt


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
    return GameTables(
        max_level=max_level,
        exp_to_advance=MappingProxyType(exp),
        max_enhancement=max_enhancement,
        enhance_success_percent=MappingProxyType(chance),
        monster_exp=MappingProxyType(monster_exp),
    )


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
