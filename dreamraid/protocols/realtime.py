"""
The raid UDP socket of a game server: checks and decodes players'
datagrams for the raid host, and signs and sends the host's.

A datagram is dropped, and counted, when it is malformed, names a member
its raid does not have or its MAC does not verify under the key of the
member it names (forged: each member holds only its own key, so none can
speak for another), names no raid hosted here (unknown), or repeats or
precedes a sequence its member already sent (replayed), is past its
member's datagram rate (rate_limited), or carries a position that is not
finite or outside the world (bad_position); the host checks the last
three.  A datagram the kernel will not take now (its send buffer is full)
is dropped and counted as unsent, as the network would drop it: the HP
goes out again soon.

The checks run cheapest first, and a member's sequence and rate are
spent only by datagrams that member signed and has not sent before: the
message id (one a client sends) and the MAC (about a microsecond) are
checked before the host's sequence and rate checks, so nobody without the
member's key, and nobody replaying what it sent, can use up its budget
and starve it; the body is decoded only after both.
"""

from twisted.internet.protocol import DatagramProtocol

from dreamraid.protocols import packets

_EVENTS = {packets.UDP_HELLO.id: "hello", packets.POSITION.id: "position"}
# Bytes of datagrams the socket reads at one turn of the reactor before it
# turns to the other sockets and the timers.  Twisted's default, 256 KiB,
# is some 7,000 players' datagrams: under a flood, tens of milliseconds of
# work that every TCP player's request waited behind (a ping's p50 was
# 63 ms, docs/operations.md).  4 KiB is about 110 of them, half a
# millisecond; an honest load is not slowed, as the socket is read again
# at the next turn.
READ_PER_TURN = 4 * 1024
_MESSAGES = {"boss_hp": packets.BOSS_HP, "positions": packets.POSITIONS}


class RealtimeProtocol(DatagramProtocol):
    """Raid datagrams, for a L{dreamraid.services.raidhost.RaidHost}."""

    def __init__(self, host, public_host):
        self.host = host
        self._public_host = public_host

    def startProtocol(self):
        # Straight to the socket: every address written to came from a
        # datagram received, so Port.write's checks of it would be the
        # costliest part of a send.
        self._sendto = self.transport.socket.sendto
        self.transport.maxThroughput = READ_PER_TURN
        self.host.udp = self
        self.host.udp_address = f"{self._public_host}:{self.transport.getHost().port}"

    def stopProtocol(self):
        self.host.udp = None

    def datagramReceived(self, data, address):
        try:
            message_id, number, member, sequence = packets.datagram_header(data)
        except packets.CodecError:
            self.host.forged()
            return
        channel = self.host.channel(number)
        if channel is None:
            return
        event = _EVENTS.get(message_id)
        try:
            if event is None:
                raise packets.CodecError("not a datagram a client sends")
            if member >= len(channel.keys):
                raise packets.CodecError("no such member")
            packets.verify_datagram(channel.keys[member], data)
        except packets.CodecError:
            self.host.forged()
            return
        if not self.host.admit(number, member, sequence):
            return
        try:
            body = packets.decode_datagram(data).body
        except packets.CodecError:
            # Signed with the member's key: only the member (a broken client) sends this.
            self.host.forged()
            return
        self.host.datagram(number, member, event, body, address)

    def send(self, address, event, key, number, member, sequence, body):
        """Sign C{event} with C{key}, the player's own, and send it to the player."""
        try:
            self._sendto(packets.seal_datagram(key, _MESSAGES[event], number, member, sequence, body), address)
        except OSError as e:
            self.host.unsent(e)
