"""
A client written from docs/protocol.md alone: frames, bodies and datagrams
built and read with C{struct}, C{hashlib} and C{hmac} only (nothing of
dreamraid's codec), playing a whole solo raid against a real session server
and game server: register, login, enter the world, authenticate, read the
game tables, queue, greet the raid over UDP with a MAC'd datagram, ready,
hit until the boss falls and read the result.  If the reference leaves out
or gets wrong anything this needs, this test fails.
"""

import hashlib
import hmac
import random
import struct

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol

from tests.support import eventually
from tests.test_client_library import ServersCase

# Message ids, from the reference's tables.
ERROR, PING, PONG = 1, 2, 3
REGISTER, REGISTERED, LOGIN, LOGGED_IN, ENTER_WORLD, WORLD_ENTERED = 100, 101, 102, 103, 104, 105
AUTHENTICATE, AUTHENTICATED, GAME_TABLES, TABLES = 200, 201, 204, 205
QUEUE_RAID, QUEUED, RAID_FOUND, RAID_READY, RAID_READY_OK, RAID_FIGHT = 260, 261, 265, 267, 268, 269
RAID_HIT, HIT, RAID_RESULT = 270, 271, 272
UDP_HELLO, BOSS_HP = 1, 3


def string(text):
    data = text.encode("utf-8")
    return struct.pack("<H", len(data)) + data


class Reader:
    """Reads a body's fields in order, as the reference lays them out."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        length = self.take("H")
        text = self.data[self.at:self.at + length].decode("utf-8")
        self.at += length
        return text

    def array(self, count_fmt, fmt):
        return [self.take(fmt) for _ in range(self.take(count_fmt))]

    def end(self):
        assert self.at == len(self.data), f"{len(self.data) - self.at} bytes left over"


class RawClient(Protocol):
    """One TCP connection: requests numbered from 1, replies matched by id, pushes (id 0) queued, pings answered."""

    def __init__(self):
        self.buffer = b""
        self.next_id = 0
        self.pending = {}
        self.pushes = []
        self.push_waiters = []

    def request(self, message_id, body=b""):
        self.next_id += 1
        self.pending[self.next_id] = d = defer.Deferred()
        self.transport.write(struct.pack("<HHI", 6 + len(body), message_id, self.next_id) + body)
        return d

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack_from("<H", self.buffer)
            if len(self.buffer) < 2 + length:
                return
            message_id, request_id = struct.unpack_from("<HI", self.buffer, 2)
            body, self.buffer = self.buffer[8:2 + length], self.buffer[2 + length:]
            if request_id:
                self.pending.pop(request_id).callback((message_id, body))
            elif message_id == PING:
                self.transport.write(struct.pack("<HHI", 6 + len(body), PONG, 0) + body)
            else:
                self.pushes.append((message_id, body))
                for waiter in list(self.push_waiters):
                    waiter()

    def next_push(self, message_id):
        """The body of the next push of C{message_id} (earlier ones of other ids are kept)."""
        d = defer.Deferred()

        def look():
            for i, (pushed, body) in enumerate(self.pushes):
                if pushed == message_id:
                    del self.pushes[i]
                    self.push_waiters.remove(look)
                    d.callback(body)
                    return

        self.push_waiters.append(look)
        look()
        return d


async def call(client, message_id, body, reply_id):
    """Send a request and return its reply's body, failing on an error frame."""
    got, body = await client.request(message_id, body)
    if got == ERROR:
        reader = Reader(body)
        raise AssertionError(f"error {reader.take('H')}: {reader.string()}")
    assert got == reply_id, (got, reply_id)
    return body


class RaidChannel(DatagramProtocol):
    """The raid's UDP channel: datagrams sealed and opened by hand."""

    def __init__(self, key, raid, member):
        self.key, self.raid, self.member, self.sequence = key, raid, member, 0
        self.received = []

    def mac(self, data):
        return hashlib.blake2b(data, key=self.key, digest_size=16).digest()

    def send(self, message_id, body, address):
        self.sequence += 1
        data = struct.pack("<HIBI", message_id, self.raid, self.member, self.sequence) + body
        self.transport.write(data + self.mac(data), address)

    def datagramReceived(self, data, address):
        signed, mac = data[:-16], data[-16:]
        if hmac.compare_digest(mac, self.mac(signed)):
            self.received.append((struct.unpack_from("<HIBI", signed), signed[11:]))


class WireReferenceTests(ServersCase):
    """A solo raid, spoken byte by byte from the reference."""

    game_options = ("--raids-raid-size", "1")

    async def connect(self, port):
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(client.transport.loseConnection)
        return client

    async def test_a_solo_raid_from_the_reference(self):
        """Register to raid result, every byte as docs/protocol.md describes it, against the real servers."""
        name, password = f"w_{random.getrandbits(40):x}", "correct horse"
        session = await self.connect(self.session.port)
        user_id = Reader(await call(session, REGISTER, string(name) + string(password), REGISTERED)).take("Q")
        reader = Reader(await call(session, LOGIN, string(name) + string(password), LOGGED_IN))
        self.assertEqual(reader.take("Q"), user_id)
        token = reader.string()
        expires_at = reader.take("Q")
        self.assertEqual(len(reader.string()), 43)  # the refresh token
        self.assertGreater(reader.take("Q"), expires_at)
        reader.end()
        reader = Reader(await call(session, ENTER_WORLD, string(token), WORLD_ENTERED))
        self.assertEqual(reader.take("Q"), user_id)
        host, port = reader.string(), reader.take("H")
        self.assertEqual((host, port), ("127.0.0.1", self.game.port))

        game = await self.connect(port)
        tables = Reader(await call(game, GAME_TABLES, b"", TABLES))  # before authenticate: it needs none
        max_level = tables.take("H")
        exp_to_advance = dict(tables.array("H", "HI"))
        max_enhancement = tables.take("H")
        chances = dict(tables.array("H", "HB"))
        slots, cooldown = tables.take("H"), tables.take("I")
        monsters = dict(tables.array("H", "BI"))
        tables.take("H")
        items = tables.array("H", "IBI")
        names = tables.string().split("\n")
        tables.end()
        self.assertEqual((max_level, exp_to_advance[14], max_enhancement, chances[9], slots, cooldown, monsters[5]),
                         (15, 91, 10, 10, 50, 500, 5))
        self.assertEqual(dict(zip([code for code, _, _ in items], zip(names, [(t, s) for _, t, s in items])))[201],
                         ("Small potion", (1, 20)))

        reader = Reader(await call(game, AUTHENTICATE, string(token), AUTHENTICATED))
        self.assertEqual((reader.take("Q"), reader.string(), reader.take("B"), reader.take("I")), (user_id, name, 1, 0))
        await call(game, QUEUE_RAID, b"", QUEUED)

        found = Reader(await game.next_push(RAID_FOUND))
        raid_id, raid_host = found.string(), found.string()
        found.string()  # the handoff ticket
        udp = found.string()
        raid_number, member, key = found.take("I"), found.take("B"), bytes.fromhex(found.string())
        self.assertEqual((raid_host, member, found.array("B", "Q")), (f"127.0.0.1:{self.game.port}", 0, [user_id]))
        found.end()

        channel = RaidChannel(key, raid_number, member)
        udp_port = reactor.listenUDP(0, channel, interface="127.0.0.1")
        self.addCleanup(udp_port.stopListening)
        udp_host, _, udp_port_number = udp.rpartition(":")

        def greeted():
            if not channel.received:
                channel.send(UDP_HELLO, b"", (udp_host, int(udp_port_number)))
            return defer.succeed(bool(channel.received))

        await eventually(greeted)
        (message_id, raid, to_member, _), body = channel.received[0]
        self.assertEqual((message_id, raid, to_member, struct.unpack("<II", body)[0]), (BOSS_HP, raid_number, member, 4))

        await call(game, RAID_READY, string(raid_id), RAID_READY_OK)
        fight = Reader(await game.next_push(RAID_FIGHT))
        self.assertEqual((fight.string(), fight.take("I")), (raid_id, 4))
        hp, score = 4, 0
        while hp:
            damage, hp, _ = struct.unpack("<III", await call(game, RAID_HIT, string(raid_id), HIT))
            score += damage
        result = Reader(await game.next_push(RAID_RESULT))
        self.assertEqual((result.string(), result.take("?"), result.take("I"), result.take("I")),
                         (raid_id, True, 4, 4))
        exp_gained, level, best = result.take("I"), result.take("B"), result.take("I")
        self.assertEqual((exp_gained, best, score), (4, 4, 4))
        self.assertEqual(level, max(lv for lv in range(1, max_level + 1)
                                    if lv == 1 or exp_to_advance[lv - 1] <= exp_gained))
        result.array("H", "BHIBI")
        result.end()
