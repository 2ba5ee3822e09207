"""
Matchmaking against the real Redis Cluster: first come first served within
a level group, a party as one ticket, raids of four, cancelling, widening
to the neighbouring group on a driven clock, players freed when a raid's
time is up, two matchers never putting a player in two raids, the timer outliving an
error reply from Redis, and over TCP
two game server processes matching their players together, and a party's
ticket withdrawn when the party changes or its leader drops.
"""

import random

from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import defer, task

from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.matchmaking import (
    GROUPS, TICKET_GRACE_MS, GameServers, Matchmaker, level_group, matchmaking_keys)
from dreamraid.services.parties import Parties
from dreamraid.services.presence import Presence, presence_key
from tests import cluster
from tests.storage import test_settings
from tests.support import eventually, log_lines, when_logged
from tests.test_game import GameServerCase
from tests.test_inventory import InventoryCase


class MatchmakerCase(InventoryCase):
    """Matchmakers on a driven clock, with matchmaking keys of the test's own."""

    async def setUp(self):
        await super().setUp()
        self.prefix = f"testmm{random.getrandbits(40):x}"
        keys = matchmaking_keys(self.prefix)
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in keys]))
        self.presence = Presence(self.router, "test-matchmaking", 30, 900)
        self.formed = []

    def matchmaker(self, raid_size=2, router=None, seed=1, clock=None, presence=None, parties=None):
        raids = test_settings(raids_matchmaking_prefix=self.prefix, raids_widen_after="30",
                              raids_raid_size=str(raid_size)).raids
        router = router or self.router
        presence = presence or self.presence
        parties = parties or Parties(router, presence, random.Random(seed), raid_size)
        return Matchmaker(router, presence, parties, clock or self.clock, random.Random(seed), raids, 200,
                          self.formed.append)


class MatchmakerTests(MatchmakerCase):

    async def test_players_are_handed_only_to_game_servers_alive(self):
        """
        Of three configured game servers two renew their leases with their
        addresses: the session hands out those two, then only the one still
        renewing once the other's lease lapses, and every configured one
        when none is alive or the leases cannot be read.  A server whose
        lease lapsed an hour ago is forgotten.
        """
        lines = log_lines(self)
        configured = [("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003)]
        servers = GameServers(self.router, self.clock, self.prefix, configured)
        self.assertEqual(await servers.alive(), configured)  # none has renewed yet
        a, b = self.matchmaker(), self.matchmaker(seed=2)
        self.assertEqual(await a.renew("game-a", "127.0.0.1:9001", {}), [])
        await b.renew("game-b", "127.0.0.1:9002", {})
        self.assertEqual(await servers.alive(), configured)  # read at most once a second
        self.clock.advance(1)
        self.assertEqual(await servers.alive(), configured[:2])
        self.clock.advance(4.5)  # past game-a's lease (5 s); game-b renews
        await b.renew("game-b", "127.0.0.1:9002", {})
        self.assertEqual(await servers.alive(), configured[1:2])
        self.clock.advance(6)
        self.assertEqual(await servers.alive(), configured)
        leases, addresses = f"{{{self.prefix}}}:leases", f"{{{self.prefix}}}:servers"
        self.clock.advance(3600)
        await a.reap()
        self.assertEqual((await self.router.execute("ZCARD", leases), await self.router.execute("HLEN", addresses)),
                         (0, 0))
        await self.router.execute("SET", leases, "not a sorted set")
        self.clock.advance(1)
        self.assertEqual(await servers.alive(), configured)
        self.assertTrue(any(line.startswith("game servers: cannot read which are alive") and "WRONGTYPE" in line
                            for line in lines), lines)

    async def test_tickets_of_a_server_that_stopped_renewing_are_dropped(self):
        """
        A party queued on a game server that then dies (its lease lapses,
        its own passes never run): passes elsewhere neither match nor drop
        its ticket through a failover-long grace, then drop it and tell the
        member on a live server; the party's players may queue again, and
        then form a raid with the solo player who waited.
        """
        listening = Presence(self.router, f"test-listening-{random.getrandbits(40):x}", 30, 900)
        told = []
        subscription = listening.listen(lambda user_id, jti: None,
                                        lambda users, event, body, holder=None: told.append((users, event, body)))
        self.addCleanup(subscription.stop)
        await subscription.when_subscribed()
        dead_server = Presence(self.router, f"test-dead-{random.getrandbits(40):x}", 30, 900)
        dead_clock = task.Clock()  # never advanced: the dead server's passes never run
        dead_clock.advance(self.clock.seconds())
        dead = self.matchmaker(raid_size=3, clock=dead_clock, presence=dead_server)
        live = self.matchmaker(raid_size=3, seed=2)
        leader, member, solo = [await self.new_user() for _ in range(3)]
        self.addCleanup(lambda: self.router.execute("DEL", presence_key(member)))
        await self.router.execute("SET", presence_key(member), listening.server_id)
        parties = Parties(self.router, dead_server, random.Random(2), 3)
        party = await parties.create(leader, "leader")
        self.addCleanup(lambda: gather([parties.leave_if_any(u) for u in (leader, member)]))
        await parties.join(member, "member", party.code)
        await dead.enqueue(leader)
        self.clock.advance(6)  # past the dead server's lease (5 s), within the grace
        await live.enqueue(solo)
        self.assertEqual(await live.run_pass(), [])  # the party and the solo would fill a raid of three
        self.assertEqual(await live.queue_lengths(), {1: 2, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0})
        self.clock.advance(TICKET_GRACE_MS / 1000)
        self.assertEqual(await live.run_pass(), [])
        self.assertEqual(await live.queue_lengths(), {1: 1, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0})
        await eventually(lambda: defer.succeed(([member], "matchmaking", {"state": "cancelled", "group": 0}) in told))
        self.assertEqual(await live.enqueue(leader), 1)  # ALREADY_QUEUED had the dropped ticket held them
        [raid] = await live.run_pass()
        self.assertEqual(sorted(raid.members), sorted([leader, member, solo]))

    async def test_a_ticket_queued_before_tickets_named_their_server_is_dropped(self):
        """A ticket in the old layout (no server) is dropped by a pass, and its player may queue again."""
        old, now = await self.new_user(), int(self.clock.seconds() * 1000)
        tag = f"{{{self.prefix}}}"
        await self.router.execute("HSET", f"{tag}:tickets", "old-ticket", f"1 {now} 1 1 {old}")
        await self.router.execute("ZADD", f"{tag}:queue:1", now, "old-ticket")
        await self.router.execute("HSET", f"{tag}:players", old, "old-ticket")
        matchmaker = self.matchmaker()
        self.assertEqual(await matchmaker.run_pass(), [])
        self.assertEqual(await matchmaker.queue_lengths(), dict.fromkeys(range(1, GROUPS + 1), 0))
        self.assertEqual(await matchmaker.enqueue(old), 1)

    def test_level_groups(self):
        """Levels 1-2 group 1, 3-5 group 2, ... 15 group 6."""
        self.assertEqual([level_group(level) for level in range(1, 16)],
                         [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6])

    async def test_first_come_first_served_in_a_group(self):
        """Three solo tickets of one group, raids of two: the first two form one, the third waits."""
        matchmaker = self.matchmaker()
        players = [await self.new_user(level) for level in (1, 2, 1, 3)]
        for user_id in players:
            await matchmaker.enqueue(user_id)
        formed = await matchmaker.run_pass()
        self.assertEqual([raid.members for raid in formed], [players[:2]])
        self.assertEqual(self.formed, formed)
        await self.refused(ErrorCode.NOT_QUEUED, matchmaker.cancel(players[0]))
        await self.refused(ErrorCode.ALREADY_QUEUED, matchmaker.enqueue(players[1]))
        await self.refused(ErrorCode.ALREADY_QUEUED, matchmaker.enqueue(players[2]))
        await matchmaker.cancel(players[2])
        await self.refused(ErrorCode.NOT_QUEUED, matchmaker.cancel(players[2]))
        self.assertEqual(await matchmaker.run_pass(), [])

    async def test_a_party_is_one_ticket_in_a_raid_of_four(self):
        """Only the leader queues a party; its highest level picks the group; two solos fill the raid."""
        matchmaker = self.matchmaker(raid_size=4)
        leader, member, solo1, solo2, other = [await self.new_user(level) for level in (1, 4, 3, 5, 1)]
        parties = Parties(self.router, self.presence, random.Random(2), 4)
        party = await parties.create(leader, "leader")
        self.addCleanup(lambda: parties.leave_if_any(leader))
        self.addCleanup(lambda: parties.leave_if_any(member))
        await parties.join(member, "member", party.code)
        await self.refused(ErrorCode.NOT_PARTY_LEADER, matchmaker.enqueue(member))
        self.assertEqual(await matchmaker.enqueue(leader), 2)
        self.assertEqual(await matchmaker.enqueue(other), 1)
        self.assertEqual(await matchmaker.run_pass(), [])
        await matchmaker.enqueue(solo1)
        await matchmaker.enqueue(solo2)
        [raid] = await matchmaker.run_pass()
        self.assertEqual(sorted(raid.members), sorted([leader, member, solo1, solo2]))

    async def test_widening_to_the_neighbouring_group_only(self):
        """Groups 1 and 2 match once a ticket has waited widen_after; groups 1 and 3 never do."""
        matchmaker = self.matchmaker()
        low, middle = await self.new_user(1), await self.new_user(3)
        await matchmaker.enqueue(low)
        await matchmaker.enqueue(middle)
        self.clock.advance(29.9)
        self.assertEqual(await matchmaker.run_pass(), [])
        self.clock.advance(0.1)
        [raid] = await matchmaker.run_pass()
        self.assertEqual(raid.members, [low, middle])

        far_low, far_high = await self.new_user(1), await self.new_user(6)
        await matchmaker.enqueue(far_low)
        await matchmaker.enqueue(far_high)
        self.clock.advance(300)
        self.assertEqual(await matchmaker.run_pass(), [])

    async def test_queue_lengths_and_waits_by_group(self):
        """The queues' lengths by group, and how long a formed raid's tickets waited, in seconds by group."""
        matchmaker = self.matchmaker()
        registry = CollectorRegistry()
        matchmaker.waited = Histogram("waited", "", ["group"], registry=registry)
        first, second, third = await self.new_user(1), await self.new_user(2), await self.new_user(4)
        await matchmaker.enqueue(first)
        await cluster.flush_scripts(self.router)
        self.clock.advance(3)
        # The pass the first ticket started must end before the second is queued: in CI on a
        # fresh cluster it once formed the raid with the second ticket (its scripts had to be
        # loaded, as after this flush), and the lengths below were {1: 0, ...}.
        await matchmaker.passes_done()
        await matchmaker.enqueue(second)
        await matchmaker.enqueue(third)
        self.assertEqual(await matchmaker.queue_lengths(), {1: 2, 2: 1, 3: 0, 4: 0, 5: 0, 6: 0})
        self.clock.advance(1)
        await matchmaker.run_pass()
        self.assertEqual(await matchmaker.queue_lengths(), {1: 0, 2: 1, 3: 0, 4: 0, 5: 0, 6: 0})
        self.assertEqual(registry.get_sample_value("waited_count", {"group": "1"}), 2)
        self.assertEqual(registry.get_sample_value("waited_sum", {"group": "1"}), 4 + 1)

    async def test_players_are_free_again_when_the_raid_is_over(self):
        """A raid's players cannot queue during its longest life; after it they can."""
        matchmaker = self.matchmaker()
        a, b = await self.new_user(), await self.new_user()
        await matchmaker.enqueue(a)
        await matchmaker.enqueue(b)
        self.assertEqual(len(await matchmaker.run_pass()), 1)
        await self.refused(ErrorCode.ALREADY_QUEUED, matchmaker.enqueue(a))
        self.clock.advance(200)
        await matchmaker.run_pass()
        await matchmaker.enqueue(a)

    async def test_two_matchers_never_put_a_player_in_two_raids(self):
        """Forty tickets, passes from two routers at once: twenty raids, every player in exactly one."""
        other_router = cluster.router()
        self.addCleanup(other_router.stopService)
        await other_router.refresh()
        matchmakers = [self.matchmaker(), self.matchmaker(router=other_router, seed=2)]
        players = [await self.new_user() for _ in range(40)]
        await gather([matchmakers[i % 2].enqueue(u) for i, u in enumerate(players)])
        results = await gather([m.run_pass() for m in matchmakers for _ in range(3)])
        members = [u for formed in results for raid in formed for u in raid.members]
        self.assertEqual(sorted(members), sorted(players))
        self.assertEqual(len({raid.raid_id for formed in results for raid in formed}), 20)

    async def test_the_timer_carries_on_after_an_error_reply(self):
        """
        A timed pass that Redis answers with an error (WRONGTYPE: a key of
        the wrong type) is logged; once the key is right, the next timed
        pass forms the raid.
        """
        raid_until = matchmaking_keys(self.prefix)[GROUPS + 2]
        await self.router.execute("SET", raid_until, "not a sorted set")
        queuer = self.matchmaker(clock=task.Clock())  # its own passes never run
        for user_id in [await self.new_user(), await self.new_user()]:
            await queuer.enqueue(user_id)
        matchmaker = self.matchmaker()
        matchmaker.startService()
        self.addCleanup(matchmaker.stopService)
        logged = when_logged(self, "matchmaking: a pass failed")
        self.clock.advance(1.0)
        self.assertIn("WRONGTYPE", await logged)
        self.assertEqual(self.formed, [])
        await self.router.execute("DEL", raid_until)
        self.clock.advance(1.0)
        await eventually(lambda: defer.succeed(self.formed))


class MatchmakingOverTcpTests(GameServerCase):

    async def test_players_on_two_processes_are_matched(self):
        """
        Two players on two game server processes queue; both are told of the
        same raid and its host, each with a UDP key of its own.
        """
        prefix = ["--raids-matchmaking-prefix", f"testmm{random.getrandbits(40):x}"]
        first, second = await gather([self.game_process(*prefix), self.game_process(*prefix)])
        clients = []
        for server in (first, second):
            user_id = await self.new_user()
            client, _ = await self.authenticated(server, await self.entered_token(user_id))
            clients.append((client, user_id))
        for client, _ in clients:
            _, queued = await client.request(packets.QUEUE_RAID, {})
            self.assertEqual(queued, {"group": 1})
        found = [await client.next_push("raid_found") for client, _ in clients]
        same = ("raid_id", "host", "udp", "raid_number", "members")
        self.assertEqual([{k: f[k] for k in same} for f in found][0], {k: found[1][k] for k in same})
        self.assertNotEqual(found[0]["key"], found[1]["key"])
        self.assertEqual([len(bytes.fromhex(f["key"])) for f in found], [16, 16])
        self.assertEqual(sorted(m["user_id"] for m in found[0]["members"]), sorted(u for _, u in clients))
        self.assertEqual(sorted(f["member"] for f in found), [0, 1])
        self.assertIn(found[0]["host"], (f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"))

    async def test_a_changed_or_dropped_party_leaves_the_queue(self):
        """Members hear their party queued; a join or the leader dropping takes its ticket out, and they hear that."""
        server = await self.game_server("--raids-raid-size", "4",
                                        "--raids-matchmaking-prefix", f"testmm{random.getrandbits(40):x}")
        (leader, _), (member, _), (late, _) = [
            await self.authenticated(server, await self.entered_token(await self.new_user())) for _ in range(3)]
        _, party = await leader.request(packets.CREATE_PARTY, {})
        code = party["code"]
        await member.request(packets.JOIN_PARTY, {"code": code})
        await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(await member.next_push("matchmaking"), {"state": "queued", "group": 1})
        await late.request(packets.JOIN_PARTY, {"code": code})
        self.assertEqual(await member.next_push("matchmaking"), {"state": "cancelled", "group": 0})
        with self.assertRaises(RemoteError) as raised:
            await leader.request(packets.CANCEL_QUEUE, {})
        self.assertEqual(raised.exception.code, ErrorCode.NOT_QUEUED)

        await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(await member.next_push("matchmaking"), {"state": "queued", "group": 1})
        leader.transport.loseConnection()
        self.assertEqual(await member.next_push("matchmaking"), {"state": "cancelled", "group": 0})
