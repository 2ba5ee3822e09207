"""
docs/protocol.md is generated from the schema and the code around it, must
not go stale, and must say what a client needs: which server takes which
message and on which port, what answers each request, the pushes, the party
change reasons, the limits and the shipped defaults.
"""

import re

from twisted.trial.unittest import TestCase

from dreamraid.errors import ErrorCode
from dreamraid.protocols import docs, game, packets
from dreamraid.protocols.session import SessionProtocol
from dreamraid.services import parties
from tests.support import make_settings


def section(text, message):
    """The part of the reference about one TCP message."""
    start = text.index(f"### {message.id} `{message.name}`\n")
    return text[start:text.index("\n### ", start + 1)]


class ProtocolDocTests(TestCase):
    """The wire reference."""

    def test_not_stale(self):
        """The committed docs/protocol.md is exactly what the schema renders (run `make protocol-doc`)."""
        self.assertEqual(docs.DOC_PATH.read_text(encoding="utf-8"), docs.render())

    def test_lists_everything(self):
        """Every message, datagram and error code appears in the reference."""
        text = docs.render()
        for message in [*packets.MESSAGES.values(), *packets.DATAGRAMS.values()]:
            self.assertIn(f"{message.id} `{message.name}`", text)
        for code in ErrorCode:
            self.assertIn(f"| {code.value} | `{code.name}` |", text)

    def test_check_command(self):
        """`dreamraid-protocol-doc --check` fails on a stale file and passes on a fresh one."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("stale\n")
        self.assertEqual(docs.main(["--check", "--path", path]), 1)
        self.assertEqual(docs.main(["--path", path]), 0)
        self.assertEqual(docs.main(["--check", "--path", path]), 0)


class WhereEachMessageGoesTests(TestCase):
    """Which server takes which message, derived from the protocols' handlers, and what answers it."""

    def test_every_client_message_is_handled_and_answered_as_declared(self):
        """
        Each message a client sends is handled by the session server, the
        game server or both, and has an entry in REPLY_OF naming a message a
        server sends; each message only a server sends is a reply or a push.
        """
        for message in packets.MESSAGES.values():
            if message.sender is not packets.Sender.SERVER:
                self.assertTrue(docs.servers_handling(message), message)
                self.assertIn(message, packets.REPLY_OF)
                reply = packets.REPLY_OF[message]
                self.assertTrue(reply is None or reply.sender is not packets.Sender.CLIENT, message)
            if message.sender is not packets.Sender.CLIENT:
                servers, requests, pushed = docs.senders_of(message)
                self.assertTrue(servers and (requests or pushed), message)
        self.assertEqual(set(game.GameProtocol.handlers) & set(SessionProtocol.handlers),
                         {m.id for m in (packets.PING, packets.PONG, packets.HELLO)})

    def test_each_message_says_its_server(self):
        """The session's messages say session server, the game's game server, from the handlers, with auth."""
        text = docs.render()
        for message in packets.MESSAGES.values():
            if message.sender is packets.Sender.SERVER:
                continue
            where = " and ".join(name for name, _ in docs.servers_handling(message))
            self.assertIn(f"*Client → {where}; ", section(text, message))
        self.assertIn("*Client → session server; needs no authentication; answered with `logged_in` (103)",
                      section(text, packets.LOGIN))
        self.assertIn("*Client → game server; needs an authenticated connection; answered with `hunted` (211)",
                      section(text, packets.HUNT))
        self.assertIn("*Client → game server; needs no authentication; answered with `tables` (205)",
                      section(text, packets.GAME_TABLES))
        self.assertIn("*Game server → client: a push (request id 0).*", section(text, packets.RAID_RESULT))
        self.assertIn("| 100 | `register` | client → session server | no | `registered` |", text)

    def test_ports_and_limits_come_from_the_configuration(self):
        """The ports and per-connection limits stated are those of the settings the reference is rendered with."""
        shipped = docs.render()
        self.assertIn("| session server | TCP 9091 |", shipped)
        self.assertIn("| game server | TCP 9090, UDP 50000 |", shipped)
        self.assertIn("| `rate_limits` | each message: 20 a second, burst 40 | `register`: 1 a second, burst 3, "
                      "`login`: 1 a second, burst 5, each other message: 10 a second, burst 20 |", shipped)
        self.assertIn("| `frame_rate` | 100 a second, burst 200 | 50 a second, burst 100 |", shipped)
        other = docs.render(make_settings(session_listen="tcp:7091", game_listen="tcp:7090", game_udp_port="7000",
                                          game_rate_limits="hunt=2/4", game_frame_rate="off",
                                          raids_ready_grace="4"))
        self.assertIn("| session server | TCP 7091 |", other)
        self.assertIn("| game server | TCP 7090, UDP 7000 |", other)
        self.assertIn("| `rate_limits` | `hunt`: 2 a second, burst 4 |", other)
        self.assertIn("| `frame_rate` | off |", other)
        self.assertIn("`ready_grace` (4 s) after the raid formed", other)

    def test_party_change_reasons_are_listed(self):
        """Every reason the parties service sends is listed under party_changed, with who is told."""
        text = section(docs.render(), packets.PARTY_CHANGED)
        for reason in parties.CHANGE_REASONS:
            self.assertRegex(text, rf"- `{re.escape(reason)}`: .+ told")
        self.assertEqual(set(parties.CHANGE_REASONS), {parties.JOINED, parties.LEFT, parties.KICKED, parties.AWAY,
                                                         parties.BACK})

    def test_examples_decode(self):
        """The example frames and datagrams in the reference are what the codec makes and reads."""
        text = docs.render()
        ping = bytes.fromhex(re.search(r"ping, request id 1, nonce 7: +([0-9a-f ]+)", text).group(1))
        self.assertEqual(packets.decode_frame(ping), (packets.PING, 1, {"nonce": 7}))
        hello = bytes.fromhex(re.search(r"udp_hello, sequence 1: +([0-9a-f ]+)", text).group(1))
        self.assertEqual(packets.open_datagram(bytes(range(16)), hello), (packets.UDP_HELLO, 0x01020304, 1, 1, {}))
