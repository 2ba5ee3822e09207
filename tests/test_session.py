"""
The session server over real TCP, built by its twistd plugin, against the
real Redis Cluster and MariaDB: register, login, throttling, tokens and
enter world.
"""

import random

import jwt
from twisted.trial.unittest import TestCase

from dreamraid import session_tap
from dreamraid.client import RemoteError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.livestore import session_key
from tests import cluster
from tests.storage import TEST_DATABASE, new_key_pair, prepare_test_database, sql
from tests.support import RunningServer, require_stack


class StartupTests(TestCase):

    def test_missing_key_stops_startup_naming_the_file(self):
        """A session server without its token key exits with a message naming the file and the fix."""
        missing = f"{self.mktemp()}/nothing.pem"
        with self.assertRaises(SystemExit) as raised:
            RunningServer(session_tap, "session", ["--tokens-private-key", missing])
        self.assertIn(missing, str(raised.exception))
        self.assertIn("dreamraid-admin keys", str(raised.exception))


class SessionServerTests(TestCase):
    """One session server per test, on free ports and the test database."""

    timeout = 60

    async def setUp(self):
        require_stack()
        await prepare_test_database()
        self.private_key, self.public_key = new_key_pair(self)
        self.server = RunningServer(session_tap, "session", [
            "--mysql-database", TEST_DATABASE,
            "--accounts-scrypt-n", "1024",
            "--accounts-failures-per-address", "8",
            "--sync-prefix", f"test{random.getrandbits(48):x}",
            "--tokens-private-key", self.private_key,
            "--tokens-public-key", self.public_key,
            "--session-game-servers", "127.0.0.1:9999",
            # These tests register and log in as fast as they are answered; tests/test_limits.py tests the limits.
            "--session-rate-limits", "off",
        ]).start(self)
        self.client = await self.server.client(self)
        self.router = await cluster.router_for(self)
        # Every test logs in from 127.0.0.1: start each with a clean count there.
        await self.router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))

    async def request(self, message, **body):
        _, reply = await self.client.request(message, body)
        return reply

    async def refused(self, message, **body):
        """The error code the server answers C{message} with."""
        with self.assertRaises(RemoteError) as raised:
            await self.client.request(message, body)
        return raised.exception.code

    def new_name(self):
        return f"p_{random.getrandbits(40):x}"

    async def test_register_login_enter_world(self):
        """A new account logs in, its token verifies with the public key alone, and entering the world makes it live."""
        name = self.new_name()
        registered = await self.request(packets.REGISTER, name=name, password="correct horse")
        [(stored_hash, level)] = await sql("SELECT password_hash, level FROM users WHERE id = %s",
                                           (registered["user_id"],))
        self.assertTrue(stored_hash.startswith("scrypt$1024$"))
        self.assertNotIn("correct horse", stored_hash)
        self.assertEqual(level, 1)

        logged_in = await self.request(packets.LOGIN, name=name.upper(), password="correct horse")
        self.assertEqual(logged_in["user_id"], registered["user_id"])
        with open(self.public_key, "rb") as f:
            claims = jwt.decode(logged_in["token"], f.read(), algorithms=["EdDSA"], audience="dreamraid-game",
                                options={"require": ["sub", "iss", "aud", "iat", "exp", "jti"]})
        self.assertEqual(set(claims), {"sub", "iss", "aud", "iat", "exp", "jti"})
        self.assertEqual((claims["sub"], claims["iss"]), (str(registered["user_id"]), "dreamraid-session"))
        self.assertEqual(claims["exp"] - claims["iat"], 600)
        self.assertEqual(claims["exp"], logged_in["expires_at"])
        [(last_login,)] = await sql("SELECT last_login_at FROM users WHERE id = %s", (registered["user_id"],))
        self.assertIsNotNone(last_login)

        entered = await self.request(packets.ENTER_WORLD, token=logged_in["token"])
        self.assertEqual(entered, {"user_id": registered["user_id"], "host": "127.0.0.1", "port": 9999})
        live = await self.router.execute("GET", session_key(registered["user_id"]))
        self.assertEqual(live, claims["jti"].encode())

    async def test_bad_names_and_passwords(self):
        """Names outside 3-20 of [A-Za-z0-9_] and passwords outside 8-128 characters are refused with their codes."""
        for name in ["ab", "x" * 21, "has space", "semi;colon", "'; DROP TABLE users; --", "ünïcode", ""]:
            self.assertEqual(await self.refused(packets.REGISTER, name=name, password="long enough"),
                             ErrorCode.INVALID_NAME, name)
        for password in ["short", "x" * 129, ""]:
            self.assertEqual(await self.refused(packets.REGISTER, name=self.new_name(), password=password),
                             ErrorCode.INVALID_PASSWORD)
        longest = f"a_{random.getrandbits(72):018x}"
        self.assertEqual((await self.request(packets.REGISTER, name=longest, password="x" * 128)).keys(), {"user_id"})

    async def test_duplicate_name_in_any_case(self):
        """A name that exists, in any letter case, gets NAME_TAKEN."""
        name = self.new_name()
        await self.request(packets.REGISTER, name=name, password="password1")
        self.assertEqual(await self.refused(packets.REGISTER, name=name, password="password2"), ErrorCode.NAME_TAKEN)
        self.assertEqual(await self.refused(packets.REGISTER, name=name.upper(), password="password2"),
                         ErrorCode.NAME_TAKEN)

    async def test_wrong_password_and_unknown_user(self):
        """A wrong password and an unknown name get the same code."""
        name = self.new_name()
        await self.request(packets.REGISTER, name=name, password="password1")
        self.assertEqual(await self.refused(packets.LOGIN, name=name, password="password2"),
                         ErrorCode.WRONG_CREDENTIALS)
        self.assertEqual(await self.refused(packets.LOGIN, name=self.new_name(), password="password1"),
                         ErrorCode.WRONG_CREDENTIALS)

    async def test_account_throttled_after_five_failures(self):
        """Five failures in the window lock the account, even against the right password; the window expires."""
        name = self.new_name()
        await self.request(packets.REGISTER, name=name, password="password1")
        for _ in range(5):
            self.assertEqual(await self.refused(packets.LOGIN, name=name, password="nope-nope"),
                             ErrorCode.WRONG_CREDENTIALS)
        self.assertEqual(await self.refused(packets.LOGIN, name=name, password="password1"),
                         ErrorCode.LOGIN_THROTTLED)
        window = await self.router.execute("PTTL", LoginThrottle.account_key(name))
        self.assertTrue(0 < window <= 60_000, window)
        await self.router.execute("DEL", LoginThrottle.account_key(name))
        await self.request(packets.LOGIN, name=name, password="password1")

    async def test_address_throttled_across_accounts(self):
        """Failures from one address over many accounts lock that address out at its limit (8 in this test)."""
        names = [self.new_name() for _ in range(3)]
        for name in names:
            await self.request(packets.REGISTER, name=name, password="password1")
        for i in range(8):
            self.assertEqual(await self.refused(packets.LOGIN, name=names[i % 3], password="wrong-wrong"),
                             ErrorCode.WRONG_CREDENTIALS)
        self.assertEqual(await self.refused(packets.LOGIN, name=names[0], password="password1"),
                         ErrorCode.LOGIN_THROTTLED)
        window = await self.router.execute("PTTL", LoginThrottle.address_key("127.0.0.1"))
        self.assertTrue(0 < window <= 600_000, window)
        await self.router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))
        await self.request(packets.LOGIN, name=names[0], password="password1")

    async def test_enter_world_refuses_bad_tokens(self):
        """Enter world refuses a forged, a garbage and a wrong-audience token with their codes."""
        name = self.new_name()
        await self.request(packets.REGISTER, name=name, password="password1")
        token = (await self.request(packets.LOGIN, name=name, password="password1"))["token"]
        header, payload, signature = token.split(".")
        flipped = "A" if signature[10] != "A" else "B"
        forged = ".".join([header, payload, signature[:10] + flipped + signature[11:]])
        self.assertEqual(await self.refused(packets.ENTER_WORLD, token=forged), ErrorCode.TOKEN_SIGNATURE)
        self.assertEqual(await self.refused(packets.ENTER_WORLD, token="not a token"), ErrorCode.TOKEN_MALFORMED)
        with open(self.private_key, "rb") as f:
            other = jwt.encode({"sub": "1", "iss": "dreamraid-session", "aud": "elsewhere", "iat": 1, "exp": 2**40,
                                "jti": "x"}, f.read(), algorithm="EdDSA")
        self.assertEqual(await self.refused(packets.ENTER_WORLD, token=other), ErrorCode.TOKEN_AUDIENCE)
