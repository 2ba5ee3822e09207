"""
One game server's share of the atomicity test, in a process of its own: the
game server's L{Inventory} on a router of its own sends random moves,
enhances, uses and deletes for one user, all at once, when told "go" on its
standard input, and prints what they took as JSON.

    python -m tests.inventory_changes USER_ID SEED COUNT
"""

import collections
import json
import random
import sys

from twisted.internet import defer, task, threads

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.inventory import Inventory
from dreamraid.tables import load_tables
from tests import cluster
from tests.support import ROOT

TABLES = load_tables(ROOT / "conf" / "tables.json")
# What a successful use or delete takes: one consumable, one equipment item.
USED, DELETED = 201, 101


async def random_changes(inventory, user_id, rng, count):
    """
    Send C{count} random changes at once; C{(taken, outcomes)}: units taken
    by code, and how many of each kind succeeded or were refused.
    """
    taken, outcomes = collections.Counter(), collections.Counter()

    async def one():
        kind = rng.choice(["move", "move", "enhance", "use", "delete"])
        try:
            if kind == "move":
                await inventory.move(user_id, rng.randrange(3), rng.randrange(12), rng.randrange(12))
            elif kind == "enhance":
                await inventory.enhance(user_id, rng.randrange(12))
            elif kind == "use":
                await inventory.use(user_id, rng.randrange(12))
                taken[USED] += 1
            else:
                await inventory.delete(user_id, 0, rng.randrange(12))
                taken[DELETED] += 1
            outcomes[kind] += 1
        except RequestRefused as e:
            if e.code not in (ErrorCode.EMPTY_SLOT, ErrorCode.MAX_ENHANCEMENT):
                raise
            outcomes["refused"] += 1

    await gather([one() for _ in range(count)])
    return taken, outcomes


async def main(reactor, user_id, seed, count):
    router = cluster.router()
    await router.refresh()
    inventory = Inventory(router, TABLES, reactor, random.Random(seed))
    print("ready", flush=True)
    await threads.deferToThread(sys.stdin.readline)
    taken, outcomes = await random_changes(inventory, user_id, random.Random(seed), count)
    print(json.dumps({"taken": taken, "outcomes": outcomes}), flush=True)
    await router.stopService()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *map(int, sys.argv[1:]))))
