"""
Mutation fuzzing against a running game server: a player's session replayed
as 100,000 corrupted frames on authenticated connections, and 100,000
corrupted or forged raid datagrams at its UDP port, while an honest player
keeps playing.  Nothing may be logged as unhandled (trial fails a test on a
logged error), every datagram must be dropped and counted, and the honest
player's requests must keep being answered.
"""

import random

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from bench.fuzz import Frames
from dreamraid.client import SessionClient
from dreamraid.protocols import packets
from tests.mutations import fuzzed_datagrams, fuzzed_frames
from tests.support import eventually
from tests.test_client_library import ServersCase

FRAMES = 100_000
DATAGRAMS = 100_000
BATCH = 500
DATAGRAM_BATCH = 100
# The request id of the ping that ends each batch (not 0: that is refused).
CLOSING_PING = 0xFFFFFFFF


class _Fuzzer(Frames):
    """Writes batches of frames, each ended by a ping, and reads whatever comes back."""

    def __init__(self):
        self.authenticated = defer.Deferred()  # fires with the reply to authenticate
        self.lost = False
        self._waiting = None
        self._nonce = None

    def send(self, frames, nonce):
        """Write C{frames} and a ping; fires with True once its pong is back, False if the server closed first."""
        if self.lost:  # closed after the last batch's pong: a logout's reply comes after the pong that follows it
            return defer.succeed(False)
        self._nonce, self._waiting = nonce, defer.Deferred()
        self.transport.write(b"".join(frames) + packets.PING.encode(CLOSING_PING, {"nonce": nonce}))
        return self._waiting

    def frameReceived(self, message_id, data):
        frame = packets.decode_frame(data)
        if not self.authenticated.called and frame.message in (packets.AUTHENTICATED, packets.ERROR):
            self.authenticated.callback(frame.message)
        elif frame.message is packets.PONG and frame.body["nonce"] == self._nonce and not self._waiting.called:
            self._waiting.callback(True)

    def connectionLost(self, reason):
        self.lost = True
        if self._waiting is not None and not self._waiting.called:
            self._waiting.callback(False)


class FuzzTests(ServersCase):
    """The game server under corrupted traffic, its limits off so every frame reaches decoding and the handlers."""

    timeout = 300
    game_options = ("--game-rate-limits", "off", "--game-frame-rate", "off")

    async def fuzzer(self):
        """A raw connection authenticated as a new player."""
        session = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        try:
            name = f"f_{random.getrandbits(40):x}"
            await session.register(name, "correct horse")
            token = (await session.login(name, "correct horse")).token
            world = await session.enter_world(token)
        finally:
            session.close()
        fuzzer = _Fuzzer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", world.port), fuzzer)
        self.addCleanup(fuzzer.transport.loseConnection)
        fuzzer.transport.write(packets.AUTHENTICATE.encode(1, {"token": token}))
        self.assertIs(await fuzzer.authenticated, packets.AUTHENTICATED)
        return fuzzer

    async def test_corrupted_frames(self):
        """100,000 corrupted frames of a replayed session: each answered or dropped, none unhandled, the honest player served."""
        honest = await self.player()
        before = await honest.inventory()
        frames = fuzzed_frames(random.Random(9), FRAMES)
        fuzzer, connections = None, 0
        for start in range(0, FRAMES, BATCH):
            if fuzzer is None:
                fuzzer, connections = await self.fuzzer(), connections + 1
            if not await fuzzer.send(frames[start:start + BATCH], start + 1):
                fuzzer = None  # a corrupted frame may close it (a logout, a handoff); the next batch opens another
            if start % (BATCH * 20) == 0:
                await honest.connection.ping()
        self.assertEqual(await honest.inventory(), before)
        self.assertEqual((await honest.hunt(1)).exp_gained, 1)
        self.assertLess(connections, FRAMES // BATCH // 2, "most batches should leave their connection open")

    async def test_corrupted_and_forged_datagrams(self):
        """100,000 corrupted or forged datagrams: every one dropped and counted, none accepted."""
        honest = await self.player()
        host = self.game.part("RaidHost")
        udp_port = self.game.part("UDPServer")._port.getHost().port
        before = dict(host.counters)
        datagrams = fuzzed_datagrams(random.Random(11), DATAGRAMS, raid_numbers=(0, 1, 2, 2**32 - 1))
        sender = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)

        def dropped():
            return sum(host.counters[k] - before[k] for k in ("forged", "unknown", "replayed"))

        for start in range(0, DATAGRAMS, DATAGRAM_BATCH):
            for data in datagrams[start:start + DATAGRAM_BATCH]:
                sender.write(data, ("127.0.0.1", udp_port))
            sent = min(start + DATAGRAM_BATCH, DATAGRAMS)

            async def all_read():
                return dropped() >= sent
            # Each batch is read before the next goes, so the socket's buffer never overflows.
            await eventually(all_read, interval=0)
        self.assertEqual(host.counters["received"], before["received"])
        self.assertEqual(dropped(), DATAGRAMS)
        await honest.connection.ping()
