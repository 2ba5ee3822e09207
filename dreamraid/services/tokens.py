"""
JWT tokens: minted by the session server, verified by game servers and the
session server.

A token names a user (C{sub}), who minted it (C{iss}), whom it is for
(C{aud}), when it was minted and when it expires (C{iat}, C{exp}, whole
seconds of the injected clock) and a random id (C{jti}) that lets the session
server tell one login from the next.  It is signed with EdDSA (Ed25519: game
servers hold only the public key) or with HS256 and a shared secret, as
C{[tokens] algorithm} says; a verifier accepts that one algorithm and no
other.

Each token's header names its key (C{kid}: the first 16 hex digits of the
SHA-256 of the raw public key, or of an HMAC under the secret), so a
verifier can hold more than one (C{other_public_keys}, C{other_secrets})
while keys are rotated; a token without a C{kid} is tried against each.
"""

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import NamedTuple

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import HMACAlgorithm
from zope.interface import Interface, implementer

from dreamraid.config import ConfigError
from dreamraid.errors import ErrorCode, RequestRefused

# A user id in C{sub}: ASCII digits, at most the 20 of an unsigned BIGINT.
_USER_ID = re.compile(r"[0-9]{1,20}")

# PyJWT checks the signature, the required claims, the issuer and the
# audience; the times are checked against the injected clock, not the wall clock.
_DECODE_OPTIONS = {
    "require": ["sub", "iss", "aud", "iat", "exp", "jti"],
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
}


class TokenKeyError(ConfigError):
    """A token key file or secret cannot be read or is not a usable key; the message names it."""


class IssuedToken(NamedTuple):
    """A freshly minted token, its id and when it expires (seconds of the clock)."""

    token: str
    jti: str
    expires_at: int


class Claims(NamedTuple):
    """What a verified token says."""

    user_id: int
    jti: str
    issued_at: int
    expires_at: int


class ITokenIssuer(Interface):
    """Mints tokens for users who have logged in."""

    def issue(user_id):
        """A signed token naming C{user_id}: an L{IssuedToken}."""


class ITokenVerifier(Interface):
    """Checks tokens presented by clients."""

    def verify(token, allow_expired=False):
        """
        The L{Claims} of C{token}; with C{allow_expired}, also of one whose
        expiry has passed (a resume, whose credential is the live session
        the token names).

        @raise RequestRefused: with a C{TOKEN_*} L{ErrorCode} saying why the
            token is refused.
        """


@implementer(ITokenIssuer)
class TokenIssuer:
    """Signs tokens with the private key or the secret of L{TokenSettings}."""

    def __init__(self, settings, clock, random):
        """
        @param settings: a L{dreamraid.config.TokenSettings}.
        @param clock: an C{IReactorTime}; C{iat} is its C{seconds()}.
        @param random: a C{random.Random}-like source of the C{jti}
            (C{random.SystemRandom()} in production).
        @raise TokenKeyError: if the private key or the secret is unusable.
        """
        self._settings = settings
        self._clock = clock
        self._random = random
        if settings.algorithm == "EdDSA":
            self._key = _load_private_key(settings.private_key)
            self._kid = key_id(self._key.public_key())
        else:
            self._key = _hmac_secret(settings.secret)
            self._kid = key_id(self._key)

    def issue(self, user_id):
        issued_at = int(self._clock.seconds())
        expires_at = issued_at + self._settings.ttl
        jti = f"{self._random.getrandbits(128):032x}"
        claims = {
            "sub": str(user_id),
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "iat": issued_at,
            "exp": expires_at,
            "jti": jti,
        }
        token = jwt.encode(claims, self._key, algorithm=self._settings.algorithm, headers={"kid": self._kid})
        return IssuedToken(token, jti, expires_at)


@implementer(ITokenVerifier)
class TokenVerifier:
    """Checks tokens against the public keys or the secrets of L{TokenSettings}."""

    def __init__(self, settings, clock, leeway=5):
        """
        @param settings: a L{dreamraid.config.TokenSettings}.
        @param clock: an C{IReactorTime} that C{exp}, C{iat} and C{nbf} are
            checked against.
        @param leeway: seconds of clock skew forgiven either way.
        @raise TokenKeyError: if a public key or a secret is unusable.
        """
        self._settings = settings
        self._clock = clock
        self._leeway = leeway
        if settings.algorithm == "EdDSA":
            keys = [_load_public_key(settings.public_key)]
            keys += [_load_public_key(path, "other_public_keys") for path in settings.other_public_keys]
        else:
            keys = [_hmac_secret(secret) for secret in (settings.secret, *settings.other_secrets)]
        self._keys = {key_id(key): key for key in keys}  # the configured one first

    def verify(self, token, allow_expired=False):
        # A JWT is ASCII; anything else would make PyJWT fail to encode it.
        if not isinstance(token, str) or not token.isascii():
            raise RequestRefused(ErrorCode.TOKEN_MALFORMED)
        claims = self._decode(token)
        issued_at, expires_at = claims["iat"], claims["exp"]
        not_before = claims.get("nbf", issued_at)
        # type() rather than isinstance(): JSON true is not a time.
        if any(type(t) is not int for t in (issued_at, expires_at, not_before)):
            raise RequestRefused(ErrorCode.TOKEN_MALFORMED)
        if not _USER_ID.fullmatch(claims["sub"]):
            raise RequestRefused(ErrorCode.TOKEN_MALFORMED)
        now = self._clock.seconds()
        if expires_at + self._leeway <= now and not allow_expired:
            raise RequestRefused(ErrorCode.TOKEN_EXPIRED)
        if max(issued_at, not_before) > now + self._leeway:
            raise RequestRefused(ErrorCode.TOKEN_NOT_YET_VALID)
        return Claims(int(claims["sub"]), claims["jti"], issued_at, expires_at)

    def _decode(self, token):
        """C{token}'s claims, checked against the key its C{kid} names, or each key for a token without one."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise RequestRefused(ErrorCode.TOKEN_MALFORMED) from None
        if kid is None:
            keys = list(self._keys.values())
        elif type(kid) is str and kid in self._keys:
            keys = [self._keys[kid]]
        else:
            raise RequestRefused(ErrorCode.TOKEN_SIGNATURE, "the token's key (kid) is not one this server accepts")
        for key in keys:
            try:
                return jwt.decode(token, key, algorithms=[self._settings.algorithm],
                                  audience=self._settings.audience, issuer=self._settings.issuer,
                                  options=_DECODE_OPTIONS)
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAlgorithmError:
                break
            except jwt.InvalidAudienceError:
                raise RequestRefused(ErrorCode.TOKEN_AUDIENCE) from None
            except jwt.InvalidIssuerError:
                raise RequestRefused(ErrorCode.TOKEN_ISSUER) from None
            except jwt.InvalidTokenError:
                raise RequestRefused(ErrorCode.TOKEN_MALFORMED) from None
        raise RequestRefused(ErrorCode.TOKEN_SIGNATURE)


def key_id(key):
    """
    The C{kid} of an Ed25519 public key or an HS256 secret (bytes): the
    first 16 hex digits of the SHA-256 of the raw public key, or of an
    HMAC-SHA256 under the secret (so the id says nothing of the secret).
    """
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16]
    return hmac.new(key, b"dreamraid token key id", hashlib.sha256).hexdigest()[:16]


def create_key_pair(private_path, public_path):
    """
    Create an Ed25519 key pair as PEM files, unless the private key exists:
    the private key as PKCS8 (mode 0600), the public key as
    SubjectPublicKeyInfo, replacing any public key file already there.  If
    only the public key is missing, derive it from the private key.  Missing
    parent directories are created.

    @return: C{True} if a file was created, C{False} if both existed.
    @raise TokenKeyError: if an existing private key file is not an Ed25519 key.
    @raise OSError: if a file cannot be written.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.exists():
        if public_path.exists():
            return False
        private_key = _load_private_key(private_path)
    else:
        private_key = Ed25519PrivateKey.generate()
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(
                private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return True


def _read_key_file(setting, path):
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TokenKeyError(f"setting tokens.{setting}: cannot read {path}: {e.strerror or e}") from None


def _load_private_key(path):
    """The Ed25519 private key in the PEM file at C{path}."""
    try:
        key = serialization.load_pem_private_key(_read_key_file("private_key", path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise TokenKeyError(
            f"setting tokens.private_key: {path} is not an unencrypted Ed25519 private key in PEM"
        )
    return key


def _load_public_key(path, setting="public_key"):
    """The Ed25519 public key in the PEM file at C{path}, which C{setting} names."""
    try:
        key = serialization.load_pem_public_key(_read_key_file(setting, path))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise TokenKeyError(f"setting tokens.{setting}: {path} is not an Ed25519 public key in PEM")
    return key


def _hmac_secret(secret):
    """C{secret} as the HS256 key, refused now rather than at every token."""
    try:
        return HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError as e:
        raise TokenKeyError(f"setting tokens.secret: {e}") from None
