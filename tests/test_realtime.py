"""
The raid UDP protocol over an in-memory socket: against a recording host,
and in front of a real raid host on a driven clock, where a member's
datagrams are held to its rate, bad positions are dropped, forgeries and
replays spend nobody's budget, and the boss's HP goes out at least once a
second.
"""

import errno
import inspect
import math
import random

from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from dreamraid.protocols import packets
from dreamraid.protocols.realtime import READ_PER_TURN, RealtimeProtocol
from dreamraid.services.matchmaking import Formed, Matchmaker
from dreamraid.services.presence import Presence
from dreamraid.services.raidhost import HP_REPEAT_AFTER, RELAY_INTERVAL, Channel, RaidHost, member_keys
from tests.support import log_lines, make_settings

KEYS = member_keys(bytes(range(16)), 2)
PLAYER = ("127.0.0.1", 40000)


class RecordingHost:
    """The part of L{RaidHost} the protocol calls, recording each call; raid 7 has 2 members, with KEYS."""

    def __init__(self):
        self.calls = []
        self.udp = self.udp_address = None

    def channel(self, number):
        return Channel(KEYS) if number == 7 else None

    def forged(self):
        self.calls.append(("forged",))

    def unsent(self, error):
        self.calls.append(("unsent", error.errno))

    def admit(self, number, member, sequence):
        self.calls.append(("admit", number, member, sequence))
        return True

    def datagram(self, number, member, event, body, address):
        self.calls.append(("datagram", number, member, event, body, address))


class FakeSocket:
    """A UDP socket whose sends go to a list, or fail with C{error}."""

    def __init__(self):
        self.sent, self.error = [], None

    def sendto(self, data, address):
        if self.error is not None:
            raise self.error
        self.sent.append((data, address))
        return len(data)


class FakePort:
    def __init__(self, socket=None):
        self.socket = socket or FakeSocket()

    def getHost(self):
        return type("Address", (), {"port": 50000})()


class RealtimeProtocolTests(TestCase):
    def setUp(self):
        self.host = RecordingHost()
        self.protocol = RealtimeProtocol(self.host, "127.0.0.1")
        self.protocol.makeConnection(FakePort())

    def test_recording_host_matches_the_raid_host(self):
        """The fake's methods are the real host's, with the same parameters."""
        for name in ("channel", "forged", "unsent", "admit", "datagram"):
            self.assertEqual(inspect.signature(getattr(RecordingHost, name)),
                             inspect.signature(getattr(RaidHost, name)), name)

    def test_reads_per_reactor_turn_are_capped(self):
        """
        The socket reads at most READ_PER_TURN bytes of datagrams at one
        turn of the reactor (Twisted's 256 KiB default let a flood hold
        every TCP player up for tens of milliseconds), and that is still at
        least a hundred positions.
        """
        self.assertEqual(self.protocol.transport.maxThroughput, READ_PER_TURN)
        self.assertLess(READ_PER_TURN, 64 * 1024)
        self.assertGreaterEqual(READ_PER_TURN // 36, 100)

    def test_verified_datagram_reaches_the_host(self):
        self.assertEqual(self.host.udp_address, "127.0.0.1:50000")
        data = packets.seal_datagram(KEYS[1], packets.POSITION, 7, 1, 3, {"x": 1.5, "y": -2.0, "state": 4})
        self.protocol.datagramReceived(data, PLAYER)
        self.assertEqual(self.host.calls, [("admit", 7, 1, 3),
                                           ("datagram", 7, 1, "position", {"x": 1.5, "y": -2.0, "state": 4}, PLAYER)])

    def test_forged_and_foreign_datagrams_are_counted_not_delivered(self):
        """
        A wrong key, another member's key, a member out of range (under
        either member's key) and a truncated datagram are each forged.
        """
        wrong_key = packets.seal_datagram(bytes(16), packets.UDP_HELLO, 7, 0, 1, {})
        as_another = [packets.seal_datagram(KEYS[1 - m], packets.POSITION, 7, m, 9, {"x": 0.0, "y": 0.0, "state": 0})
                      for m in (0, 1)]
        no_such_member = [packets.seal_datagram(key, packets.UDP_HELLO, 7, 2, 1, {}) for key in KEYS]
        for data in (wrong_key, *as_another, *no_such_member, b"\x01\x00"):
            self.protocol.datagramReceived(data, PLAYER)
        self.assertEqual(self.host.calls, [("forged",)] * 6)

    def test_each_member_has_its_own_key(self):
        """Member keys are 16 bytes, differ from each other and from the secret, and follow from the secret alone."""
        secret = bytes(range(16))
        keys = member_keys(secret, 4)
        self.assertEqual([len(key) for key in keys], [packets.MAC_SIZE] * 4)
        self.assertEqual(len({secret, *keys}), 5)
        self.assertEqual(member_keys(secret, 2), keys[:2])
        self.assertNotEqual(member_keys(bytes(16), 1), keys[:1])

    def test_send_is_signed_for_the_member(self):
        """What goes to a member verifies under that member's key, not another's."""
        self.protocol.send(PLAYER, "boss_hp", KEYS[1], 7, 1, 9, {"hp": 25, "hp_sequence": 4})
        [(data, address)] = self.protocol.transport.socket.sent
        with self.assertRaises(packets.CodecError):
            packets.open_datagram(KEYS[0], data)
        datagram = packets.open_datagram(KEYS[1], data)
        self.assertEqual((address, datagram.message, datagram.member, datagram.sequence, datagram.body),
                         (PLAYER, packets.BOSS_HP, 1, 9, {"hp": 25, "hp_sequence": 4}))

    def test_send_the_kernel_refuses_is_dropped_and_counted(self):
        """A full send buffer drops the datagram: the host is told, the caller sees no error."""
        self.protocol.transport.socket.error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.protocol.send(PLAYER, "boss_hp", KEYS[1], 7, 1, 9, {"hp": 25, "hp_sequence": 4})
        self.assertEqual(self.host.calls, [("unsent", errno.EAGAIN)])


class ClockedSocket(FakeSocket):
    """A L{FakeSocket} that notes the clock's time of each send: C{sent} holds C{(time, data, address)}."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def sendto(self, data, address):
        self.sent.append((self.clock.seconds(), data, address))
        return len(data)


class AnsweringRedis:
    """The router, as far as a raid's setup and end go: every player level 1 with no weapon, every write taken."""

    PROFILE = {"name": b"player", "level": b"1", "best": b"0"}

    def execute(self, command, *args, timeout=None, route=None):
        if command == "HMGET":
            return defer.succeed([self.PROFILE.get(field) for field in args[1:]])
        return defer.succeed(None if command == "HGET" else 1)


class TellingPresence:
    """Presence that offers every handoff and records what players are told."""

    server_id = "test-realtime"

    def __init__(self):
        self.told = []

    def offer_handoff(self, user_id, ticket, ttl):
        return defer.succeed(None)

    async def offer_place(self, user_id, ticket, ttl, expected=None):
        return (expected or f"elsewhere {user_id}"), True  # held on another process: a ticket is offered

    async def tell(self, user_ids, event, body):
        self.told.append((list(user_ids), event, body))

    async def tell_holder(self, user_id, holder, event, body):
        self.told.append(([user_id], event, body))


class IdleMatchmaker:
    """A matchmaker whose lease renewals and reaps find nothing to do."""

    async def renew(self, server_id, address, checkpoints):
        return []

    async def reap(self):
        return []

    async def release(self, raid_id):
        pass


class NobodyConnected:
    """The host's players when none is connected to its process."""

    def connection_of(self, user_id):
        return None

    def when_asked_to_place(self, place_again):
        pass


MEMBERS = [11, 12]


class HostedRaidTests(TestCase):
    """
    A real L{RaidHost} on a L{task.Clock} hosting one raid of two, behind
    the UDP protocol: datagrams go in through C{datagramReceived} and out
    to a socket that notes when.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.settings = make_settings().raids
        self.presence = TellingPresence()
        self.host = RaidHost(AnsweringRedis(), self.presence, NobodyConnected(), None, None, IdleMatchmaker(),
                             self.clock, random.Random(3), self.settings, "127.0.0.1:9090")
        self.socket = ClockedSocket(self.clock)
        self.protocol = RealtimeProtocol(self.host, "127.0.0.1")
        self.protocol.makeConnection(FakePort(self.socket))
        self.host.startService()
        self.addCleanup(self.host.stopService)
        self.host.host(Formed("r1", MEMBERS))
        found = {users[0]: body for users, event, body in self.presence.told if event == "raid_found"}
        self.found = [found[user_id] for user_id in MEMBERS]
        self.sequences = [0, 0]

    def test_fakes_match_the_real_collaborators(self):
        """The fakes' methods take what the real presence and matchmaker take."""
        for fake, real, names in ((TellingPresence, Presence, ("offer_handoff", "offer_place", "tell", "tell_holder")),
                                  (IdleMatchmaker, Matchmaker, ("renew", "reap", "release"))):
            for name in names:
                self.assertEqual(inspect.signature(getattr(fake, name)), inspect.signature(getattr(real, name)), name)

    def address(self, member):
        return ("127.0.0.1", 40000 + member)

    def datagram(self, member, message, body, key_of=None, sequence=None):
        """Member C{member}'s next datagram (or one with C{sequence}), signed with member C{key_of}'s key."""
        if sequence is None:
            self.sequences[member] += 1
            sequence = self.sequences[member]
        key = bytes.fromhex(self.found[member if key_of is None else key_of]["key"])
        return packets.seal_datagram(key, message, self.found[member]["raid_number"], member, sequence, body)

    def receive(self, member, data):
        self.protocol.datagramReceived(data, self.address(member))

    def hello(self, member):
        self.receive(member, self.datagram(member, packets.UDP_HELLO, {}))

    def move(self, member, x, y=0.0):
        data = self.datagram(member, packets.POSITION, {"x": x, "y": y, "state": 1})
        self.receive(member, data)
        return data

    def heard(self, member, message):
        """C{(time, body)} of each datagram of C{message} sent to C{member}, in order."""
        key = bytes.fromhex(self.found[member]["key"])
        return [(when, packets.open_datagram(key, data).body) for when, data, address in self.socket.sent
                if address == self.address(member) and packets.datagram_header(data)[0] == message.id]

    def relayed(self, member):
        """The last positions relayed to C{member}: C{{member: (x, y)}}."""
        _, body = self.heard(member, packets.POSITIONS)[-1]
        return {p["member"]: (p["x"], p["y"]) for p in body["players"]}

    def test_a_flood_of_valid_datagrams_is_held_to_the_member_rate(self):
        """
        1,000 valid positions from one member in one tick: only the rest
        of its burst (its hello took a token) is let through and the others
        are relayed the last of those, not the flood's last; the rest are
        dropped and counted as rate_limited, and one log line names the
        user.  A second later another 1,000 let through only a second's
        rate: burst + rate in all.
        """
        lines = log_lines(self)
        rate = self.settings.datagram_rate
        self.hello(0)
        self.hello(1)
        for x in range(1000):
            self.move(0, float(x))
        let_through = int(rate.burst) - 1
        self.assertEqual(self.host.counters["received"], 2 + let_through)
        self.assertEqual(self.host.counters["rate_limited"], 1000 - let_through)
        self.clock.advance(RELAY_INTERVAL)
        self.assertEqual(self.relayed(1), {0: (let_through - 1.0, 0.0)})
        self.clock.advance(1.0 - RELAY_INTERVAL)
        for x in range(1000, 2000):
            self.move(0, float(x))
        from_member_0 = self.host.counters["received"] - 1
        self.assertLessEqual(from_member_0, rate.burst + rate.per_second)
        self.assertGreaterEqual(from_member_0, rate.burst + rate.per_second - 1)
        self.assertEqual(self.host.counters["rate_limited"], 2001 - from_member_0)
        self.assertEqual([line for line in lines if "datagram_rate" in line],
                         [f"raid r1: user {MEMBERS[0]} (member 0) sends datagrams past [raids] datagram_rate; the "
                          "excess is dropped and counted as rate_limited (logged once a raid)"])

    def test_an_honest_rate_passes(self):
        """
        Ten positions a second for ten seconds, evenly from one member and
        in bunches of two every 0.2 s from the other, are all let through.
        """
        self.hello(0)
        self.hello(1)
        for tick in range(100):
            self.move(0, float(tick))
            if tick % 2 == 0:
                self.move(1, float(tick))
                self.move(1, float(tick) + 0.5)
            self.clock.advance(0.1)
        self.assertEqual((self.host.counters["received"], self.host.counters["rate_limited"]), (202, 0))
        self.assertEqual(self.relayed(1), {0: (99.0, 0.0)})
        self.assertEqual(self.relayed(0), {1: (98.5, 0.0)})

    def test_forgeries_and_replays_spend_no_member_budget(self):
        """
        1,000 datagrams naming member 0 under a wrong key, 1,000 under
        member 1's key and 1,000 replays of member 0's own position are
        dropped (forged, replayed) before its rate is counted: member 0's
        next 18 positions, the rest of its burst, all get through.
        """
        self.hello(0)
        seen = self.move(0, 1.0)
        wrong_key = bytes(16)
        for sequence in range(100, 1100):
            self.receive(0, packets.seal_datagram(wrong_key, packets.POSITION, self.found[0]["raid_number"], 0,
                                                  sequence, {"x": 9.0, "y": 9.0, "state": 0}))
            self.receive(0, self.datagram(0, packets.POSITION, {"x": 9.0, "y": 9.0, "state": 0}, key_of=1,
                                          sequence=sequence))
            self.receive(0, seen)
        for x in range(18):
            self.move(0, 2.0 + x)
        counters = self.host.counters
        self.assertEqual((counters["forged"], counters["replayed"], counters["rate_limited"], counters["received"]),
                         (2000, 1000, 0, 20))

    def test_a_server_message_under_the_member_key_moves_nothing(self):
        """
        A boss_hp (a message only the host sends) sealed with member 0's
        own key and the highest sequence is forged: it neither raises the
        member's sequence nor spends its rate, so its next datagram gets
        through.
        """
        self.hello(0)
        self.receive(0, self.datagram(0, packets.BOSS_HP, {"hp": 0, "hp_sequence": 2**32 - 1}, sequence=2**32 - 1))
        self.move(0, 5.0)
        counters = self.host.counters
        self.assertEqual((counters["forged"], counters["replayed"], counters["received"]), (1, 0, 2))

    def test_positions_that_are_not_finite_or_out_of_bounds_are_dropped(self):
        """
        A position with a NaN or infinite coordinate, or one beyond
        world_bound on either axis (up to float32's largest), is dropped
        and counted as bad_position, and never relayed; one on the bound
        itself is relayed.
        """
        bound = self.settings.world_bound
        self.hello(0)
        self.hello(1)
        self.move(0, 1.0, 2.0)
        bad = [(math.nan, 0.0), (0.0, math.nan), (math.inf, 0.0), (0.0, -math.inf), (bound * 1.5, 0.0),
               (0.0, -bound - 1.0), (3e38, 3e38)]
        for x, y in bad:
            self.move(0, x, y)
        self.clock.advance(RELAY_INTERVAL)
        self.assertEqual(self.relayed(1), {0: (1.0, 2.0)})
        self.move(0, bound, -bound)
        self.clock.advance(RELAY_INTERVAL)
        self.assertEqual(self.relayed(1), {0: (bound, -bound)})
        self.assertEqual((self.host.counters["bad_position"], self.host.counters["received"]), (len(bad), 2 + 2))

    def assertHpEverySecond(self, step):
        """
        With nobody hitting, through the wait for ready, the fight's start
        and the fight, each member hears the boss's HP again within a
        second while the clock moves C{step} seconds at a time (a reactor
        that late); and not much more often than every HP_REPEAT_AFTER.
        """
        self.hello(0)
        self.hello(1)
        for _ in range(int(30 / step)):
            self.clock.advance(step)
        for member in (0, 1):
            times = [when for when, _ in self.heard(member, packets.BOSS_HP)]
            gaps = [later - earlier for earlier, later in zip(times, times[1:])]
            self.assertLessEqual(max(gaps), 1.0, (step, member))
            self.assertLessEqual(len(times), 30 / HP_REPEAT_AFTER + 3, (step, member))

    def test_a_player_placed_again_mid_fight_is_told_the_fight_as_it_is_now(self):
        """
        A resumed player given its place again while the raid fights (its
        raid_fight may have come while it was away): a raid_found with a new
        key, then a raid_fight with the boss's HP, sequence and deadline as
        they are now.  Placed again before the fight, it gets no raid_fight.
        """
        self.host.place_again(MEMBERS[1], "r1")
        self.assertEqual([event for _, event, _ in self.presence.told[len(MEMBERS):]], ["raid_found"])
        for user_id in MEMBERS:
            self.host.ready(user_id, "r1")
        self.host.hit(MEMBERS[0], "r1")
        hit = self.host.hit(MEMBERS[1], "r1")
        del self.presence.told[:]
        self.host.place_again(MEMBERS[1], "r1")
        [(found_for, found_event, found), (fight_for, fight_event, fight)] = self.presence.told
        self.assertEqual((found_for, found_event, fight_for, fight_event),
                         ([MEMBERS[1]], "raid_found", [MEMBERS[1]], "raid_fight"))
        self.assertNotEqual(found["key"], self.found[1]["key"])
        deadline = self.clock.seconds() + self.settings.time_limit
        self.assertEqual(fight, {"raid_id": "r1", "hp": hit.hp, "sequence": hit.sequence,
                                 "deadline_ms": int(deadline * 1000)})

    def test_the_boss_hp_goes_out_at_least_once_a_second_without_hits(self):
        """Clock steps shorter than the host's ticks, out of phase with them: HP gaps stay within a second."""
        self.assertHpEverySecond(0.007)

    def test_a_late_reactor_still_sends_the_hp_every_second(self):
        """
        Clock steps of 50 ms, five of the host's ticks: the raids whose
        turns were missed take them, so HP gaps stay within a second.
        """
        self.assertHpEverySecond(0.05)
