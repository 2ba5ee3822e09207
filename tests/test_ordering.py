"""
Requests that change who a connection is or where its player belongs, sent
against a running game server all at once: pipelined in one write on one
connection (two authenticates; two joins of different parties, also right
after the script cache was flushed; a 100-frame mix whose answers must be
those of its requests served one at a time), raced over 100 connections
into one party, and 100 joins of one player raced at the party service
itself (the membership claim).
"""

import random

from twisted.internet import defer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import session_key
from dreamraid.services.parties import Parties, claim_key, membership_key, party_key
from dreamraid.services.presence import Presence, presence_key
from tests import cluster
from tests.support import eventually
from tests.test_security import SecurityCase

E = ErrorCode


def answer(frame):
    """A frame as what a test compares: the reply's name, or the error's code."""
    return frame.body["code"] if frame.message is packets.ERROR else frame.message.name


class PipelinedTests(SecurityCase):
    """Ordered requests in one write, and racing connections, against one game server in this process."""

    timeout = 120

    async def authenticated_raw(self, server, token):
        raw = await self.raw(server)
        reply = await raw.send(packets.AUTHENTICATE.encode(1, {"token": token}), 1)
        self.assertIs(reply.message, packets.AUTHENTICATED)
        return raw

    async def members(self, code):
        """The user ids party C{code} lists."""
        ids = await self.router.execute("HGET", party_key(code), "ids")
        return [int(i) for i in ids.split()] if ids else []

    async def membership(self, user_id):
        code = await self.router.execute("GET", membership_key(user_id))
        return code and code.decode()

    async def test_two_authenticates_in_one_write(self):
        """
        Two authenticates of two users in one write: the first makes the
        connection that user, the second is refused ALREADY_AUTHENTICATED
        and takes nobody over; the second user's session is untouched, and
        closing the connection ends only the first's.
        """
        server = await self.game_server()
        for _ in range(5):
            first_id, second_id = await self.new_user(), await self.new_user()
            first_token, second_token = await self.entered_token(first_id), await self.entered_token(second_id)
            second_session = await self.router.execute("GET", session_key(second_id))
            raw = await self.raw(server)
            first, second = raw.pipeline([(packets.AUTHENTICATE, 1, {"token": first_token}),
                                          (packets.AUTHENTICATE, 2, {"token": second_token})])
            first, second = await first, await second
            self.assertEqual((first.message, first.body["user_id"]), (packets.AUTHENTICATED, first_id))
            self.assertEqual(answer(second), E.ALREADY_AUTHENTICATED)
            self.assertIsNone(await self.router.execute("GET", presence_key(second_id)))
            await raw.close()

            async def first_left():
                return await self.router.execute("GET", session_key(first_id)) is None

            await eventually(first_left, timeout=10)
            self.assertEqual(await self.router.execute("GET", session_key(second_id)), second_session)
            again = await self.player(server, second_token)
            self.assertEqual(again.user_id, second_id)

    async def test_two_joins_in_one_write(self):
        """
        Two join_party with different codes in one write, five times right
        after the script cache was flushed and five times not: the player
        joins exactly one party (the first), the second is refused
        ALREADY_IN_PARTY, and the membership names the party that lists
        them.  After logout no party lists them.
        """
        server = await self.game_server()
        leaders = [await self.player(server) for _ in range(2)]
        codes = [(await leader.create_party()).code for leader in leaders]
        joiner_id = await self.new_user()
        raw = await self.authenticated_raw(server, await self.entered_token(joiner_id))
        for round_, flush in enumerate([True] * 5 + [False] * 5):
            if flush:
                await cluster.flush_scripts(self.router)
            first, second = codes if round_ % 2 == 0 else codes[::-1]
            base = 10 * (round_ + 1)
            joined, refused = raw.pipeline([(packets.JOIN_PARTY, base, {"code": first}),
                                            (packets.JOIN_PARTY, base + 1, {"code": second})])
            self.assertEqual((answer(await joined), answer(await refused)), ("party", E.ALREADY_IN_PARTY), round_)
            self.assertEqual([joiner_id in await self.members(code) for code in (first, second)], [True, False])
            self.assertEqual(await self.membership(joiner_id), first)
            left = await raw.send(packets.LEAVE_PARTY.encode(base + 2, {}), base + 2)
            self.assertEqual(answer(left), "party_left")
        joined, _ = raw.pipeline([(packets.JOIN_PARTY, 200, {"code": codes[0]}),
                                  (packets.JOIN_PARTY, 201, {"code": codes[1]})])
        await joined
        logged_out = await raw.send(packets.LOGOUT.encode(202, {}), 202)
        self.assertEqual(answer(logged_out), "logged_out")
        for code in codes:
            self.assertNotIn(joiner_id, await self.members(code))
        self.assertIsNone(await self.membership(joiner_id))

    async def test_a_hundred_frames_in_one_write(self):
        """
        An authenticate and 99 requests in one write, ordered ones (party,
        queue, logout-free) mixed with reads, pings and hunts: every request
        is answered once; the ordered ones in the order they were sent, each
        exactly as if the requests had come one at a time; the reads behind
        the authenticate are served, not refused; and the player ends in the
        party the last of them left them in, with a membership that agrees.
        """
        server = await self.game_server()
        leader = await self.player(server)
        leader_code = (await leader.create_party()).code
        user_id = await self.new_user()
        token = await self.entered_token(user_id)

        rng = random.Random(19)
        party, queued = None, False  # the model: None, "own" or "leader's"; whether a ticket waits
        cancelled = 0  # the matchmaking "cancelled" pushes the player is owed
        requests, expected = [(packets.AUTHENTICATE, 1, {"token": token})], {1: "authenticated"}
        ordered_ids = [1]
        reads = [(packets.PING, {"nonce": 5}), (packets.MY_PARTY, {}), (packets.LIST_INVENTORY, {}),
                 (packets.HUNT, {"monster": 1}), (packets.MY_RANK, {})]
        while len(requests) < 100:
            request_id = len(requests) + 1
            if rng.random() < 0.4:
                message, body = rng.choice(reads)
                requests.append((message, request_id, body))
                continue
            choices = ["leave", "kick", "cancel", "queue"] + ([] if queued else ["create", "join"])
            kind = rng.choice(choices)
            if kind == "create":
                message, body, outcome = packets.CREATE_PARTY, {}, E.ALREADY_IN_PARTY if party else "party"
                party = party or "own"
            elif kind == "join":
                message, body = packets.JOIN_PARTY, {"code": leader_code}
                outcome = E.ALREADY_IN_PARTY if party else "party"
                party = party or "leader's"
            elif kind == "leave":  # then takes the party's ticket out, and tells its members
                message, body, outcome = packets.LEAVE_PARTY, {}, "party_left" if party else E.NOT_IN_PARTY
                if party:
                    cancelled += queued
                    party, queued = None, False
            elif kind == "kick":
                message, body = packets.KICK_MEMBER, {"user_id": leader.user_id}
                outcome = {None: E.NOT_IN_PARTY, "own": E.NOT_A_MEMBER, "leader's": E.NOT_PARTY_LEADER}[party]
            elif kind == "queue":
                message, body = packets.QUEUE_RAID, {}
                outcome = (E.NOT_PARTY_LEADER if party == "leader's" else E.ALREADY_QUEUED if queued else "queued")
                queued = queued or party != "leader's"
            else:
                message, body, outcome = packets.CANCEL_QUEUE, {}, "queue_cancelled" if queued else E.NOT_QUEUED
                queued = False
            requests.append((message, request_id, body))
            expected[request_id] = outcome
            ordered_ids.append(request_id)

        raw = await self.raw(server)
        arrived = []
        answers = raw.pipeline(requests)
        for (_, request_id, _), d in zip(requests, answers):
            d.addCallback(lambda frame, i=request_id: arrived.append(i) or frame)
        frames = dict(zip([i for _, i, _ in requests], [answer(f) for f in await gather(answers)]))
        await eventually(lambda: defer.succeed(len(raw.unexpected) >= cancelled))
        self.assertEqual([(f.message, f.request_id, f.body) for f in raw.unexpected],
                         [(packets.MATCHMAKING, 0, {"state": "cancelled", "group": 0})] * cancelled)
        self.assertEqual({i: frames[i] for i in ordered_ids}, expected)
        self.assertEqual([i for i in arrived if i in expected], ordered_ids)
        read_answers = {frames[i] for _, i, _ in requests if i not in expected}
        self.assertLessEqual(read_answers, {"pong", "party", "inventory", "hunted", E.HUNT_COOLDOWN, "rank"})

        membership = await self.membership(user_id)
        listed = [code for code in [leader_code, membership] if code and user_id in await self.members(code)]
        if party is None:
            self.assertEqual((membership, listed), (None, []))
        else:
            self.assertEqual(listed, [membership])
            self.assertEqual(membership == leader_code, party == "leader's")
        logged_out = await raw.send(packets.LOGOUT.encode(500, {}), 500)
        self.assertEqual(answer(logged_out), "logged_out")
        self.assertIsNone(await self.membership(user_id))
        self.assertNotIn(user_id, await self.members(leader_code))

    async def test_a_hundred_connections_race_into_one_party(self):
        """100 players on 100 connections join one party of 4 at once: exactly 3 get in, the rest are told it is full."""
        server = await self.game_server("--raids-raid-size", "4", "--game-connections-per-address", "256")
        leader = await self.player(server)
        code = (await leader.create_party()).code
        user_ids = await gather([self.new_user() for _ in range(100)])
        tokens = await gather([self.entered_token(u) for u in user_ids])
        clients = await gather([server.client(self) for _ in user_ids])
        await gather([c.request(packets.AUTHENTICATE, {"token": t}) for c, t in zip(clients, tokens)])

        outcomes = await defer.DeferredList([c.request(packets.JOIN_PARTY, {"code": code}) for c in clients],
                                            consumeErrors=True)
        joined = [u for u, (ok, _) in zip(user_ids, outcomes) if ok]
        self.assertEqual(len(joined), 3)
        self.assertEqual({f.value.code for ok, f in outcomes if not ok}, {E.PARTY_FULL})
        self.assertEqual(sorted(await self.members(code)), sorted([leader.user_id, *joined]))
        memberships = await gather([self.membership(u) for u in user_ids])
        self.assertEqual(sorted(u for u, m in zip(user_ids, memberships) if m), sorted(joined))
        self.assertEqual({m for m in memberships if m}, {code})


class ClaimRaceTests(SecurityCase):
    """The party service itself: one player's joins racing, with no connection to put them in order."""

    timeout = 120

    async def test_a_hundred_joins_of_one_player_at_once(self):
        """
        100 joins of one player into 10 parties at once, five times, each
        right after the script cache was flushed: exactly one gets in; the
        others find that claim still under way and are refused
        ALREADY_IN_PARTY rather than taking it over as stale; exactly one
        party lists the player, the one their membership names.
        """
        presence = Presence(self.router, f"test-claims-{random.getrandbits(40):x}", 30, 900)
        parties = Parties(self.router, presence, random.Random(), 8)
        base = random.randrange(10**12, 10**13) * 100
        leaders, joiner = [base + i for i in range(10)], base + 99
        codes = [(await parties.create(leader, f"l{i}")).code for i, leader in enumerate(leaders)]
        self.addCleanup(lambda: self.router.execute("DEL", membership_key(joiner), claim_key(joiner)))
        for leader, code in zip(leaders, codes):
            self.addCleanup(lambda leader=leader, code=code: gather([
                self.router.execute("DEL", party_key(code)), self.router.execute("DEL", membership_key(leader))]))

        for round_ in range(5):
            await cluster.flush_scripts(self.router)
            outcomes = await defer.DeferredList(
                [defer.ensureDeferred(parties.join(joiner, "j", codes[i % 10])) for i in range(100)],
                consumeErrors=True)
            joined = {party.code for ok, party in outcomes if ok}
            refusals = {f.value.code if f.check(RequestRefused) else f.value for ok, f in outcomes if not ok}
            self.assertEqual((len([ok for ok, _ in outcomes if ok]), refusals), (1, {E.ALREADY_IN_PARTY}), round_)
            listing = [code for code in codes if str(joiner).encode() in
                       (await self.router.execute("HGET", party_key(code), "ids")).split()]
            self.assertEqual(listing, list(joined))
            self.assertEqual(await self.router.execute("GET", membership_key(joiner)), listing[0].encode())
            await parties.leave(joiner)
            self.assertIsNone(await self.router.execute("GET", membership_key(joiner)))
