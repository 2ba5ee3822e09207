"""The client library paired with a server protocol in memory, and its routing of raid pushes."""

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import TestCase

from dreamraid.client import ClientProtocol, ConnectionClosed, RemoteError
from dreamraid.client.game import GameClient, Raid, RaidChannel, RaidNotStarted
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.server import ServerFactory
from dreamraid.services.liveness import Liveness
from tests.support import make_settings


class ClientTests(TestCase):
    """Requests, pipelining, pings and failures between a real client and server protocol."""

    def setUp(self):
        self.clock = Clock()
        settings = make_settings().game
        self.liveness = Liveness(self.clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        self.liveness.startService()
        self.addCleanup(self.liveness.stopService)
        factory = ServerFactory("dreamraid-test", settings, self.liveness)
        self.server = factory.buildProtocol(None)
        self.client = ClientProtocol(self.clock, timeout=3.0)
        self.server_transport = iosim.FakeTransport(self.server, isServer=True)
        client_transport = iosim.FakeTransport(self.client, isServer=False)
        self.pump = iosim.connect(self.server, self.server_transport, self.client, client_transport)

    def test_hello(self):
        """hello returns the welcome body."""
        d = Deferred.fromCoroutine(self.client.hello("tester"))
        self.pump.flush()
        self.assertEqual(self.successResultOf(d)["protocol_version"], packets.PROTOCOL_VERSION)

    def test_pipelining(self):
        """Replies find their requests by id, whatever was sent between them."""
        ds = [self.client.request(packets.PING, {"nonce": n}) for n in (11, 22, 33)]
        self.pump.flush()
        self.assertEqual([self.successResultOf(d)[1]["nonce"] for d in ds], [11, 22, 33])

    def test_ping_measures_round_trip(self):
        """ping() returns the clock time between sending and the pong."""
        d = Deferred.fromCoroutine(self.client.ping())
        self.clock.advance(0.5)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), 0.5)

    def test_answers_server_pings(self):
        """The client answers the server's pings, so the server records a round trip."""
        self.clock.advance(1)
        self.pump.flush()
        self.assertIsNotNone(self.server.state.rtt)

    def test_remote_error(self):
        """An error reply raises RemoteError with the code."""
        d = self.client.request(packets.HELLO, {"protocol_version": 99, "client": "x"})
        self.pump.flush()
        error = self.failureResultOf(d, RemoteError).value
        self.assertEqual(error.code, ErrorCode.UNSUPPORTED_VERSION)

    def test_timeout(self):
        """A request with no reply fails with TimeoutError after its timeout, and a late reply is ignored."""
        d = self.client.request(packets.PING, {"nonce": 1})
        self.clock.advance(3)
        self.failureResultOf(d, TimeoutError)
        self.pump.flush()
        self.assertEqual(self.client._pending, {})

    def test_closed_with_reason(self):
        """When the server drops the connection it says why; later requests fail with that reason."""
        self.clock.advance(5)
        self.pump.flush()
        self.assertEqual(self.client.close_reason[0], ErrorCode.AUTH_TIMEOUT)
        self.assertEqual(self.client.pushes[-1][0], "error")
        self.successResultOf(self.client.closed)
        d = self.client.request(packets.PING, {"nonce": 2})
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, ErrorCode.AUTH_TIMEOUT)

    def test_connection_lost_fails_pending(self):
        """Requests in flight when the connection drops fail with ConnectionClosed."""
        d = self.client.request(packets.PING, {"nonce": 1})
        self.client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ConnectionClosed)
        self.successResultOf(self.client.closed)


class RaidChannelTests(TestCase):
    """A player's raid channel over an in-memory UDP transport."""

    def setUp(self):
        self.clock = Clock()
        self.key = bytes(range(16))
        self.channel = RaidChannel({"udp": "127.0.0.1:5000", "key": self.key.hex(), "raid_number": 7, "member": 1})
        self.sent = []
        self.channel.transport = FakeDatagramTransport(self.sent)

    def receive(self, message, sequence, body):
        """The host's C{message} with datagram sequence C{sequence}, sealed with the player's key; its bytes."""
        data = packets.seal_datagram(self.key, message, 7, 1, sequence, body)
        self.channel.datagramReceived(data, ("127.0.0.1", 5000))
        return data

    def hp(self, hp, sequence):
        self.receive(packets.BOSS_HP, sequence, {"hp": hp, "hp_sequence": sequence})

    def positions(self, sequence, x):
        return self.receive(packets.POSITIONS, sequence, {"players": [{"member": 0, "x": x, "y": 0.0, "state": 0}]})

    def test_greet_repeats_the_hello_until_answered(self):
        """A lost hello is sent again every interval; the first HP answers it and the hellos stop."""
        greeted = self.channel.greet(self.clock, interval=0.5)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        hellos = [packets.open_datagram(self.key, data) for data, _ in self.sent]
        self.assertEqual([(d.message, d.sequence) for d in hellos],
                         [(packets.UDP_HELLO, 1), (packets.UDP_HELLO, 2), (packets.UDP_HELLO, 3)])
        self.assertNoResult(greeted)
        self.hp(30, 4)
        self.assertEqual(self.successResultOf(greeted), 30)
        self.clock.advance(5)
        self.assertEqual(len(self.sent), 3)

    def test_greet_gives_up(self):
        """A host that never answers fails the greeting after its timeout, and the hellos stop."""
        greeted = self.channel.greet(self.clock, interval=0.5, timeout=2.0)
        self.clock.advance(2.0)
        self.failureResultOf(greeted, TimeoutError)
        sent = len(self.sent)
        self.clock.advance(5)
        self.assertEqual(len(self.sent), sent)

    def test_older_hp_is_ignored(self):
        """The channel keeps the HP with the highest sequence, whatever order they come in."""
        self.hp(20, 5)
        self.hp(25, 3)
        self.assertEqual((self.channel.hp, self.channel.hp_sequence), (20, 5))

    def test_replayed_datagrams_are_dropped(self):
        """
        A positions or boss_hp datagram whose sequence is not above the
        highest heard of its message (a capture sent again, or one overtaken
        on the way) is dropped and counted as replayed: the positions do not
        go back, the HP callback does not fire again.
        """
        heard = []
        self.channel.on_hp = lambda hp, sequence: heard.append((hp, sequence))
        old = self.positions(2, 1.0)
        self.positions(4, 2.0)
        self.channel.datagramReceived(old, ("127.0.0.1", 5000))
        self.positions(3, 3.0)
        self.positions(4, 4.0)
        self.assertEqual(self.channel.positions, {0: (2.0, 0.0, 0)})

        hp = self.receive(packets.BOSS_HP, 5, {"hp": 30, "hp_sequence": 0})
        self.channel.datagramReceived(hp, ("127.0.0.1", 5000))
        self.assertEqual(heard, [(30, 0)])
        self.assertEqual((self.channel.replayed, self.channel.dropped), (4, 0))

    def test_sequences_are_kept_per_message(self):
        """
        The host numbers its datagrams to a player in one sequence: a
        positions datagram behind a newer boss_hp is still news, and the
        other way round.
        """
        self.hp(30, 6)
        self.positions(5, 1.0)
        self.hp(25, 7)
        self.positions(8, 2.0)
        self.assertEqual((self.channel.hp, self.channel.positions), (25, {0: (2.0, 0.0, 0)}))
        self.assertEqual(self.channel.replayed, 0)

    def test_datagrams_under_another_key_are_dropped(self):
        """A datagram sealed with another member's key (or any other) is dropped as not verifying."""
        self.channel.datagramReceived(packets.seal_datagram(
            bytes(16), packets.BOSS_HP, 7, 1, 9, {"hp": 0, "hp_sequence": 99}), ("127.0.0.1", 5000))
        self.assertEqual((self.channel.hp, self.channel.dropped, self.channel.replayed), (None, 1, 0))


class PushOnlyConnection:
    """
    Where a L{GameClient} gets its pushes (it sets C{on_push}) and sends its
    requests: each is answered at once with an empty reply, as raid_ready is.
    """

    on_push = None
    connected = True

    def __init__(self):
        self.requests = []

    def request(self, message, body):
        self.requests.append((message.name, body))
        return succeed((packets.RAID_READY, {}))


class UdpClock(Clock):
    """A clock that also opens UDP ports (IReactorUDP.listenUDP): each channel is kept, its datagrams recorded."""

    def __init__(self):
        super().__init__()
        self.channels = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        protocol.makeConnection(FakeDatagramTransport([]))
        self.channels.append(protocol)
        return FakeUdpPort(protocol)


class FakeUdpPort:
    """A listening UDP port: stopping it takes its protocol's transport away, as Twisted's does."""

    def __init__(self, protocol):
        self.protocol = protocol

    def stopListening(self):
        self.protocol.doStop()


def found(raid_id):
    """A raid_found body for a raid on the client's own server (no move)."""
    return {"raid_id": raid_id, "host": "127.0.0.1:9000", "ticket": "t", "udp": "127.0.0.1:5000", "raid_number": 7,
            "member": 0, "key": "00" * 16, "members": [{"user_id": 5}, {"user_id": 6}]}


def ended(raid_id):
    """A raid_result body of a failed raid."""
    return {"raid_id": raid_id, "cleared": False, "score": 0, "team_score": 0, "exp_gained": 0, "level": 0,
            "best": 0, "changed": []}


class GameClientPushTests(TestCase):
    """Which waiter a raid push goes to."""

    def setUp(self):
        self.connection = PushOnlyConnection()
        self.reactor = UdpClock()
        self.client = GameClient(self.reactor, self.connection, ("127.0.0.1", 9000), 5)

    def joined(self, raid_id, waiting=None):
        """
        C{waiting} (or a new next_raid), once raid_id's raid_found is here:
        the host answers the hello; the L{Raid}.
        """
        waiting = waiting or Deferred.fromCoroutine(self.client.next_raid())
        self.reactor.channels[-1].datagramReceived(
            packets.seal_datagram(bytes(16), packets.BOSS_HP, 7, 0, 1, {"hp": 30, "hp_sequence": 1}),
            ("127.0.0.1", 5000))
        raid = self.successResultOf(waiting)
        self.assertEqual((raid.raid_id, self.connection.requests[-1]), (raid_id, ("raid_ready", {"raid_id": raid_id})))
        return raid

    def test_a_raid_ended_before_it_was_found_raises_and_its_late_found_is_dropped(self):
        """
        A raid_result while waiting for a raid: next_raid raises
        RaidNotStarted with that result, and the raid's raid_found, if it
        comes after, is not handed to the next wait.
        """
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))
        failure = self.failureResultOf(waiting, RaidNotStarted)
        self.assertEqual((failure.value.result.raid_id, failure.value.result.cleared), ("r1", False))
        self.connection.on_push(packets.RAID_FOUND, found("r1"))
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.assertNoResult(waiting)  # the late raid_found would have started a raid
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)

    def test_a_raid_over_before_the_greeting_raises(self):
        """
        A raid_found whose raid's result is already here, or comes before
        the host answers the hello: next_raid raises RaidNotStarted (no UDP
        port stays open), and a repeat of that result is dropped; the next
        raid is joined as usual.
        """
        self.connection.on_push(packets.RAID_FOUND, found("r1"))
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.assertEqual(self.failureResultOf(waiting, RaidNotStarted).value.result.raid_id, "r1")
        self.assertEqual(self.reactor.channels, [])
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))  # told again (by another server)
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.assertNoResult(waiting)
        self.connection.on_push(packets.RAID_FOUND, found("r2"))
        self.connection.on_push(packets.RAID_RESULT, ended("r2"))  # before the host answered
        self.assertEqual(self.failureResultOf(waiting, RaidNotStarted).value.result.raid_id, "r2")
        self.connection.on_push(packets.RAID_FOUND, found("r3"))
        self.assertEqual(self.joined("r3").raid_id, "r3")

    def test_a_failed_join_leaves_the_raids_pushes_to_whoever_waits(self):
        """A host that never answers fails next_raid; the raid's result still reaches a reader of raid_result."""
        self.connection.on_push(packets.RAID_FOUND, found("r1"))
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.reactor.advance(10)
        self.failureResultOf(waiting, TimeoutError)
        result = self.client.next_push("raid_result")
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))
        self.assertEqual(self.successResultOf(result)["raid_id"], "r1")

    def test_a_raid_over_while_greeting_again_stops_the_hellos(self):
        """
        After a resume the raid's raid_found comes again and the client
        greets its host anew; a raid that ends (its UDP port closed) before
        the host answers stops those hellos: none is sent on a closed
        port, and no "did not answer" failure is logged for a raid that is
        over.
        """
        self.connection.on_push(packets.RAID_FOUND, found("r1"))
        raid = self.joined("r1")
        channel = self.reactor.channels[-1]
        self.connection.on_push(packets.RAID_FOUND, {**found("r1"), "key": "11" * 16})  # resumed: a new key
        self.assertEqual(channel.key, bytes([0x11]) * 16)
        result = Deferred.fromCoroutine(raid.result())
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))
        self.assertEqual(self.successResultOf(result).raid_id, "r1")
        self.assertIsNone(channel.transport)
        self.reactor.advance(0.5)  # a hello due on the closed port
        self.reactor.advance(20)  # the greeting's timeout
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_raid_takes_only_its_own_result(self):
        """A raid_result of another raid (one that ended before it was found) is not this raid's result."""
        raid = Raid(self.client, found("r2"))
        result = Deferred.fromCoroutine(raid.result())
        self.connection.on_push(packets.RAID_RESULT, ended("r1"))
        self.assertNoResult(result)
        self.connection.on_push(packets.RAID_RESULT, ended("r2"))
        self.assertEqual(self.successResultOf(result).raid_id, "r2")
        waiting = Deferred.fromCoroutine(self.client.next_raid())
        self.assertEqual(self.failureResultOf(waiting, RaidNotStarted).value.result.raid_id, "r1")


class FakeDatagramTransport:
    """Records what a datagram protocol writes, with its address."""

    def __init__(self, sent):
        self.sent = sent

    def write(self, data, address):
        self.sent.append((data, address))
