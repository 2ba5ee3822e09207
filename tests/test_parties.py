"""
Parties over game servers' TCP against the real Redis Cluster: create,
join by code, full, kick, leave with the next member leading, and the
pushes that tell members of each change, within one process and across two
game server processes; a stale membership taken over.
"""

import random

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.parties import CHANGE_REASONS, Parties, claim_key, membership_key, party_key
from dreamraid.services.rediscluster import ClusterUnavailable
from tests import cluster
from tests.support import eventually, log_lines, require_stack
from tests.test_game import GameServerCase


class PartyTests(GameServerCase):

    async def player(self, server):
        """A new user authenticated on C{server}: C{(client, user_id, name)}."""
        user_id = await self.new_user()
        client, body = await self.authenticated(server, await self.entered_token(user_id))
        return client, user_id, body["name"]

    async def refused_with(self, code, client, message, body):
        with self.assertRaises(RemoteError) as raised:
            await client.request(message, body)
        self.assertEqual(raised.exception.code, code)

    async def test_create_join_kick_leave_and_the_pushes(self):
        """The whole life of a party of three, each change pushed to the members it concerns."""
        server = await self.game_server("--raids-raid-size", "3")
        (a, a_id, a_name), (b, b_id, b_name), (c, c_id, c_name), (d, d_id, _) = [
            await self.player(server) for _ in range(4)]
        _, created = await a.request(packets.CREATE_PARTY, {})
        code = created["code"]
        self.assertRegex(code, "^[A-Z0-9]{6}$")
        self.assertEqual(created, {"code": code, "leader": a_id, "members": [{"user_id": a_id}], "names": a_name})

        _, joined = await b.request(packets.JOIN_PARTY, {"code": code.lower()})
        self.assertEqual(joined["members"], [{"user_id": a_id}, {"user_id": b_id}])
        self.assertEqual(joined["names"], f"{a_name} {b_name}")
        pushed = await a.next_push("party_changed")
        self.assertEqual((pushed["reason"], pushed["user_id"], pushed["names"]), ("joined", b_id, f"{a_name} {b_name}"))
        await c.request(packets.JOIN_PARTY, {"code": code})
        await self.refused_with(ErrorCode.PARTY_FULL, d, packets.JOIN_PARTY, {"code": code})
        await self.refused_with(ErrorCode.NO_SUCH_PARTY, d, packets.JOIN_PARTY, {"code": "NOPE00"})
        await self.refused_with(ErrorCode.NO_SUCH_PARTY, d, packets.JOIN_PARTY, {"code": "short"})
        await self.refused_with(ErrorCode.ALREADY_IN_PARTY, b, packets.CREATE_PARTY, {})
        await self.refused_with(ErrorCode.NOT_PARTY_LEADER, b, packets.KICK_MEMBER, {"user_id": c_id})
        await self.refused_with(ErrorCode.NOT_A_MEMBER, a, packets.KICK_MEMBER, {"user_id": d_id})
        await self.refused_with(ErrorCode.NOT_IN_PARTY, d, packets.LEAVE_PARTY, {})

        _, after_kick = await a.request(packets.KICK_MEMBER, {"user_id": c_id})
        self.assertEqual(after_kick["members"], [{"user_id": a_id}, {"user_id": b_id}])
        kicked = await c.next_push("party_changed")
        self.assertEqual((kicked["reason"], kicked["code"], kicked["members"]), ("kicked", "", []))
        told = [await b.next_push("party_changed") for _ in range(2)]
        self.assertEqual([(p["reason"], p["user_id"]) for p in told], [("joined", c_id), ("kicked", c_id)])
        _, mine = await c.request(packets.MY_PARTY, {})
        self.assertEqual(mine["code"], "")

        await a.request(packets.LEAVE_PARTY, {})
        left = await b.next_push("party_changed")
        self.assertEqual((left["reason"], left["user_id"], left["leader"]), ("left", a_id, b_id))
        # Every reason sent is one the wire reference lists (parties.CHANGE_REASONS), and each was sent but
        # away and back (a dropped connection and a resume: tests.test_resume).
        self.assertEqual({p["reason"] for p in [pushed, kicked, *told, left]}, set(CHANGE_REASONS) - {"away", "back"})
        _, mine = await b.request(packets.MY_PARTY, {})
        self.assertEqual((mine["code"], mine["leader"], mine["members"]), (code, b_id, [{"user_id": b_id}]))

        b.transport.loseConnection()
        await b.closed

        async def party_gone():
            keys = (party_key(code), membership_key(b_id))
            return not sum(await gather([self.router.execute("EXISTS", key) for key in keys]))

        await eventually(party_gone)

    async def test_members_on_two_processes_are_told(self):
        """A member on one game server process is told when a player on another joins or leaves."""
        first, second = await gather([self.game_process(), self.game_process()])
        a, a_id, _ = await self.player(first)
        b, b_id, b_name = await self.player(second)
        _, created = await a.request(packets.CREATE_PARTY, {})
        await b.request(packets.JOIN_PARTY, {"code": created["code"]})
        joined = await a.next_push("party_changed")
        self.assertEqual((joined["reason"], joined["user_id"]), ("joined", b_id))
        self.assertTrue(joined["names"].endswith(b_name))
        await b.request(packets.LEAVE_PARTY, {})
        left = await a.next_push("party_changed")
        self.assertEqual((left["reason"], left["user_id"], left["members"]), ("left", b_id, [{"user_id": a_id}]))

    async def test_stale_membership_is_taken_over(self):
        """A membership naming a party that does not list the user (its process died midway) does not block."""
        server = await self.game_server()
        a, a_id, _ = await self.player(server)
        await self.router.execute("SET", membership_key(a_id), "GONE00")
        self.addCleanup(lambda: self.router.execute("DEL", membership_key(a_id)))
        _, created = await a.request(packets.CREATE_PARTY, {})
        self.assertEqual(await self.router.execute("GET", membership_key(a_id)), created["code"].encode())


class FailingTellTests(TestCase):
    """
    A party change whose script ran, then a tell that Redis did not take:
    the change stands and is returned, so the game server goes on to
    withdraw the party's ticket (a failure here used to skip that).
    """

    timeout = 60

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)

    async def test_join_leave_and_kick_return_their_party(self):
        """Every tell fails; join, kick and leave still answer the party as changed, and one line is logged each."""

        class UnreachablePresence:
            def tell(self, user_ids, event, body):
                return defer.fail(ClusterUnavailable("the notice channel's master is down"))

        parties = Parties(self.router, UnreachablePresence(), random.Random(20), 4)
        leader, member, other = (random.randrange(10**15, 10**16) for _ in range(3))
        for user_id in (leader, member, other):
            self.addCleanup(lambda u=user_id: self.router.execute("DEL", membership_key(u), claim_key(u)))
        lines = log_lines(self)
        party = await parties.create(leader, "lead")
        self.addCleanup(lambda: self.router.execute("DEL", party_key(party.code)))
        joined = await parties.join(member, "m", party.code)
        self.assertEqual([u for u, _ in joined.members], [leader, member])
        await parties.join(other, "o", party.code)
        after_kick = await parties.kick(leader, other)
        self.assertEqual([u for u, _ in after_kick.members], [leader, member])
        after_leave = await parties.leave(member)
        self.assertEqual([u for u, _ in after_leave.members], [leader])
        self.assertIsNone(await parties.party_of(member))
        self.assertEqual(sum("could not tell" in line for line in lines), 5)  # 2 joins, a kick (twice), a leave
