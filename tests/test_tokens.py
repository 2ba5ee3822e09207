"""Tokens: minting, verifying against an injected clock, every refusal, and the key files."""

import base64
import hashlib
import hmac
import json
import random
import re
import stat
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dreamraid.config import ConfigError
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.tokens import (
    Claims,
    ITokenIssuer,
    ITokenVerifier,
    TokenIssuer,
    TokenKeyError,
    TokenVerifier,
    create_key_pair,
)
from tests.support import make_settings

NOW = 1_750_000_000
SECRET = "s" * 32
CLAIM_NAMES = {"sub", "iss", "aud", "iat", "exp", "jti"}


def b64url(data):
    """Unpadded base64url, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value):
    """A JSON value as one base64url segment of a JWT."""
    return b64url(json.dumps(value).encode())


class TokenTestCase(SynchronousTestCase):
    """An Ed25519 key pair in a temporary directory and clocks at L{NOW}."""

    def setUp(self):
        self.keys = self.make_keys()
        self.clock = Clock()
        self.clock.advance(NOW)

    def make_keys(self):
        """A fresh key pair: C{(private path, public path)}."""
        directory = Path(self.mktemp())
        paths = directory / "token.pem", directory / "token.pub"
        create_key_pair(*paths)
        return paths

    def settings(self, keys=None, **overrides):
        """The shipped token settings using C{keys}, with C{tokens_*} overrides."""
        private, public = keys or self.keys
        return make_settings(
            tokens_private_key=str(private), tokens_public_key=str(public), **overrides
        ).tokens

    def issuer(self, clock=None, seed=1, **overrides):
        return TokenIssuer(self.settings(**overrides), clock or self.clock, random.Random(seed))

    def verifier(self, **overrides):
        return TokenVerifier(self.settings(**overrides), self.clock)

    def private_key(self):
        return serialization.load_pem_private_key(self.keys[0].read_bytes(), password=None)

    def claims(self, drop=(), **changes):
        """Valid claims for user 42 minted at L{NOW}, changed and with C{drop} left out."""
        claims = {
            "sub": "42",
            "iss": "dreamraid-session",
            "aud": "dreamraid-game",
            "iat": NOW,
            "exp": NOW + 600,
            "jti": "0" * 32,
        }
        claims.update(changes)
        for name in drop:
            del claims[name]
        return claims

    def signed(self, claims):
        """C{claims} signed with the test private key, by PyJWT rather than L{TokenIssuer}."""
        return jwt.encode(claims, self.private_key(), algorithm="EdDSA")

    def assertRefused(self, token, code, verifier=None):
        """C{verifier} (the default EdDSA one) refuses C{token} with C{code}."""
        refused = self.assertRaises(RequestRefused, (verifier or self.verifier()).verify, token)
        self.assertEqual(refused.code, code)


class InterfaceTests(TokenTestCase):
    """The issuer and the verifier provide their interfaces."""

    def test_issuer(self):
        """TokenIssuer provides ITokenIssuer."""
        self.assertTrue(verifyObject(ITokenIssuer, self.issuer()))

    def test_verifier(self):
        """TokenVerifier provides ITokenVerifier."""
        self.assertTrue(verifyObject(ITokenVerifier, self.verifier()))


class IssueTests(TokenTestCase):
    """What a minted token carries."""

    def test_verifies_with_public_key_alone(self):
        """
        An EdDSA token decodes with PyJWT given only the public key file, and
        carries exactly sub, iss, aud, iat, exp = iat + ttl and jti; its
        header names its key by the SHA-256 of the raw public key.
        """
        issued = self.issuer().issue(42)
        raw = serialization.load_pem_public_key(self.keys[1].read_bytes()).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(jwt.get_unverified_header(issued.token),
                         {"alg": "EdDSA", "typ": "JWT", "kid": hashlib.sha256(raw).hexdigest()[:16]})
        claims = jwt.decode(
            issued.token,
            self.keys[1].read_bytes(),
            algorithms=["EdDSA"],
            audience="dreamraid-game",
            # The token was minted at the test clock's NOW, not the real time.
            options={"verify_exp": False},
        )
        self.assertEqual(set(claims), CLAIM_NAMES)
        self.assertEqual(claims["sub"], "42")
        self.assertEqual(claims["iss"], "dreamraid-session")
        self.assertEqual(claims["aud"], "dreamraid-game")
        self.assertEqual(claims["iat"], NOW)
        self.assertEqual(claims["exp"], NOW + 600)
        self.assertEqual(claims["jti"], issued.jti)
        self.assertEqual(issued.expires_at, NOW + 600)

    def test_jti(self):
        """The jti is 128 bits of the injected random source as 32 hex digits, new for each token."""
        issuer = self.issuer(seed=7)
        jtis = [issuer.issue(42).jti for _ in range(3)]
        source = random.Random(7)
        self.assertEqual(jtis, [f"{source.getrandbits(128):032x}" for _ in range(3)])
        self.assertEqual(len(set(jtis)), 3)
        for jti in jtis:
            self.assertTrue(re.fullmatch("[0-9a-f]{32}", jti), jti)

    def test_whole_seconds(self):
        """iat is the clock's time truncated to whole seconds."""
        self.clock.advance(0.75)
        issued = self.issuer().issue(42)
        self.assertEqual(self.verifier().verify(issued.token).issued_at, NOW)
        self.assertEqual(issued.expires_at, NOW + 600)

    def test_ttl(self):
        """exp is iat plus the configured ttl."""
        issued = self.issuer(tokens_ttl="30").issue(42)
        self.assertEqual(issued.expires_at, NOW + 30)


class VerifyTests(TokenTestCase):
    """The verifier accepts fresh tokens of its own algorithm."""

    def test_eddsa(self):
        """A fresh EdDSA token verifies to its claims."""
        issued = self.issuer().issue(42)
        self.assertEqual(
            self.verifier().verify(issued.token), Claims(42, issued.jti, NOW, NOW + 600)
        )

    def test_hs256(self):
        """A fresh HS256 token verifies to its claims."""
        issued = self.issuer(tokens_algorithm="HS256", tokens_secret=SECRET).issue(42)
        self.assertEqual(jwt.get_unverified_header(issued.token)["alg"], "HS256")
        verifier = self.verifier(tokens_algorithm="HS256", tokens_secret=SECRET)
        self.assertEqual(verifier.verify(issued.token), Claims(42, issued.jti, NOW, NOW + 600))

    def test_hs256_needs_no_key_files(self):
        """HS256 reads neither key file: they may be missing."""
        missing = Path(self.mktemp())
        keys = missing / "token.pem", missing / "token.pub"
        settings = self.settings(keys, tokens_algorithm="HS256", tokens_secret=SECRET)
        issued = TokenIssuer(settings, self.clock, random.Random(1)).issue(5)
        self.assertEqual(TokenVerifier(settings, self.clock).verify(issued.token).user_id, 5)

    def test_verifier_needs_only_public_key(self):
        """An EdDSA verifier loads only the public key: the private key may be missing."""
        issued = self.issuer().issue(42)
        self.keys[0].unlink()
        self.assertEqual(self.verifier().verify(issued.token).user_id, 42)

    def test_valid_until_leeway_after_exp(self):
        """A token is still accepted up to just under leeway seconds after exp."""
        issued = self.issuer().issue(42)
        self.clock.advance(600 + 4)
        self.assertEqual(self.verifier().verify(issued.token).jti, issued.jti)

    def test_issued_within_leeway_in_future(self):
        """A token minted up to leeway seconds ahead of the verifier's clock is accepted."""
        ahead = Clock()
        ahead.advance(NOW + 5)
        issued = self.issuer(clock=ahead).issue(42)
        self.assertEqual(self.verifier().verify(issued.token).issued_at, NOW + 5)

    def test_leeway(self):
        """The leeway is the verifier's to choose."""
        issued = self.issuer().issue(42)
        self.clock.advance(600 + 20)
        verifier = TokenVerifier(self.settings(), self.clock, leeway=30)
        self.assertEqual(verifier.verify(issued.token).user_id, 42)

    def test_nbf_past(self):
        """A token carrying an nbf that has passed is accepted."""
        token = self.signed(self.claims(nbf=NOW - 10))
        self.assertEqual(self.verifier().verify(token).user_id, 42)

    def test_audience_list(self):
        """An aud list that includes the verifier's audience is accepted."""
        token = self.signed(self.claims(aud=["elsewhere", "dreamraid-game"]))
        self.assertEqual(self.verifier().verify(token).user_id, 42)


class RotationTests(TokenTestCase):
    """Verifiers that accept more than one key while keys are rotated."""

    def test_next_then_previous_key(self):
        """
        A rotation: every verifier first accepts the next key beside its
        own; the session then signs with the next key and keeps the old one
        as accepted.  Tokens of either key pass at each step, and a verifier
        that has not heard of the next key refuses its tokens.
        """
        old, new = self.keys, self.make_keys()
        old_token = self.issuer().issue(42).token
        new_token = TokenIssuer(self.settings(new), self.clock, random.Random(2)).issue(43).token
        before = self.verifier(tokens_other_public_keys=str(new[1]))
        after = TokenVerifier(self.settings(new, tokens_other_public_keys=str(old[1])), self.clock)
        for verifier in (before, after):
            self.assertEqual([verifier.verify(t).user_id for t in (old_token, new_token)], [42, 43])
        self.assertRefused(new_token, ErrorCode.TOKEN_SIGNATURE)

    def test_token_without_kid_is_tried_against_each_key(self):
        """A token minted before key ids (no kid) passes if any accepted key signed it."""
        other = self.make_keys()
        token = self.signed(self.claims())
        verifier = TokenVerifier(self.settings(other, tokens_other_public_keys=str(self.keys[1])), self.clock)
        self.assertEqual(verifier.verify(token).user_id, 42)

    def test_a_token_is_checked_only_against_the_key_its_kid_names(self):
        """
        A token signed with one accepted key but labelled with another's kid
        is refused: the kid picks the key, and the signature fails under it
        (trying every key would have let it through).
        """
        other = self.make_keys()
        other_kid = jwt.get_unverified_header(TokenIssuer(self.settings(other), self.clock, random.Random(1))
                                              .issue(42).token)["kid"]
        mislabelled = jwt.encode(self.claims(), self.private_key(), algorithm="EdDSA", headers={"kid": other_kid})
        verifier = self.verifier(tokens_other_public_keys=str(other[1]))
        self.assertRefused(mislabelled, ErrorCode.TOKEN_SIGNATURE, verifier)
        self.assertEqual(verifier.verify(self.signed(self.claims())).user_id, 42)  # the same, without a kid

    def test_hs256_kid_is_an_hmac_under_the_secret(self):
        """An HS256 token's kid is an HMAC under its secret, not a hash of the secret itself."""
        issued = self.issuer(tokens_algorithm="HS256", tokens_secret=SECRET).issue(42)
        self.assertEqual(jwt.get_unverified_header(issued.token)["kid"],
                         hmac.new(SECRET.encode(), b"dreamraid token key id", hashlib.sha256).hexdigest()[:16])

    def test_hs256_other_secret(self):
        """An HS256 token of a secret in other_secrets passes; such a secret needs 32 characters too."""
        issued = self.issuer(tokens_algorithm="HS256", tokens_secret="t" * 32).issue(42)
        verifier = self.verifier(tokens_algorithm="HS256", tokens_secret=SECRET, tokens_other_secrets="t" * 32)
        self.assertEqual(verifier.verify(issued.token).user_id, 42)
        with self.assertRaises(ConfigError):
            self.settings(tokens_algorithm="HS256", tokens_secret=SECRET, tokens_other_secrets="short")

    def test_unreadable_other_key_names_its_setting(self):
        """A missing file in other_public_keys stops the verifier with that setting's name."""
        with self.assertRaises(TokenKeyError) as raised:
            self.verifier(tokens_other_public_keys="/nonexistent/next.pub")
        self.assertIn("tokens.other_public_keys", str(raised.exception))


class RefusalTests(TokenTestCase):
    """Each way a token can be wrong is refused with its own code."""

    def test_expired(self):
        """A token is refused as expired once the clock reaches exp plus the leeway."""
        issued = self.issuer().issue(42)
        self.clock.advance(600 + 5)
        self.assertRefused(issued.token, ErrorCode.TOKEN_EXPIRED)

    def test_expired_allowed_for_a_resume(self):
        """Asked to allow expiry (a resume), the verifier gives an expired token's claims; its signature still counts."""
        issued = self.issuer().issue(42)
        self.clock.advance(600 + 5)
        self.assertEqual(self.verifier().verify(issued.token, allow_expired=True).user_id, 42)
        with self.assertRaises(RequestRefused):
            self.verifier().verify(issued.token[:-4] + "AAAA", allow_expired=True)

    def test_expired_by_verifier_clock(self):
        """Expiry follows the verifier's clock, not the real time."""
        token = self.signed(self.claims(iat=100, exp=700))
        self.assertRefused(token, ErrorCode.TOKEN_EXPIRED)

    def test_issued_in_future(self):
        """A token whose iat is more than leeway ahead of the verifier's clock is not yet valid."""
        ahead = Clock()
        ahead.advance(NOW + 6)
        issued = self.issuer(clock=ahead).issue(42)
        self.assertRefused(issued.token, ErrorCode.TOKEN_NOT_YET_VALID)

    def test_nbf_future(self):
        """A token whose nbf is more than leeway ahead is not yet valid."""
        token = self.signed(self.claims(nbf=NOW + 6))
        self.assertRefused(token, ErrorCode.TOKEN_NOT_YET_VALID)

    def test_wrong_audience(self):
        """A token for another audience is refused."""
        issued = self.issuer(tokens_audience="dreamraid-other").issue(42)
        self.assertRefused(issued.token, ErrorCode.TOKEN_AUDIENCE)

    def test_wrong_issuer(self):
        """A token from another issuer is refused."""
        issued = self.issuer(tokens_issuer="someone-else").issue(42)
        self.assertRefused(issued.token, ErrorCode.TOKEN_ISSUER)

    def test_tampered_payload(self):
        """A token whose payload was changed after signing fails its signature."""
        header, payload, signature = self.issuer().issue(42).token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["sub"] = "1"
        self.assertRefused(f"{header}.{b64url_json(claims)}.{signature}", ErrorCode.TOKEN_SIGNATURE)

    def test_other_key(self):
        """A token signed by another Ed25519 key fails its signature."""
        other = TokenIssuer(self.settings(self.make_keys()), self.clock, random.Random(1))
        self.assertRefused(other.issue(42).token, ErrorCode.TOKEN_SIGNATURE)

    def test_other_secret(self):
        """An HS256 token signed with another secret fails its signature."""
        issued = self.issuer(tokens_algorithm="HS256", tokens_secret="t" * 32).issue(42)
        verifier = self.verifier(tokens_algorithm="HS256", tokens_secret=SECRET)
        self.assertRefused(issued.token, ErrorCode.TOKEN_SIGNATURE, verifier)

    def test_alg_none(self):
        """An unsigned token (alg none) is refused."""
        token = f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(self.claims())}."
        self.assertRefused(token, ErrorCode.TOKEN_SIGNATURE)

    def test_algorithm_confusion(self):
        """
        An HS256 token whose HMAC secret is the public key PEM is refused by
        an EdDSA verifier.
        """
        signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json(self.claims())}"
        mac = hmac.new(self.keys[1].read_bytes(), signing_input.encode(), hashlib.sha256).digest()
        self.assertRefused(f"{signing_input}.{b64url(mac)}", ErrorCode.TOKEN_SIGNATURE)

    def test_hs256_to_eddsa_verifier(self):
        """An EdDSA verifier refuses an HS256 token."""
        issued = self.issuer(tokens_algorithm="HS256", tokens_secret=SECRET).issue(42)
        self.assertRefused(issued.token, ErrorCode.TOKEN_SIGNATURE)

    def test_eddsa_to_hs256_verifier(self):
        """An HS256 verifier refuses an EdDSA token."""
        verifier = self.verifier(tokens_algorithm="HS256", tokens_secret=SECRET)
        self.assertRefused(self.issuer().issue(42).token, ErrorCode.TOKEN_SIGNATURE, verifier)

    def test_garbage(self):
        """Strings that are not JWTs, and values that are not strings, are malformed."""
        header = b64url_json({"alg": "EdDSA", "typ": "JWT"})
        payload = b64url_json(self.claims())
        for token in [
            "",
            "garbage",
            "a.b",
            "a.b.c",
            "...",
            f"{header}.{payload}.!!!",
            f"{b64url(b'not json')}.{payload}.",
            f"{b64url_json([1, 2])}.{payload}.",
            "é.é.é",
            "\ud800",
            b"a.b.c",
            None,
        ]:
            self.assertRefused(token, ErrorCode.TOKEN_MALFORMED)

    def test_payload_not_json(self):
        """A signed token whose payload is not a JSON object is malformed."""
        signing_input = f"{b64url_json({'alg': 'EdDSA', 'typ': 'JWT'})}.{b64url(b'[42]')}"
        signature = self.private_key().sign(signing_input.encode())
        self.assertRefused(f"{signing_input}.{b64url(signature)}", ErrorCode.TOKEN_MALFORMED)

    def test_missing_claims(self):
        """A signed token lacking any required claim is malformed."""
        for name in sorted(CLAIM_NAMES):
            token = self.signed(self.claims(drop=[name]))
            self.assertRefused(token, ErrorCode.TOKEN_MALFORMED)

    def test_bad_sub(self):
        """A signed token whose sub is not a decimal user id is malformed."""
        for sub in ["alice", "", "-1", "4 2", "0x2a", "\u0664\u0662", "1" * 21, 42]:
            self.assertRefused(self.signed(self.claims(sub=sub)), ErrorCode.TOKEN_MALFORMED)

    def test_bad_times(self):
        """A signed token whose iat, exp or nbf is not a whole number is malformed."""
        for change in [
            {"iat": "now"},
            {"exp": float(NOW + 600)},
            {"exp": True},
            {"nbf": "later"},
        ]:
            self.assertRefused(self.signed(self.claims(**change)), ErrorCode.TOKEN_MALFORMED)

    def test_bad_jti(self):
        """A signed token whose jti is not a string is malformed."""
        self.assertRefused(self.signed(self.claims(jti=7)), ErrorCode.TOKEN_MALFORMED)


class KeyPairTests(SynchronousTestCase):
    """create_key_pair writes the Ed25519 key files once."""

    def setUp(self):
        directory = Path(self.mktemp())
        self.private = directory / "keys" / "deep" / "token.pem"
        self.public = directory / "other" / "token.pub"

    def test_creates(self):
        """Both files are created with their parent directories, the private one mode 0600."""
        self.assertTrue(create_key_pair(self.private, self.public))
        self.assertEqual(stat.S_IMODE(self.private.stat().st_mode), 0o600)
        private_key = serialization.load_pem_private_key(self.private.read_bytes(), password=None)
        self.assertIn(b"-----BEGIN PRIVATE KEY-----", self.private.read_bytes())
        self.assertEqual(
            self.public.read_bytes(),
            private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def test_idempotent(self):
        """A second call changes nothing and says so."""
        create_key_pair(self.private, self.public)
        before = self.private.read_bytes(), self.public.read_bytes()
        self.assertFalse(create_key_pair(self.private, self.public))
        self.assertEqual((self.private.read_bytes(), self.public.read_bytes()), before)

    def test_derives_public(self):
        """A missing public key is derived again from the private key, which is kept."""
        create_key_pair(self.private, self.public)
        before = self.private.read_bytes(), self.public.read_bytes()
        self.public.unlink()
        self.assertTrue(create_key_pair(self.private, self.public))
        self.assertEqual((self.private.read_bytes(), self.public.read_bytes()), before)

    def test_private_not_a_key(self):
        """An existing private key file that is not a key is not overwritten; the error names it."""
        self.private.parent.mkdir(parents=True)
        self.private.write_text("not a key")
        error = self.assertRaises(TokenKeyError, create_key_pair, self.private, self.public)
        self.assertIn(str(self.private), str(error))
        self.assertEqual(self.private.read_text(), "not a key")
        self.assertFalse(self.public.exists())


class KeyErrorTests(TokenTestCase):
    """Unusable keys stop construction with an error naming the file."""

    def test_missing_private_key(self):
        """An issuer whose private key file is missing raises TokenKeyError naming it."""
        self.keys[0].unlink()
        error = self.assertRaises(TokenKeyError, self.issuer)
        self.assertIn(str(self.keys[0]), str(error))
        self.assertIn("tokens.private_key", str(error))

    def test_missing_public_key(self):
        """A verifier whose public key file is missing raises TokenKeyError naming it."""
        self.keys[1].unlink()
        error = self.assertRaises(TokenKeyError, self.verifier)
        self.assertIn(str(self.keys[1]), str(error))
        self.assertIn("tokens.public_key", str(error))

    def test_not_a_key(self):
        """A key file holding something else raises TokenKeyError naming it."""
        self.keys[0].write_text("garbage")
        error = self.assertRaises(TokenKeyError, self.issuer)
        self.assertIn(str(self.keys[0]), str(error))

    def test_keys_swapped(self):
        """A public key where the private one belongs, or the reverse, is refused."""
        settings = self.settings(tuple(reversed(self.keys)))
        self.assertRaises(TokenKeyError, TokenIssuer, settings, self.clock, random.Random(1))
        self.assertRaises(TokenKeyError, TokenVerifier, settings, self.clock)

    def test_is_config_error(self):
        """TokenKeyError is a ConfigError, so start-up stops as for any bad setting."""
        self.assertTrue(issubclass(TokenKeyError, ConfigError))
