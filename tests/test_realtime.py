"""The raid UDP protocol against a recording host, over an in-memory socket."""

import errno
import inspect

from twisted.trial.unittest import TestCase

from dreamraid.protocols import packets
from dreamraid.protocols.realtime import RealtimeProtocol
from dreamraid.services.raidhost import Channel, RaidHost, member_keys

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

    def datagram(self, number, member, sequence, event, body, address):
        self.calls.append(("datagram", number, member, sequence, event, body, address))


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
    def __init__(self):
        self.socket = FakeSocket()

    def getHost(self):
        return type("Address", (), {"port": 50000})()


class RealtimeProtocolTests(TestCase):
    def setUp(self):
        self.host = RecordingHost()
        self.protocol = RealtimeProtocol(self.host, "127.0.0.1")
        self.protocol.makeConnection(FakePort())

    def test_recording_host_matches_the_raid_host(self):
        """The fake's methods are the real host's, with the same parameters."""
        for name in ("channel", "forged", "unsent", "datagram"):
            self.assertEqual(inspect.signature(getattr(RecordingHost, name)),
                             inspect.signature(getattr(RaidHost, name)), name)

    def test_verified_datagram_reaches_the_host(self):
        self.assertEqual(self.host.udp_address, "127.0.0.1:50000")
        data = packets.seal_datagram(KEYS[1], packets.POSITION, 7, 1, 3, {"x": 1.5, "y": -2.0, "state": 4})
        self.protocol.datagramReceived(data, PLAYER)
        self.assertEqual(self.host.calls, [("datagram", 7, 1, 3, "position", {"x": 1.5, "y": -2.0, "state": 4}, PLAYER)])

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
