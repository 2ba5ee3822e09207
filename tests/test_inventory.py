"""
Hunting, the inventory scripts and a raid's pay against the real Redis
Cluster: the rules with a seeded random source and a driven clock, grants
all or nothing, what a full inventory is told, a pay called again after a
lost reply paying once, the enhancement chances over 10,000 rolls a level,
and atomicity under concurrent requests from two processes.
"""

import collections
import json
import math
import random

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.inventory import Inventory, SlotItem
from dreamraid.services.livestore import (
    Item, LiveStore, Profile, data_keys, raid_mark_key, raid_receipt_key, tab_key)
from dreamraid.tables import load_tables
from tests import cluster
from tests.support import ROOT, require_stack, spawn

TABLES = load_tables(ROOT / "conf" / "tables.json")


class InventoryCase(TestCase):

    timeout = 120

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.random = random.Random(7)
        self.inventory = Inventory(self.router, TABLES, self.clock, self.random)
        self.live = LiveStore(self.router)

    async def new_user(self, level=1, exp=0, items=None):
        """A live user with a random id far from real ones; removed after the test."""
        user_id = random.randrange(10**15, 10**16)
        await self.live.load(Profile(user_id, "t", level, exp, 0, 0, items or {}))
        self.addCleanup(lambda: self.router.execute("DEL", *data_keys(user_id)))
        return user_id

    async def refused(self, code, call):
        with self.assertRaises(RequestRefused) as raised:
            await call
        self.assertEqual(raised.exception.code, code)

    async def version(self, user_id):
        return int(await self.router.execute("HGET", data_keys(user_id)[0], "version"))


class GrantArgumentTests(SynchronousTestCase):
    """A grant's arguments are checked before any script runs (no stack needed)."""

    def test_count_zero_and_unknown_item(self):
        """A count of 0 is BAD_RANGE (not UNKNOWN_ITEM); an unknown code is UNKNOWN_ITEM whatever the count."""
        inventory = Inventory(None, TABLES, task.Clock(), random.Random(1))
        for item_code, count, code in [(201, 0, ErrorCode.BAD_RANGE), (101, 0, ErrorCode.BAD_RANGE),
                                       (999, 1, ErrorCode.UNKNOWN_ITEM), (999, 0, ErrorCode.UNKNOWN_ITEM)]:
            refused = self.failureResultOf(inventory.grant(1, item_code, count), RequestRefused).value
            self.assertEqual(refused.code, code, (item_code, count))


class HuntTests(InventoryCase):

    async def test_levels_follow_the_table_with_several_at_once_and_the_cap(self):
        """Exp accumulates; the level is the table's for that exp, several levels may come at once, 15 is the cap."""
        user_id = await self.new_user()
        exp, level = 0, 1
        for _ in range(120):
            hunted = await self.inventory.hunt(user_id, 5)
            self.clock.advance(TABLES.hunt_cooldown_ms / 1000)
            exp += 5
            expected = level
            while expected < TABLES.max_level and exp >= TABLES.exp_to_advance[expected]:
                expected += 1
            self.assertEqual((hunted.exp, hunted.level, hunted.levels_gained), (exp, expected, expected - level))
            level = expected
        self.assertEqual(level, 15)
        jump = await self.new_user(level=1, exp=0)
        await self.router.execute("HSET", data_keys(jump)[0], "exp", 9)
        hunted = await self.inventory.hunt(jump, 1)
        self.assertEqual((hunted.exp, hunted.level, hunted.levels_gained), (10, 6, 5))

    async def test_cooldown_and_unknown_monster(self):
        """A second hunt within the cooldown is refused; after it, allowed; an unknown kind is refused."""
        user_id = await self.new_user()
        await self.inventory.hunt(user_id, 1)
        await self.refused(ErrorCode.HUNT_COOLDOWN, self.inventory.hunt(user_id, 1))
        self.clock.advance(TABLES.hunt_cooldown_ms / 1000)
        await self.inventory.hunt(user_id, 1)
        await self.refused(ErrorCode.UNKNOWN_MONSTER, self.inventory.hunt(user_id, 9))

    async def test_drops_stack_then_fill_free_slots(self):
        """Drops top up stacks of their item, then take the lowest free slots; each change raises the version."""
        user_id = await self.new_user(items={(2, 0): Item(301, 0, 98), (2, 1): Item(302, 0, 5)})
        changed = []
        for _ in range(40):
            changed += (await self.inventory.hunt(user_id, 3)).changed
            self.clock.advance(1)
        ore = [i for i in await self.inventory.list(user_id) if i.item_code == 301]
        self.assertEqual(ore[0], SlotItem(2, 0, 301, 0, 99))
        self.assertGreater(len(ore), 1)
        self.assertEqual([i.slot for i in ore[1:]], list(range(2, len(ore) + 1)))
        self.assertTrue(changed)
        self.assertEqual(await self.version(user_id), 40)


class InventoryTests(InventoryCase):

    async def test_move_swaps_merges_and_moves(self):
        """Move to an empty slot moves, onto another item swaps, onto the same stackable merges up to the stack."""
        user_id = await self.new_user(items={(2, 0): Item(301, 0, 60), (2, 1): Item(301, 0, 70),
                                             (0, 0): Item(101, 3, 1), (0, 1): Item(102, 0, 1)})
        self.assertEqual(await self.inventory.move(user_id, 2, 0, 1),
                         [SlotItem(2, 0, 301, 0, 31), SlotItem(2, 1, 301, 0, 99)])
        self.assertEqual(await self.inventory.move(user_id, 0, 0, 1),
                         [SlotItem(0, 0, 102, 0, 1), SlotItem(0, 1, 101, 3, 1)])
        self.assertEqual(await self.inventory.move(user_id, 0, 1, 7),
                         [SlotItem(0, 1, 0, 0, 0), SlotItem(0, 7, 101, 3, 1)])
        await self.refused(ErrorCode.EMPTY_SLOT, self.inventory.move(user_id, 0, 1, 2))
        await self.refused(ErrorCode.BAD_SLOT, self.inventory.move(user_id, 0, 0, TABLES.slots))
        await self.refused(ErrorCode.BAD_SLOT, self.inventory.move(user_id, 3, 0, 1))

    async def test_use_delete_grant(self):
        """Use takes one consumable (the last empties the slot); delete empties; grant fills by the tables."""
        user_id = await self.new_user(items={(1, 4): Item(201, 0, 2)})
        self.assertEqual(await self.inventory.use(user_id, 4), [SlotItem(1, 4, 201, 0, 1)])
        self.assertEqual(await self.inventory.use(user_id, 4), [SlotItem(1, 4, 0, 0, 0)])
        await self.refused(ErrorCode.EMPTY_SLOT, self.inventory.use(user_id, 4))
        granted = await self.inventory.grant(user_id, 201, 45)
        self.assertEqual([(i.slot, i.count) for i in granted], [(0, 20), (1, 20), (2, 5)])
        self.assertEqual(await self.inventory.delete(user_id, 1, 1), [SlotItem(1, 1, 0, 0, 0)])
        await self.refused(ErrorCode.EMPTY_SLOT, self.inventory.delete(user_id, 1, 1))
        await self.refused(ErrorCode.UNKNOWN_ITEM, self.inventory.grant(user_id, 999, 1))
        await self.refused(ErrorCode.BAD_RANGE, self.inventory.grant(user_id, 201, 0))
        self.assertEqual(await self.inventory.list(user_id), [SlotItem(1, 0, 201, 0, 20), SlotItem(1, 2, 201, 0, 5)])

    async def test_use_and_enhance_only_items_of_their_kind(self):
        """
        An item the tables no longer say is a consumable (or equipment):
        after a table change moved its code to another tab, or removed it,
        use (enhance) of its slot is refused with WRONG_ITEM_KIND and changes
        nothing; the player can still move or delete it.
        """
        user_id = await self.new_user(items={(1, 0): Item(301, 0, 5), (1, 1): Item(999, 0, 2),
                                             (0, 0): Item(201, 0, 1), (0, 1): Item(998, 4, 1)})
        before = await self.inventory.list(user_id)
        for slot in (0, 1):
            await self.refused(ErrorCode.WRONG_ITEM_KIND, self.inventory.use(user_id, slot))
            await self.refused(ErrorCode.WRONG_ITEM_KIND, self.inventory.enhance(user_id, slot))
        self.assertEqual((await self.inventory.list(user_id), await self.version(user_id)), (before, 0))
        self.assertEqual(await self.inventory.delete(user_id, 1, 0), [SlotItem(1, 0, 0, 0, 0)])

    async def test_full_tab_and_unloaded_user(self):
        """A grant beyond the tab's room is refused and changes nothing; a user whose data is gone is refused."""
        user_id = await self.new_user()
        await self.refused(ErrorCode.INVENTORY_FULL, self.inventory.grant(user_id, 101, TABLES.slots + 1))
        self.assertEqual(await self.inventory.list(user_id), [])
        self.assertEqual(len(await self.inventory.grant(user_id, 101, TABLES.slots)), TABLES.slots)
        await self.refused(ErrorCode.INVENTORY_FULL, self.inventory.grant(user_id, 101, 1))
        await self.router.execute("DEL", *data_keys(user_id))
        await self.refused(ErrorCode.SESSION_NOT_LIVE, self.inventory.grant(user_id, 101, 1))
        self.assertEqual(await self.router.execute("EXISTS", *data_keys(user_id)), 0)

    async def test_a_grant_that_does_not_fit_changes_nothing(self):
        """
        All or nothing: a grant beyond the room left (the stacks of its code
        topped up, then free slots) is refused and changes nothing, not even
        the version; one that just fits is stored whole.
        """
        items = {(1, s): Item(201, 0, 20) for s in range(1, TABLES.slots - 1)}
        items[1, 0] = Item(201, 0, 15)
        user_id = await self.new_user(items=items)
        before = await self.inventory.list(user_id)
        await self.refused(ErrorCode.INVENTORY_FULL, self.inventory.grant(user_id, 201, 5 + 20 + 1))
        await self.refused(ErrorCode.INVENTORY_FULL, self.inventory.grant(user_id, 202, 11))
        self.assertEqual((await self.inventory.list(user_id), await self.version(user_id)), (before, 0))
        self.assertEqual(await self.inventory.grant(user_id, 201, 5 + 20),
                         [SlotItem(1, 0, 201, 0, 20), SlotItem(1, TABLES.slots - 1, 201, 0, 20)])
        await self.refused(ErrorCode.INVENTORY_FULL, self.inventory.grant(user_id, 202, 1))
        self.assertEqual(await self.version(user_id), 1)

    async def test_enhancement_rate_over_ten_thousand_rolls_a_level(self):
        """At each level, 10,000 rolls succeed at the table's rate (within 4.5 standard deviations); +10 is refused."""
        user_id = await self.new_user()
        slots = 50
        for level in range(TABLES.max_enhancement):
            chance = TABLES.enhance_success_percent[level] / 100
            await self.router.execute("HSET", tab_key(user_id, 0),
                                      *[v for s in range(slots) for v in (s, f"101:{level}:1")])
            successes = 0
            for _ in range(10_000 // slots):
                results = await gather([self.inventory.enhance(user_id, s) for s in range(slots)])
                won = [r.slot for r in results if r.success]
                self.assertTrue(all(r.enhancement == (level + 1 if r.success else level) for r in results))
                successes += len(won)
                if won:
                    await self.router.execute("HSET", tab_key(user_id, 0), *[v for s in won for v in (s, f"101:{level}:1")])
            sigma = math.sqrt(10_000 * chance * (1 - chance))
            self.assertLessEqual(abs(successes - 10_000 * chance), 4.5 * sigma + 0.5, f"level {level}")
        await self.router.execute("HSET", tab_key(user_id, 0), 0, f"101:{TABLES.max_enhancement}:1")
        await self.refused(ErrorCode.MAX_ENHANCEMENT, self.inventory.enhance(user_id, 0))


class RaidPayTests(InventoryCase):

    async def marked(self, raid_id, items=None):
        """A live user whose raid mark names C{raid_id}."""
        user_id = await self.new_user(items=items)
        self.addCleanup(lambda: self.router.execute("DEL", raid_mark_key(user_id), raid_receipt_key(user_id)))
        await self.router.execute("SET", raid_mark_key(user_id), raid_id, "PX", 60_000)
        return user_id

    async def test_a_pay_called_again_after_a_lost_reply_pays_once(self):
        """
        A raid pays a player only while their raid mark names it, and takes
        the mark off as it pays: called again, as after an OutcomeUnknown,
        it answers what it paid and pays nothing more; another raid pays
        nothing, and neither does a call after the answer is no longer kept.
        """
        user_id = await self.marked("raid-a", {(2, 0): Item(301, 0, 90)})
        self.assertIsNone(await self.inventory.reward(user_id, "raid-b", 7, 60))
        self.assertEqual(await self.version(user_id), 0)
        paid = await self.inventory.reward(user_id, "raid-a", 7, 60)
        self.assertEqual((paid.exp_gained, paid.exp, paid.level, paid.best), (7, 7, 5, 7))
        self.assertIn(SlotItem(2, 0, 301, 0, 93), paid.changed)
        self.assertEqual(await self.router.execute("EXISTS", raid_mark_key(user_id)), 0)
        self.assertEqual(await self.inventory.reward(user_id, "raid-a", 7, 60), paid)
        self.assertIsNone(await self.inventory.reward(user_id, "raid-b", 7, 60))
        profile = await self.live.snapshot(user_id)
        self.assertEqual((profile.exp, profile.best, profile.version), (7, 7, 1))
        self.assertEqual(await self.inventory.list(user_id), sorted(
            {(i.tab, i.slot): i for i in [SlotItem(2, 0, 301, 0, 90), *paid.changed]}.values()))
        await self.router.execute("DEL", raid_receipt_key(user_id))
        self.assertIsNone(await self.inventory.reward(user_id, "raid-a", 7, 60))
        self.assertEqual(await self.version(user_id), 1)

    async def test_drops_that_do_not_fit_are_neither_stored_nor_told(self):
        """
        A full materials tab: a raid's drops top up what they can and the
        rest is lost; the reply lists exactly the slots that changed, as
        stored.
        """
        items = {(2, s): Item(302, 0, 99) for s in range(1, TABLES.slots)}
        items[2, 0] = Item(301, 0, 98)
        user_id = await self.marked("raid-a", items)
        before = await self.inventory.list(user_id)
        paid = await self.inventory.reward(user_id, "raid-a", 3, 60)
        self.assertEqual(paid.changed, [SlotItem(2, 0, 301, 0, 99)])
        self.assertEqual(await self.inventory.list(user_id), [SlotItem(2, 0, 301, 0, 99), *before[1:]])


class AtomicityTests(InventoryCase):

    async def test_two_processes_two_hundred_concurrent_changes(self):
        """
        200 moves, enhances, uses and deletes on one user from two processes,
        each the game server's inventory on a router of its own (one
        connection per user means two game servers meet on a user only
        through their scripts), all sent at once on one "go": the units left are exactly those before minus
        what the successful uses and deletes took; no slot holds two items.
        """
        items = {(0, s): Item(101, 0, 1) for s in range(10)}
        items.update({(1, s): Item(201, 0, 10) for s in range(10)})
        items.update({(2, s): Item(301, 0, 50) for s in range(10)})
        user_id = await self.new_user(items=items)
        children = [spawn(self, "-m", "tests.inventory_changes", str(user_id), str(seed), "100") for seed in (3, 4)]
        await gather([child.ready for child in children])
        for child in children:
            child.transport.write(b"go\n")
        await gather([child.ended for child in children])
        results = [json.loads(child.lines()[-1]) for child in children]
        taken, outcomes = collections.Counter(), collections.Counter()
        for result in results:
            taken.update({int(code): n for code, n in result["taken"].items()})
            outcomes.update(result["outcomes"])

        after = await self.inventory.list(user_id)
        units = collections.Counter()
        for item in after:
            units[item.item_code] += item.count
        self.assertEqual(units, collections.Counter({101: 10 - taken[101], 201: 100 - taken[201], 301: 500}))
        self.assertTrue(all(i.tab == {101: 0, 201: 1, 301: 2}[i.item_code] for i in after))
        self.assertTrue(all(i.count <= TABLES.items[i.item_code].stack for i in after))
        self.assertGreater(outcomes["move"], 20)
        self.assertGreater(taken[201] + taken[101], 10)
