"""
A player on the game servers: a connection that follows raid handoffs by
itself, and the raid's UDP channel.

When a raid is formed on another game server process, the player is told
to move there with a handoff ticket; L{GameClient} connects to the host,
authenticates with the ticket and carries on there, so the application
sees one stream of pushes and requests.
"""

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol

from dreamraid.client.connection import connect
from dreamraid.protocols import packets


def _address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


class GameClient:
    """An authenticated player; L{request} and L{next_push} go to whichever server holds them now."""

    def __init__(self, reactor, connection, address, user_id):
        self._reactor = reactor
        self.address = address
        self.user_id = user_id
        self.connection = None
        self._pushes = []
        self._waiters = {}
        self._use(connection)

    @classmethod
    async def login(cls, reactor, host, port, token):
        """Connect to a game server and authenticate with the login token."""
        connection = await connect(reactor, host, port)
        _, body = await connection.request(packets.AUTHENTICATE, {"token": token})
        return cls(reactor, connection, (host, port), body["user_id"])

    def request(self, message, body):
        return self.connection.request(message, body)

    def next_push(self, name):
        """A Deferred of the body of the next push named C{name} (one not yet read comes first)."""
        for i, (pushed, body) in enumerate(self._pushes):
            if pushed == name:
                del self._pushes[i]
                return defer.succeed(body)
        waiter = defer.Deferred()
        self._waiters.setdefault(name, []).append(waiter)
        return waiter

    def close(self):
        if self.connection.connected:
            self.connection.close()

    def _use(self, connection):
        self.connection = connection
        connection.on_push = self._pushed

    def _pushed(self, message, body):
        if message is packets.RAID_FOUND and _address(body["host"]) != self.address:
            defer.ensureDeferred(self._move(body))
        else:
            self._deliver(message.name, body)

    def _deliver(self, name, body):
        waiters = self._waiters.get(name)
        if waiters:
            waiters.pop(0).callback(body)
        else:
            self._pushes.append((name, body))

    async def _move(self, found):
        """Reconnect to the raid's host with the handoff ticket, then hand on the raid_found push."""
        host, port = _address(found["host"])
        connection = await connect(self._reactor, host, port)
        await connection.request(packets.AUTHENTICATE_HANDOFF, {"user_id": self.user_id, "ticket": found["ticket"]})
        old, self.address = self.connection, (host, port)
        self._use(connection)
        old.on_push = None
        self._deliver(packets.RAID_FOUND.name, found)


class RaidChannel(DatagramProtocol):
    """
    A player's UDP channel to a raid (from its C{raid_found} push): sends
    the hello and positions with rising sequence numbers, keeps the boss's
    HP by the highest HP sequence heard, and the others' latest positions.
    """

    def __init__(self, found):
        self.server = _address(found["udp"])
        self.key = bytes.fromhex(found["key"])
        self.number, self.member = found["raid_number"], found["member"]
        self.sequence = 0
        self.hp = self.hp_sequence = None
        self.positions = {}
        self.dropped = 0
        self._hp_waiters = []
        self.on_hp = None  # or a callable(hp, hp_sequence), for each newer HP heard

    def send(self, message, body):
        self.sequence += 1
        self.transport.write(packets.seal_datagram(self.key, message, self.number, self.member, self.sequence, body),
                             self.server)

    def hello(self):
        self.send(packets.UDP_HELLO, {})

    def greet(self, clock, interval=0.5):
        """
        Send the hello every C{interval} seconds until the host answers (a
        hello or its answer may be lost); a Deferred of the boss's HP.
        """
        resend = task.LoopingCall(self.hello)
        resend.clock = clock
        resend.start(interval)

        def answered(result):
            resend.stop()
            return result
        return self.when_hp(lambda hp: True).addBoth(answered)

    def position(self, x, y, state):
        self.send(packets.POSITION, {"x": x, "y": y, "state": state})

    def when_hp(self, predicate):
        """A Deferred that fires with the HP once C{predicate(hp)} holds."""
        if self.hp is not None and predicate(self.hp):
            return defer.succeed(self.hp)
        waiter = defer.Deferred()
        self._hp_waiters.append((predicate, waiter))
        return waiter

    def datagramReceived(self, data, address):
        try:
            datagram = packets.open_datagram(self.key, data)
        except packets.CodecError:
            self.dropped += 1
            return
        if datagram.message is packets.BOSS_HP:
            if self.hp_sequence is not None and datagram.body["hp_sequence"] < self.hp_sequence:
                return
            self.hp, self.hp_sequence = datagram.body["hp"], datagram.body["hp_sequence"]
            if self.on_hp is not None:
                self.on_hp(self.hp, self.hp_sequence)
            waiting, self._hp_waiters = self._hp_waiters, []
            for predicate, waiter in waiting:
                if predicate(self.hp):
                    waiter.callback(self.hp)
                else:
                    self._hp_waiters.append((predicate, waiter))
        elif datagram.message is packets.POSITIONS:
            for entry in datagram.body["players"]:
                self.positions[entry["member"]] = (entry["x"], entry["y"], entry["state"])
