"""
The rules of a party that changes or moves, against the real Redis Cluster
and game servers over TCP:

- a join, a leave or a kick withdraws the party's waiting ticket, and every
  member hears it (the leader, the joiner, the one leaving or kicked
  included), after which the leader's cancel_queue answers not_queued;
- 100 joins racing a queued ticket withdraw it exactly once, tell each
  member once, and leave no ticket that is not the party;
- a queue request raced by a join is refused rather than leaving a ticket
  without the joiner, and a change's withdrawal never takes out a ticket
  queued after the change;
- a raid handoff to another game server is not a leave: the party keeps
  the moving player, in either order of the old connection closing and the
  new one arriving; a handoff ticket never used ends in the normal leave.
"""

import json
import random

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import profile_key, session_key
from dreamraid.services.matchmaking import GROUPS, matchmaking_keys
from dreamraid.services.parties import Parties
from dreamraid.services.players import Players
from dreamraid.services.rediscluster import ClusterUnavailable
from dreamraid.services.presence import Left, Presence, handoff_key, presence_key
from tests import cluster
from tests.support import eventually, require_stack, when_logged
from tests.test_players import RecordingQueue
from tests.test_game import GameServerCase
from tests.test_matchmaking import MatchmakerCase
from tests.test_players import FakeConnection

CANCELLED = {"state": "cancelled", "group": 0}
QUEUED = {"state": "queued", "group": 1}
# Seconds a push that should come is awaited: a missing one fails the test.
PUSH_WAIT = 10


def pushed(client, name):
    """The next push C{name} to C{client}, failing the test if none comes within PUSH_WAIT seconds."""
    return client.next_push(name).addTimeout(PUSH_WAIT, reactor)


def unread(client, name):
    """The bodies of the pushes C{name} that C{client} received and nobody read yet, in order."""
    return [body for pushed_name, body in client.pushes if pushed_name == name]


class PartyCase(GameServerCase):
    """Game servers with a matchmaking prefix of the test's own."""

    async def setUp(self):
        await super().setUp()
        self.prefix = f"testmm{random.getrandbits(40):x}"
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(self.prefix)]))

    def options(self, raid_size, *extra):
        return ["--raids-raid-size", str(raid_size), "--raids-matchmaking-prefix", self.prefix, *extra]

    async def player(self, server):
        """A new user authenticated on C{server}: C{(client, user_id)}."""
        user_id = await self.new_user()
        client, _ = await self.authenticated(server, await self.entered_token(user_id))
        return client, user_id

    async def refused_with(self, code, client, message, body=None):
        with self.assertRaises(RemoteError) as raised:
            await client.request(message, body or {})
        self.assertEqual(raised.exception.code, code)

    async def tickets(self):
        """C{{ticket id: sorted member ids}} of the tickets waiting under the test's prefix."""
        flat = await self.router.execute("HGETALL", f"{{{self.prefix}}}:tickets")
        return {flat[i].decode(): sorted(int(m) for m in flat[i + 1].split()[5:]) for i in range(0, len(flat), 2)}


class WithdrawnTicketTests(PartyCase):

    async def test_a_join_tells_every_member_and_cancel_queue_agrees(self):
        """
        The leader queues a party of two; a third player joins: the leader,
        the member and the joiner each get matchmaking cancelled, the
        leader's cancel_queue answers not_queued, and queueing again holds
        all three.
        """
        server = await self.game_server(*self.options(4))
        (leader, leader_id), (member, member_id), (joiner, joiner_id) = [
            await self.player(server) for _ in range(3)]
        _, party = await leader.request(packets.CREATE_PARTY, {})
        await member.request(packets.JOIN_PARTY, {"code": party["code"]})
        _, queued = await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(await pushed(member, "matchmaking"), QUEUED)
        await joiner.request(packets.JOIN_PARTY, {"code": party["code"]})
        for client in (leader, member, joiner):
            self.assertEqual(await pushed(client, "matchmaking"), CANCELLED)
        self.assertEqual(await self.tickets(), {})
        await self.refused_with(ErrorCode.NOT_QUEUED, leader, packets.CANCEL_QUEUE)
        await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(list((await self.tickets()).values()), [sorted([leader_id, member_id, joiner_id])])
        for client in (member, joiner):
            self.assertEqual(await pushed(client, "matchmaking"), QUEUED)

    async def test_a_kick_and_a_leave_tell_every_member(self):
        """
        A kick withdraws the waiting ticket and the leader, the member and
        the one kicked hear it; so does a leave, the one leaving included.
        """
        server = await self.game_server(*self.options(4))
        (leader, _), (member, member_id), (kicked, kicked_id) = [await self.player(server) for _ in range(3)]
        _, party = await leader.request(packets.CREATE_PARTY, {})
        for client in (member, kicked):
            await client.request(packets.JOIN_PARTY, {"code": party["code"]})
        await leader.request(packets.QUEUE_RAID, {})
        await leader.request(packets.KICK_MEMBER, {"user_id": kicked_id})
        for client in (member, kicked):
            self.assertEqual(await pushed(client, "matchmaking"), QUEUED)
        for client in (leader, member, kicked):
            self.assertEqual(await pushed(client, "matchmaking"), CANCELLED)
        await self.refused_with(ErrorCode.NOT_QUEUED, leader, packets.CANCEL_QUEUE)

        await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(await pushed(member, "matchmaking"), QUEUED)
        await member.request(packets.LEAVE_PARTY, {})
        for client in (leader, member):
            self.assertEqual(await pushed(client, "matchmaking"), CANCELLED)
        self.assertEqual(await self.tickets(), {})
        await self.refused_with(ErrorCode.NOT_QUEUED, leader, packets.CANCEL_QUEUE)
        await self.refused_with(ErrorCode.NOT_QUEUED, member, packets.CANCEL_QUEUE)

    async def test_a_hundred_joins_racing_a_queued_ticket(self):
        """
        A party of two (raids of 8) waits; 100 players send join_party at
        once: 6 get in, the ticket is withdrawn exactly once, each member
        hears cancelled once, no ticket is left, and the leader's
        cancel_queue answers not_queued.  Queued again and then changed by
        a kick, every member hears cancelled once more.  Each connection's
        pushes come in the order they were published, so a last change (a
        leave, which withdraws nothing) marks when every earlier push has
        arrived.
        """
        server = await self.game_server(*self.options(8, "--game-connections-per-address", "250"))
        (leader, leader_id), (member, member_id) = [await self.player(server) for _ in range(2)]
        joiners = []
        for _ in range(10):
            joiners += await gather([self.player(server) for _ in range(10)])
        _, party = await leader.request(packets.CREATE_PARTY, {})
        await member.request(packets.JOIN_PARTY, {"code": party["code"]})
        await leader.request(packets.QUEUE_RAID, {})
        self.assertEqual(await pushed(member, "matchmaking"), QUEUED)

        outcomes = await defer.DeferredList(
            [client.request(packets.JOIN_PARTY, {"code": party["code"]}) for client, _ in joiners],
            consumeErrors=True)
        joined = [(client, user_id) for (client, user_id), (ok, _) in zip(joiners, outcomes) if ok]
        refused = [(client, outcome.value.code) for (client, _), (ok, outcome) in zip(joiners, outcomes) if not ok]
        self.assertEqual(len(joined), 6)
        self.assertEqual({code for _, code in refused}, {ErrorCode.PARTY_FULL})
        self.assertEqual(await self.tickets(), {})
        await self.refused_with(ErrorCode.NOT_QUEUED, leader, packets.CANCEL_QUEUE)

        (leaving, leaving_id), (kicked, kicked_id), (last, last_id) = joined[:3]
        await leaving.request(packets.LEAVE_PARTY, {})  # so that the party queued next does not fill a raid
        await leader.request(packets.QUEUE_RAID, {})
        staying = [leader_id, member_id] + [user_id for _, user_id in joined[1:]]
        self.assertEqual(list((await self.tickets()).values()), [sorted(staying)])
        await leader.request(packets.KICK_MEMBER, {"user_id": kicked_id})
        self.assertEqual(await self.tickets(), {})
        await last.request(packets.LEAVE_PARTY, {})  # told after everything before: the mark
        marked = [leader, member] + [client for client, _ in joined[3:]]
        for client in marked:
            while (await pushed(client, "party_changed"))["user_id"] != last_id:
                pass
        self.assertEqual(unread(leader, "matchmaking"), [CANCELLED, CANCELLED])
        self.assertEqual(unread(member, "matchmaking"), [CANCELLED, QUEUED, CANCELLED])
        for client in marked[2:]:
            self.assertIn(unread(client, "matchmaking"), ([QUEUED, CANCELLED], [CANCELLED, QUEUED, CANCELLED]))
        await eventually(lambda: defer.succeed(
            unread(kicked, "matchmaking") in ([QUEUED, CANCELLED], [CANCELLED, QUEUED, CANCELLED])))
        self.assertIn(unread(leaving, "matchmaking"), ([], [CANCELLED]))
        for client, _ in refused:
            self.assertEqual(unread(client, "matchmaking"), [])


class QueueRacedByAJoinTests(MatchmakerCase):
    """The matchmaker's side of a party change racing its queue request, the race forced step by step."""

    async def setUp(self):
        await super().setUp()
        self.told = []
        listening = Presence(self.router, f"test-listening-{random.getrandbits(40):x}", 30, 900)
        subscription = listening.listen(lambda user_id, jti: None,
                                        lambda users, event, body, holder=None: self.told.append((users, event, body)))
        self.addCleanup(subscription.stop)
        await subscription.when_subscribed()
        self.listening = listening.server_id

    async def party_of(self, parties, size):
        """
        A party of C{size} new users and one more user outside it, all
        present on the listening server: C{(party, the users)}, the leader
        first and the one outside last.
        """
        users = [await self.new_user() for _ in range(size + 1)]
        for user_id in users:
            await self.router.execute("SET", presence_key(user_id), self.listening)
            self.addCleanup(lambda user_id=user_id: self.router.execute("DEL", presence_key(user_id)))
        party = await parties.create(users[0], "leader")
        self.addCleanup(lambda: gather([parties.leave_if_any(u) for u in users]))
        for user_id in users[1:size]:
            party = await parties.join(user_id, "member", party.code)
        return party, users

    def matchmaking_told(self, user_id):
        """The states of the matchmaking pushes the listening server was told for C{user_id}, in order."""
        return [body["state"] for users, event, body in self.told if event == "matchmaking" and user_id in users]

    async def everything_told(self):
        """
        Wait until every notice published so far has reached the listening
        server: one channel's messages arrive in the order published, so a
        marker published now comes last.
        """
        marker = {"users": [], "event": "marker", "body": {"n": random.getrandbits(32)}}
        await self.router.publish(f"notice:{{{self.listening}}}", json.dumps(marker))
        await eventually(lambda: defer.succeed(([], "marker", marker["body"]) in self.told))

    async def test_a_join_between_reading_the_party_and_queueing_it(self):
        """
        A player joins after the leader's queue request read the party and
        before its ticket is checked: the request is refused with
        party_changed_while_queueing, no ticket waits, and the member told
        queued is then told cancelled.  The join's own withdrawal finds
        nothing left.
        """
        parties = JoinWhileQueueing(self.router, self.presence, random.Random(3), 4)
        matchmaker = self.matchmaker(raid_size=4, parties=parties)
        party, (leader, member, joiner) = await self.party_of(parties, 2)
        parties.join_next = (joiner, party.code)
        await self.refused(ErrorCode.PARTY_CHANGED_WHILE_QUEUEING, matchmaker.enqueue(leader))
        self.assertEqual(await matchmaker.queue_lengths(), dict.fromkeys(range(1, GROUPS + 1), 0))
        self.assertFalse(await matchmaker.withdraw([leader, member, joiner], await parties.party_of(leader)))
        await self.everything_told()
        self.assertEqual(self.matchmaking_told(member), ["queued", "cancelled"])
        self.assertEqual(await matchmaker.enqueue(leader), 1)

    async def test_an_enqueue_failing_after_its_ticket_leaves_none(self):
        """
        Redis fails the second read of the party, after the ticket was
        written: the request fails (UNAVAILABLE to the client), no ticket
        waits, and the member told queued is told cancelled.
        """
        parties = FailingSecondRead(self.router, self.presence, random.Random(5), 4)
        matchmaker = self.matchmaker(raid_size=4, parties=parties)
        party, (leader, member, _) = await self.party_of(parties, 2)
        parties.reads = 0
        with self.assertRaises(ClusterUnavailable):
            await matchmaker.enqueue(leader)
        self.assertEqual(await matchmaker.queue_lengths(), dict.fromkeys(range(1, GROUPS + 1), 0))
        await self.everything_told()
        self.assertEqual(self.matchmaking_told(member), ["queued", "cancelled"])

    async def test_a_change_never_withdraws_a_ticket_queued_after_it(self):
        """
        A join, then the leader queues the party as it is now, then the
        join's withdrawal runs late: the ticket stays.  A later change's
        withdrawal takes it out and tells every member, once.
        """
        parties = Parties(self.router, self.presence, random.Random(4), 4)
        matchmaker = self.matchmaker(raid_size=4, parties=parties)
        party, (leader, member, joiner) = await self.party_of(parties, 2)
        after_join = await parties.join(joiner, "joiner", party.code)
        await matchmaker.enqueue(leader)
        self.assertFalse(await matchmaker.withdraw([leader, member, joiner], after_join))
        self.assertEqual(await matchmaker.queue_lengths(), {1: 1, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0})
        after_leave = await parties.leave(member)
        self.assertTrue(await matchmaker.withdraw([member], after_leave))
        self.assertFalse(await matchmaker.withdraw([member], after_leave))
        self.assertEqual(await matchmaker.queue_lengths(), dict.fromkeys(range(1, GROUPS + 1), 0))
        await self.everything_told()
        self.assertEqual([self.matchmaking_told(u) for u in (leader, member, joiner)],
                         [["cancelled"], ["queued", "cancelled"], ["queued", "cancelled"]])


class JoinWhileQueueing(Parties):
    """Parties where, once C{join_next} is set, the next party read lets that player join before it answers."""

    join_next = None

    async def party_of(self, user_id):
        party = await super().party_of(user_id)
        if self.join_next is not None:
            (joiner, code), self.join_next = self.join_next, None
            await self.join(joiner, "joiner", code)
        return party


class FailingSecondRead(Parties):
    """Parties whose party read fails, as a failover would, the second time after C{reads} is set to 0."""

    reads = None

    async def party_of(self, user_id):
        if self.reads is not None:
            self.reads += 1
            if self.reads == 2:
                raise ClusterUnavailable("the party's master is down")
        return await super().party_of(user_id)


class HandoffTests(PartyCase):
    """A party of two on two game servers (in this process, so their logs can be awaited) forms a raid."""

    async def raid_across_two_servers(self):
        """
        The leader on one server, the member on another, matched into a raid
        of two: C{(staying client, its user id, moving client, its user id,
        the mover's raid_found, the host)}; the mover is the one not on the host.
        """
        servers = [await self.game_server(*self.options(2)) for _ in range(2)]
        (leader, leader_id), (member, member_id) = [await self.player(server) for server in servers]
        _, party = await leader.request(packets.CREATE_PARTY, {})
        await member.request(packets.JOIN_PARTY, {"code": party["code"]})
        await leader.request(packets.QUEUE_RAID, {})
        found = [await pushed(client, "raid_found") for client in (leader, member)]
        [host] = [s for s in servers if found[0]["host"] == f"127.0.0.1:{s.port}"]
        stays, moves = (0, 1) if host is servers[0] else (1, 0)
        players = [(leader, leader_id), (member, member_id)]
        del leader.pushes[:], member.pushes[:]  # what came before the raid
        return (*players[stays], *players[moves], found[moves], host)

    async def moved(self, host, user_id, found):
        """A new connection to the host, authenticated with the handoff ticket."""
        client = await host.client(self)
        await client.request(packets.AUTHENTICATE_HANDOFF, {"user_id": user_id, "ticket": found["ticket"]})
        return client

    async def assert_party_kept(self, stayer, stayer_id, mover, mover_id):
        """Both still list both, and the one who stayed was told of no change."""
        for client in (stayer, mover):
            _, party = await client.request(packets.MY_PARTY, {})
            self.assertEqual(sorted(m["user_id"] for m in party["members"]), sorted([stayer_id, mover_id]))
        self.assertEqual(unread(stayer, "party_changed"), [])
        self.assertEqual(unread(stayer, "matchmaking"), [])

    async def test_the_new_connection_arrives_first(self):
        """
        The mover authenticates on the host, which closes its old
        connection: that close leaves nothing (logged), so the party still
        lists both and nobody heard "left".
        """
        stayer, stayer_id, old, mover_id, found, host = await self.raid_across_two_servers()
        decided = when_logged(self, f"user {mover_id}: a replaced connection closed")
        mover = await self.moved(host, mover_id, found)
        await old.closed
        self.assertEqual(old.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)
        await decided.addTimeout(PUSH_WAIT, reactor)
        await self.assert_party_kept(stayer, stayer_id, mover, mover_id)

    async def test_the_old_connection_closes_first(self):
        """
        The mover's old connection closes before it reaches the host: its
        session waits for the handoff ticket (logged), the handoff then
        succeeds, the party still lists both and nobody heard "left".
        """
        stayer, stayer_id, old, mover_id, found, host = await self.raid_across_two_servers()
        waiting = when_logged(self, f"user {mover_id}: a connection closed while a raid handoff ticket waits")
        old.transport.loseConnection()
        await old.closed
        await waiting.addTimeout(PUSH_WAIT, reactor)
        mover = await self.moved(host, mover_id, found)
        await self.assert_party_kept(stayer, stayer_id, mover, mover_id)


class HandoffWaitTests(TestCase):
    """
    A connection closed while its player's handoff ticket waits, through
    the real presence scripts, with Players on a driven clock.
    """

    timeout = 60

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)
        self.clock = task.Clock()
        self.presence = Presence(self.router, f"test-handoff-{random.getrandbits(40):x}", 30, 900)
        self.queue = RecordingQueue()
        self.players = Players(None, self.presence, self.queue, self.clock, 30)
        self.players.startService()
        self.addCleanup(lambda: self.players.running and self.players.stopService())
        self.user_id = random.randrange(10**15, 10**16)
        keys = [session_key(self.user_id), presence_key(self.user_id), profile_key(self.user_id),
                handoff_key(self.user_id)]
        self.addCleanup(lambda: self.router.execute("DEL", *keys))
        await self.router.execute("SET", session_key(self.user_id), "at login")
        await self.router.execute("HSET", profile_key(self.user_id), "name", "n", "level", 1, "exp", 0)
        await self.presence.offer_handoff(self.user_id, "first", 30)
        self.connection = FakeConnection()
        await self.players.authenticate_handoff(self.connection, self.user_id, "first")
        # A raid formed elsewhere: the player is offered a ticket to move there.
        await self.presence.offer_handoff(self.user_id, "to the host", 30)

    async def closed(self):
        """Close the connection; the Deferred of its leave, once the session waits for the ticket."""
        waiting = when_logged(self, f"user {self.user_id}: a connection closed while a raid handoff ticket waits")
        leave = defer.ensureDeferred(self.players.leave(self.connection))
        await waiting.addTimeout(PUSH_WAIT, reactor)
        self.assertNoResult(leave)
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"first")
        return leave

    async def test_a_ticket_never_used_ends_in_a_leave(self):
        """Once the ticket expired unused, the session ends and the user is synced: the player left the game."""
        leave = await self.closed()
        await self.router.execute("DEL", handoff_key(self.user_id))  # as its expiry would
        self.clock.advance(30)
        self.assertIs(await leave, Left.ENDED)
        self.assertIsNone(await self.router.execute("GET", session_key(self.user_id)))
        self.assertEqual(self.queue.jobs, [(self.user_id, "logout")])

    async def test_a_ticket_used_meanwhile_is_no_leave(self):
        """The player reached the host with the ticket: the old connection's leave ends nothing."""
        leave = await self.closed()
        await self.presence.enter_handoff(self.user_id, "to the host")
        self.clock.advance(30)
        self.assertIs(await leave, Left.REPLACED)
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"to the host")
        self.assertEqual(self.queue.jobs, [])

    async def test_stopping_ends_the_wait(self):
        """A server stopping does not wait for the ticket: the leave ends nothing, the session expires by itself."""
        leave = await self.closed()
        await self.players.stopService()
        self.assertIsNone(await leave)
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"first")

    async def test_a_logout_does_not_wait(self):
        """A logout is a leave at once, ticket or not."""
        self.assertIs(await self.players.leave(self.connection, wait_for_handoff=False), Left.ENDED)
        self.assertIsNone(await self.router.execute("GET", session_key(self.user_id)))
