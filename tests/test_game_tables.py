"""
The game_tables request: its reply's bytes, the game server's answer from
the loaded tables (before authentication too), and the client library's
call that turns it back into typed tables.
"""

import struct

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import TestCase

from dreamraid.client import ClientProtocol, RemoteError
from dreamraid.client.game import GameClient
from dreamraid.client.results import GameTables, ItemKind
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.game import GameFactory
from dreamraid.services.liveness import Liveness
from dreamraid.tables import load_tables, parse_tables
from tests.support import make_settings

SHIPPED = load_tables(make_settings().tables.path)

SMALL = parse_tables({
    "levels": {"max_level": 3, "exp_to_advance": {"1": 2, "2": 5}},
    "enhancement": {"max_level": 2, "success_percent": {"0": 100, "1": 40}},
    "monsters": {"exp": {"7": 3}, "cooldown_ms": 250},
    "raid": {"exp_per_score": 2},
    "inventory": {"slots": 4},
    "items": {"9": {"name": "Old boot", "tab": "equipment"}, "300": {"name": "Ore", "tab": "materials", "stack": 5}},
})


def string(text):
    data = text.encode("utf-8")
    return struct.pack("<H", len(data)) + data


class GameTablesTests(TestCase):
    """A game server's game_tables, over an in-memory connection to the client library."""

    def connect(self, tables):
        """A game server protocol with C{tables} (no other service: none is needed) and a client paired with it."""
        clock = Clock()
        settings = make_settings().game
        liveness = Liveness(clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        factory = GameFactory("dreamraid-test", settings, liveness, None, None, None, None, None, None, tables)
        server = factory.buildProtocol(None)
        client = ClientProtocol(clock)
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False))
        return client, pump

    def test_reply_bytes(self):
        """The tables reply of small tables is exactly the bytes docs/protocol.md describes, field by field."""
        client, pump = self.connect(SMALL)
        d = client.request(packets.GAME_TABLES, {})
        pump.flush()
        message, body = self.successResultOf(d)
        self.assertIs(message, packets.TABLES)
        expected = (
            struct.pack("<H", 3) + struct.pack("<H", 2) + struct.pack("<HI", 1, 2) + struct.pack("<HI", 2, 5)
            + struct.pack("<H", 2) + struct.pack("<H", 2) + struct.pack("<HB", 0, 100) + struct.pack("<HB", 1, 40)
            + struct.pack("<H", 4) + struct.pack("<I", 250) + struct.pack("<H", 1) + struct.pack("<BI", 7, 3)
            + struct.pack("<H", 2) + struct.pack("<H", 2) + struct.pack("<IBI", 9, 0, 1) + struct.pack("<IBI", 300, 2, 5)
            + string("Old boot\nOre"))
        frame = packets.TABLES.encode(1, body)
        self.assertEqual(frame, struct.pack("<HHI", 6 + len(expected), 205, 1) + expected)

    def test_answered_before_authentication_from_the_loaded_tables(self):
        """An unauthenticated connection gets the shipped tables, and the client library returns them typed."""
        client, pump = self.connect(SHIPPED)
        game = GameClient(None, client, ("127.0.0.1", 9090), 1)
        d = Deferred.fromCoroutine(game.game_tables())
        pump.flush()
        tables = self.successResultOf(d)
        self.assertIsInstance(tables, GameTables)
        self.assertEqual(tables.exp_to_advance, dict(SHIPPED.exp_to_advance))
        self.assertEqual(tables.enhance_chances, dict(SHIPPED.enhance_success_percent))
        self.assertEqual((tables.max_level, tables.max_enhancement, tables.slots, tables.hunt_cooldown_ms),
                         (15, 10, 50, 500))
        self.assertEqual(tables.monster_exp, {1: 1, 2: 2, 3: 3, 4: 4, 5: 5})
        self.assertEqual(tables.raid_exp_per_score, 1)
        self.assertEqual(tables.items, {code: ItemKind(kind.name, kind.tab, kind.stack)
                                        for code, kind in SHIPPED.items.items()})
        self.assertEqual(tables.items[101], ItemKind("Bronze sword", 0, 1))
        self.assertEqual(tables.items[201], ItemKind("Small potion", 1, 20))

    def test_refused_without_tables(self):
        """A game server built without tables refuses game_tables rather than failing."""
        client, pump = self.connect(None)
        d = client.request(packets.GAME_TABLES, {})
        pump.flush()
        self.assertEqual(self.failureResultOf(d, RemoteError).value.code, ErrorCode.NOT_ACCEPTED)

    def test_tables_the_wire_cannot_carry_stop_start_up(self):
        """A monster kind over 255 (hunt's u8) cannot go in the reply: building the factory fails, naming it."""
        too_big = parse_tables({
            "levels": {"max_level": 2, "exp_to_advance": {"1": 1}},
            "enhancement": {"max_level": 1, "success_percent": {"0": 100}},
            "monsters": {"exp": {"300": 1}},
        })
        self.assertRaises(packets.CodecError, self.connect, too_big)
