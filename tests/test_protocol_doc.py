"""docs/protocol.md is generated from the schema and must not go stale."""

from twisted.trial.unittest import TestCase

from dreamraid.errors import ErrorCode
from dreamraid.protocols import docs, packets


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
