"""Key slots: the router's slot function agrees with the real cluster."""

import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from dreamraid.services.rediscluster import SLOTS, key_slot
from tests.support import make_settings, require_stack

EDGE_CASES = [
    "", "a", "{}", "{}{x}", "a{b}c{d}", "{user1000}.following", "{user1000}.followers",
    "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "{", "}", "}{", "{a", "a}", "{u:42}:inventory",
    "ключ", "{ключ}x", "键{值}", "🎮{raid:7}", "x" * 1000,
]


class KeySlotTests(TestCase):
    """key_slot against known values and against CLUSTER KEYSLOT."""

    def test_known_values(self):
        """Values from the Redis cluster specification and hash-tag rules."""
        self.assertEqual(key_slot("123456789"), 0x31C3 % SLOTS)  # CRC16/XMODEM check value
        self.assertEqual(key_slot("{user1000}.following"), key_slot("{user1000}.followers"))
        self.assertNotEqual(key_slot("foo{}{bar}"), key_slot("bar"))
        self.assertEqual(key_slot("foo{{bar}}zap"), key_slot("{bar"))
        self.assertEqual(key_slot("foo{bar}{zap}"), key_slot("bar"))
        self.assertEqual(key_slot(b"{u:1}a"), key_slot("u:1"))

    @given(st.text(alphabet=st.characters(min_codepoint=1, blacklist_categories=("Cs",)), max_size=40))
    def test_in_range(self, key):
        """Every key maps to a slot in range, the same for str and its UTF-8 bytes."""
        slot = key_slot(key)
        self.assertTrue(0 <= slot < SLOTS)
        self.assertEqual(slot, key_slot(key.encode("utf-8")))

    @defer.inlineCallbacks
    def test_parity_with_cluster(self):
        """CLUSTER KEYSLOT on the real cluster agrees for edge cases and 2,000 generated keys."""
        require_stack()
        host, port = make_settings().redis.startup_nodes[0]
        connection = yield txredisapi.Connection(host, port, reconnect=False, connectTimeout=2)
        self.addCleanup(connection.disconnect)
        keys = EDGE_CASES + [f"{{u:{n}}}:inv" if n % 3 else f"k{n}{{t{n % 7}}}z" for n in range(2000)]
        slots = yield defer.gatherResults(
            [connection.execute_command("CLUSTER", "KEYSLOT", key) for key in keys]
        )
        mismatched = [(k, s, key_slot(k)) for k, s in zip(keys, slots) if s != key_slot(k)]
        self.assertEqual(mismatched, [])
