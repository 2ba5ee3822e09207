"""
The wire schema of dreamraid: TCP frames, every message, the error codes and
the UDP datagram layout, defined once with C{construct}.

A TCP frame is::

    u16 length | u16 message id | u32 request id | body

all little-endian, where C{length} counts the bytes after itself.  A reply
echoes its request's id; a push from the server carries request id 0.  Strings
are a u16 byte count followed by UTF-8.

A UDP datagram is::

    u16 message id | u32 raid id | u8 member | u32 sequence | body | 16-byte MAC

where the MAC is keyed BLAKE2b-128 of everything before it, under the key of
the member the datagram is from or to (each member of a raid has its own).

Construct is the schema, and the reference codec: every message also gets a
codec generated from its construct fields (one C{struct} call per run of
fixed-size fields, strings sliced straight from the buffer), because compiled
construct is about twenty times slower than hand-written C{struct} code on
small frames.  A message with a field the generator does not know falls back
to compiled construct.  The tests check that both codecs agree on every
message.  C{docs/protocol.md} is generated from this module
(C{dreamraid-protocol-doc}).
"""

import enum
import hashlib
import hmac
import struct
from typing import NamedTuple

from construct import (
    ConstructError,
    Flag,
    Float32l,
    FormatField,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    Prefixed,
    PrefixedArray,
    StringEncoded,
    Struct,
    Terminated,
)

from dreamraid.errors import ERROR_TEXT, ErrorCode

PROTOCOL_VERSION = 1

LENGTH_PREFIX = Int16ul
FRAME_HEADER = Struct("message_id" / Int16ul, "request_id" / Int32ul)
FRAME_HEADER_SIZE = FRAME_HEADER.sizeof()
MAX_FRAME_LENGTH = 0xFFFF

DATAGRAM_HEADER = Struct(
    "message_id" / Int16ul, "raid_id" / Int32ul, "member" / Int8ul, "sequence" / Int32ul
)
DATAGRAM_HEADER_SIZE = DATAGRAM_HEADER.sizeof()
MAC_SIZE = 16
MAX_DATAGRAM_SIZE = 1200

String = PascalString(Int16ul, "utf8")


class CodecError(Exception):
    """Bytes that are not a valid frame or datagram, or a body that cannot be encoded."""

    code = ErrorCode.MALFORMED_FRAME

    def __init__(self, text, code=None, request_id=0):
        super().__init__(text)
        if code is not None:
            self.code = code
        self.request_id = request_id


class UnknownMessage(CodecError):
    """A frame whose message id is not in the registry."""

    code = ErrorCode.UNKNOWN_MESSAGE


class MalformedBody(CodecError):
    """A frame whose body does not decode as its message's schema."""

    code = ErrorCode.MALFORMED_BODY


class Frame(NamedTuple):
    """A decoded TCP frame."""

    message: "Message"
    request_id: int
    body: dict


class Datagram(NamedTuple):
    """A decoded, authenticated UDP datagram."""

    message: "Message"
    raid_id: int
    member: int
    sequence: int
    body: dict


# -- the fast codec, generated from construct fields ----------------------------

def _little_endian_char(field):
    """The struct char of a little-endian (or one-byte) FormatField, else None."""
    if not isinstance(field, FormatField):
        return None
    order, char = field.fmtstr[0], field.fmtstr[1:]
    if order in "<=" or struct.calcsize(field.fmtstr) == 1:
        return char
    return None


# Arrays made by L{records}: construct object id -> (count field, element Struct).
_RECORDS = {}


def records(count_field, element):
    """
    A count-prefixed array of fixed-size records (C{PrefixedArray} of a Struct
    of fixed fields), which the fast codec packs with one C{struct} per record.
    """
    array = PrefixedArray(count_field, element)
    _RECORDS[id(array)] = (count_field, element)
    return array


def _classify(sub):
    """C{(kind, struct char, element)} of one construct field, or None if unsupported."""
    char = _little_endian_char(sub)
    if char is not None:
        return "fixed", char, None
    if isinstance(sub, type(Flag)):
        return "fixed", "?", None
    if id(sub) in _RECORDS:
        count_field, element = _RECORDS[id(sub)]
        chars = [_classify(field.subcon) for field in element.subcons]
        if any(c is None or c[0] != "fixed" for c in chars):
            return None
        return "array", _little_endian_char(count_field), (
            "".join(c[1] for c in chars), tuple(field.name for field in element.subcons))
    prefixed = sub.subcon if isinstance(sub, StringEncoded) else sub
    if not (isinstance(prefixed, Prefixed) and prefixed.subcon is GreedyBytes):
        return None
    char = _little_endian_char(prefixed.lengthfield)
    if char is None:
        return None
    if isinstance(sub, StringEncoded):
        return ("str", char, None) if sub.encoding in ("utf8", "utf-8") else None
    return "bytes", char, None


def _header_chars(header):
    """The struct chars of a construct header of little-endian integers."""
    return "".join(_little_endian_char(sub.subcon) for sub in header.subcons)


_FRAME_HEADER_CHARS = _header_chars(FRAME_HEADER)
_DATAGRAM_HEADER_CHARS = _header_chars(DATAGRAM_HEADER)
_LENGTH_CHAR = _little_endian_char(LENGTH_PREFIX)


def _fields(body):
    """C{[(name, kind, char, element)]} of a body Struct, or None if a field is unsupported."""
    fields = []
    for sub in body.subcons:
        if sub is Terminated:
            continue
        kind = _classify(sub.subcon) if sub.name else None
        if kind is None:
            return None
        fields.append((sub.name, *kind))
    return fields


def _segments(fields):
    """
    Runs of fixed-size values, each ended by a variable-size field: a run is
    C{(chars, [("field" | "length", index)])}, a variable field its index.
    """
    segments, chars, values = [], "", []
    for i, (_, kind, char, _) in enumerate(fields):
        chars += char
        values.append(("field" if kind == "fixed" else "length", i))
        if kind != "fixed":
            segments += [(chars, values), i]
            chars, values = "", []
    if chars:
        segments.append((chars, values))
    return segments


def _as_bytes(value):
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


class _Short(Exception):
    """A length prefix points past the end of the buffer."""


class _Trailing(Exception):
    """Bytes are left after the last field."""


_ENCODE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, OverflowError, struct.error, ConstructError)
_DECODE_ERRORS = (_Short, _Trailing, ValueError, struct.error, ConstructError)


def _compile(source, structs):
    namespace = dict(
        structs,
        _as_bytes=_as_bytes,
        _Short=_Short,
        _Trailing=_Trailing,
        _CodecError=CodecError,
        _ENCODE_ERRORS=_ENCODE_ERRORS,
    )
    exec(compile(source, "<dreamraid.protocols.packets generated>", "exec"), namespace)
    return namespace


def _encoder(name, fields, params, head_chars, head_values, length_prefixed):
    """C{encode(*params, body) -> bytes}: header values and body packed in as few calls as can be."""
    segments = _segments(fields)
    if not segments or not isinstance(segments[0], tuple):
        segments.insert(0, ("", []))
    lines = [f"def encode({', '.join(params)}, body):", "  try:"]
    structs, parts, fixed = {}, [], 0
    for i, (name, kind, _, element) in enumerate(fields):
        if kind == "str":
            lines.append(f"    v{i} = body[{name!r}].encode('utf-8')")
        elif kind == "bytes":
            lines.append(f"    v{i} = _as_bytes(body[{name!r}])")
        elif kind == "array":
            chars, names = element
            structs[f"_r{i}"] = struct.Struct("<" + chars)
            packed = ", ".join(f"e[{n!r}]" for n in names)
            lines.append(f"    r{i} = body[{name!r}]")
            lines.append(f"    v{i} = b''.join([_r{i}.pack({packed}) for e in r{i}])")
    for k, segment in enumerate(segments):
        if isinstance(segment, int):
            parts.append(f"v{segment}")
            continue
        chars, values = segment
        args = [f"body[{fields[i][0]!r}]" if what == "field"
                else f"len(r{i})" if fields[i][1] == "array" else f"len(v{i})" for what, i in values]
        if k == 0:
            chars = (_LENGTH_CHAR if length_prefixed else "") + head_chars + chars
            args = (["_n"] if length_prefixed else []) + head_values + args
        structs[f"_s{k}"] = packer = struct.Struct("<" + chars)
        fixed += packer.size
        parts.append(f"_s{k}.pack({', '.join(args)})")
    if length_prefixed:
        sizes = [str(fixed - LENGTH_PREFIX.sizeof())]
        sizes += [f"len(v{s})" for s in segments if isinstance(s, int)]
        lines.append(f"    _n = {' + '.join(sizes)}")
    lines.append(f"    return {' + '.join(parts)}")
    lines.append("  except _ENCODE_ERRORS as e:")
    lines.append(f"    raise _CodecError(f'cannot encode {name}: {{e!r}}') from None")
    return _compile("\n".join(lines) + "\n", structs)["encode"]


def _decoder(fields):
    """C{decode(buf, pos) -> dict} of the body that starts at C{pos} and ends with C{buf}."""
    lines, structs = ["def decode(buf, pos):"], {}
    for k, segment in enumerate(_segments(fields)):
        if isinstance(segment, int) and fields[segment][1] == "array":
            i = segment
            chars, names = fields[i][3]
            structs[f"_r{i}"] = record = struct.Struct("<" + chars)
            lines += [
                f"    _e = pos + l{i} * {record.size}",
                "    if _e > len(buf): raise _Short",
                f"    x{i} = [dict(zip({names!r}, t)) for t in _r{i}.iter_unpack(buf[pos:_e])]",
                "    pos = _e",
            ]
            continue
        if isinstance(segment, int):
            i = segment
            tail = ".decode('utf-8')" if fields[i][1] == "str" else ""
            lines += [
                f"    _e = pos + l{i}",
                "    if _e > len(buf): raise _Short",
                f"    x{i} = buf[pos:_e]{tail}",
                "    pos = _e",
            ]
            continue
        chars, values = segment
        structs[f"_u{k}"] = unpacker = struct.Struct("<" + chars)
        targets = [f"{'x' if what == 'field' else 'l'}{i}" for what, i in values]
        lines += [f"    {', '.join(targets)}, = _u{k}.unpack_from(buf, pos)", f"    pos += {unpacker.size}"]
    lines.append("    if pos != len(buf): raise _Trailing")
    lines.append("    return {" + ", ".join(f"{f[0]!r}: x{i}" for i, f in enumerate(fields)) + "}")
    return _compile("\n".join(lines) + "\n", structs)["decode"]


# -- messages -------------------------------------------------------------------


class Sender(enum.Enum):
    """Who may send a message."""

    CLIENT = "client"
    SERVER = "server"
    BOTH = "both"


class Message:
    """
    One message: its id, name, who sends it, its body schema and codecs.

    C{encode(request_id, body)} returns a whole frame, length prefix included
    (a datagram message's is C{encode(raid_id, member, sequence, body)}, used
    by L{seal_datagram}); it raises L{CodecError} if the body does not fit.
    """

    def __init__(self, message_id, name, sender, doc, fields, datagram=False):
        self.id, self.name, self.sender, self.doc = message_id, name, sender, doc
        self.schema = Struct(*fields, Terminated)
        self._construct = self.schema.compile()
        self.fields = _fields(self.schema)
        self.fast = self.fields is not None
        if datagram:
            params, chars = ["raid_id", "member", "sequence"], _DATAGRAM_HEADER_CHARS
        else:
            params, chars = ["request_id"], _FRAME_HEADER_CHARS
        if self.fast:
            self.encode = _encoder(name, self.fields, params, chars, [str(message_id), *params], not datagram)
            self._decode = _decoder(self.fields)
        else:
            head = struct.Struct("<" + ("" if datagram else _LENGTH_CHAR) + chars)

            def encode(*args):
                *values, body = args
                try:
                    data = self._construct.build(body)
                    length = () if datagram else (FRAME_HEADER_SIZE + len(data),)
                    return head.pack(*length, message_id, *values) + data
                except _ENCODE_ERRORS as e:
                    raise CodecError(f"cannot encode {name}: {e!r}") from None

            self.encode = encode
            self._decode = lambda buf, pos: self.construct_decode(buf, pos)

    def __repr__(self):
        return f"<Message {self.id} {self.name}>"

    def construct_encode(self, body):
        """The body encoded by construct itself: the reference the fast codec is tested against."""
        return self._construct.build(body)

    def construct_decode(self, buf, pos):
        """The body decoded by construct itself, as a plain dict."""
        parsed = self._construct.parse(buf[pos:])
        return {name: parsed[name] for name in (s.name for s in self.schema.subcons) if name}


MESSAGES = {}
MESSAGES_BY_NAME = {}
DATAGRAMS = {}
DATAGRAMS_BY_NAME = {}


def _register(registry, by_name, message):
    if message.id in registry or message.name in by_name or not 0 < message.id <= 0xFFFF:
        raise ValueError(f"message {message.id} {message.name} is registered twice or out of range")
    registry[message.id] = by_name[message.name] = message
    return message


def message(message_id, name, sender, doc, *fields):
    """Register a TCP message."""
    return _register(MESSAGES, MESSAGES_BY_NAME, Message(message_id, name, sender, doc, fields))


def datagram(message_id, name, sender, doc, *fields):
    """Register a UDP datagram message."""
    return _register(
        DATAGRAMS, DATAGRAMS_BY_NAME, Message(message_id, name, sender, doc, fields, datagram=True)
    )


# -- frames -----------------------------------------------------------------------

_unpack_header = struct.Struct("<" + _FRAME_HEADER_CHARS).unpack_from
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__
_MESSAGE_OF = MESSAGES
_DATAGRAM_HEADER = struct.Struct("<" + _DATAGRAM_HEADER_CHARS)


def decode_payload(payload):
    """
    Decode a frame whose length prefix was already stripped.

    @raise CodecError: with C{code} and the frame's C{request_id} where known.
    """
    try:
        message_id, request_id = _unpack_header(payload)
    except struct.error:
        raise CodecError("frame shorter than its header", ErrorCode.MALFORMED_FRAME) from None
    found = _MESSAGE_OF.get(message_id)
    if found is None:
        raise UnknownMessage(f"unknown message id {message_id}", request_id=request_id)
    try:
        return _new_tuple(Frame, (found, request_id, found._decode(payload, FRAME_HEADER_SIZE)))
    except _DECODE_ERRORS as e:
        raise MalformedBody(
            f"{found.name}: malformed body ({type(e).__name__})", request_id=request_id
        ) from None


def decode_frame(data):
    """Decode one whole frame, length prefix included."""
    if len(data) < LENGTH_PREFIX.sizeof() or LENGTH_PREFIX.parse(data[:2]) != len(data) - 2:
        raise CodecError("length prefix does not match the frame", ErrorCode.MALFORMED_FRAME)
    return decode_payload(data[2:])


def error_frame(request_id, code, detail=None):
    """The frame reporting C{code} for C{request_id}."""
    return ERROR.encode(request_id, {"code": int(code), "detail": detail or ERROR_TEXT[code]})


def _mac(key, data):
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def seal_datagram(key, message, raid_id, member, sequence, body):
    """A datagram with its MAC under C{key}.  @raise CodecError: if C{body} does not fit."""
    data = message.encode(raid_id, member, sequence, body)
    if len(data) + MAC_SIZE > MAX_DATAGRAM_SIZE:
        raise CodecError(f"{message.name}: datagram over {MAX_DATAGRAM_SIZE} bytes")
    return data + _mac(key, data)


def datagram_header(data):
    """C{(message_id, raid_id, member, sequence)} of an unverified datagram, to find its key."""
    if not DATAGRAM_HEADER_SIZE + MAC_SIZE <= len(data) <= MAX_DATAGRAM_SIZE:
        raise CodecError("datagram size out of range", ErrorCode.MALFORMED_FRAME)
    return _DATAGRAM_HEADER.unpack_from(data)


def verify_datagram(key, data):
    """
    Check a datagram's size and its MAC under C{key}, before anything else
    is spent on it.

    @raise CodecError: if it is malformed or its MAC does not verify.
    """
    if not DATAGRAM_HEADER_SIZE + MAC_SIZE <= len(data) <= MAX_DATAGRAM_SIZE:
        raise CodecError("datagram size out of range", ErrorCode.MALFORMED_FRAME)
    if not hmac.compare_digest(data[-MAC_SIZE:], _mac(key, data[:-MAC_SIZE])):
        raise CodecError("datagram MAC does not verify", ErrorCode.MALFORMED_FRAME)


def decode_datagram(data):
    """
    Decode a datagram L{verify_datagram} passed.

    @raise CodecError: if its message is unknown or its body malformed.
    """
    message_id, raid_id, member, sequence = datagram_header(data)
    found = DATAGRAMS.get(message_id)
    if found is None:
        raise UnknownMessage(f"unknown datagram id {message_id}")
    try:
        body = found._decode(data[:-MAC_SIZE], DATAGRAM_HEADER_SIZE)
    except _DECODE_ERRORS as e:
        raise MalformedBody(f"{found.name}: malformed body ({type(e).__name__})") from None
    return Datagram(found, raid_id, member, sequence, body)


def open_datagram(key, data):
    """
    Verify and decode a datagram.

    @raise CodecError: if it is malformed, its MAC does not verify under
        C{key}, or its message is unknown.
    """
    verify_datagram(key, data)
    return decode_datagram(data)


# -- the registry: every message of the protocol -----------------------------------

ERROR = message(
    1, "error", Sender.SERVER,
    "The reply to a request that failed, or (request id 0) a push just before the "
    "server closes the connection, saying why.",
    "code" / Int16ul, "detail" / String,
)
PING = message(
    2, "ping", Sender.BOTH,
    "A liveness probe. The server sends one as a push (request id 0) to a connection it has "
    "not heard from for a ping interval; the client answers with a pong carrying the same "
    "nonce and request id 0. A client may ping too (with a request id not 0) and gets a pong reply.",
    "nonce" / Int32ul,
)
PONG = message(
    3, "pong", Sender.BOTH,
    "The answer to a ping, echoing its nonce: a server's reply to a client's ping carries the ping's "
    "request id; a client's answer to a server's ping push carries request id 0 and is not answered.",
    "nonce" / Int32ul,
)
HELLO = message(
    4, "hello", Sender.CLIENT,
    "Optional first request: the client names itself and its protocol version.",
    "protocol_version" / Int16ul, "client" / String,
)
WELCOME = message(
    5, "welcome", Sender.SERVER,
    "The reply to hello: the server's protocol version and connection limits.",
    "protocol_version" / Int16ul, "server" / String,
    "ping_interval_ms" / Int32ul, "max_frame_size" / Int16ul,
)

# -- the session server ----------------------------------------------------------

REGISTER = message(
    100, "register", Sender.CLIENT,
    "Create an account. The name is 3 to 20 of A-Z, a-z, 0-9 and _ (unique regardless of "
    "letter case); the password 8 to 128 characters. Errors: invalid_name, invalid_password, "
    "register_throttled (the address created [session] registrations_per_address accounts in the "
    "window), name_taken, unavailable.",
    "name" / String, "password" / String,
)
REGISTERED = message(101, "registered", Sender.SERVER, "The reply to register: the new user's id.",
                     "user_id" / Int64ul)
LOGIN = message(
    102, "login", Sender.CLIENT,
    "Log in; the reply carries a token (a JWT) for enter_world and the game server, and a refresh "
    "token for refresh. Errors: invalid_name, wrong_credentials, login_throttled, unavailable.",
    "name" / String, "password" / String,
)
LOGGED_IN = message(
    103, "logged_in", Sender.SERVER,
    "The reply to login and to refresh: the user's id, the token (a JWT) and when it expires (Unix "
    "seconds), and a refresh token (43 characters of URL-safe base64: 256 random bits) and when it "
    "expires. Keep the refresh token secret: it gets new tokens without the password until it "
    "expires, is used, or its login is revoked or logged out.",
    "user_id" / Int64ul, "token" / String, "expires_at" / Int64ul,
    "refresh_token" / String, "refresh_expires_at" / Int64ul,
)
ENTER_WORLD = message(
    104, "enter_world", Sender.CLIENT,
    "Load the token's user into the live store and make the token its live session; only "
    "then does a game server accept the token. Errors: the token_* codes, wrong_credentials "
    "(the user is gone), unavailable.",
    "token" / String,
)
WORLD_ENTERED = message(
    105, "world_entered", Sender.SERVER,
    "The reply to enter_world: the game server to connect to with the same token.",
    "user_id" / Int64ul, "host" / String, "port" / Int16ul,
)

REFRESH = message(
    106, "refresh", Sender.CLIENT,
    "Get a new token without the password (after the old one expired, e.g. to enter_world again): "
    "the reply is logged_in, with a new token and a new refresh token. The refresh token sent is "
    "spent: each works once. Sending one that was used already (a copy, or a retry whose reply was "
    "lost) revokes every refresh token of its login, the newest included, so whoever holds one "
    "must log in with the password again. Errors: refresh_refused (unknown, expired, used or "
    "revoked: log in with the password), unavailable (nothing was spent if MySQL was not reached).",
    "refresh_token" / String,
)
REVOKE = message(
    107, "revoke", Sender.CLIENT,
    "End a login's refresh tokens (what the client library sends at logout): every refresh token "
    "of the login this one belongs to stops working. The reply is revoked whether or not the "
    "token was known, expired or revoked already (it tells nothing about the token). Tokens issued "
    "already stay good until they expire. Errors: unavailable.",
    "refresh_token" / String,
)
REVOKED = message(108, "revoked", Sender.SERVER, "The reply to revoke.")

# -- the game server -------------------------------------------------------------

SLOT_ITEM = Struct("tab" / Int8ul, "slot" / Int16ul, "item_code" / Int32ul, "enhancement" / Int8ul,
                   "count" / Int32ul)

AUTHENTICATE = message(
    200, "authenticate", Sender.CLIENT,
    "The first request on a game server: the token from login, after enter_world made it the "
    "user's live session. Errors: the token_* codes, session_not_live, already_authenticated, "
    "unavailable. A refused token (any error but already_authenticated and unavailable) closes "
    "the connection once the error is sent, and no request sent after it is served (a ping, "
    "hello or game_tables already read while Redis checked the session may still be answered); a connection "
    "that has not authenticated within auth_timeout is closed too. The newest authentication "
    "of a user wins, on any game server and also with the same token: the older connection "
    "gets an error push logged_in_elsewhere and is closed, and the newer one keeps the session "
    "(and the party, ticket and raid place). Requests that change who the connection is or "
    "where its player belongs (authenticate, authenticate_handoff, resume, logout, create_party, "
    "join_party, leave_party, kick_member, queue_raid, cancel_queue) are served one at a time "
    "per connection, in the order sent, however many are pipelined; other requests are served "
    "as they arrive, except that one needing authentication sent behind a pending "
    "authenticate waits for it.",
    "token" / String,
)
AUTHENTICATED = message(
    201, "authenticated", Sender.SERVER, "The reply to authenticate: who the connection is.",
    "user_id" / Int64ul, "name" / String, "level" / Int8ul, "exp" / Int32ul,
)
LOGOUT = message(
    202, "logout", Sender.CLIENT,
    "End the live session; the user's data is written back to MySQL and the connection closed "
    "after the reply.",
)
LOGGED_OUT = message(203, "logged_out", Sender.SERVER, "The reply to logout.")
RESUME = message(
    206, "resume", Sender.CLIENT,
    "Instead of authenticate, after a connection dropped without a logout: the player was kept "
    "away for [game] resume_grace (session, presence, party, queue ticket and raid place), and a "
    "resume on any game server within it takes the player over again (a connection of theirs "
    "still open, half-open included, gets logged_in_elsewhere and is closed; on another game "
    "server the player is let go without leaving). The credential is the live session: the login "
    "token (token; user_id and ticket empty or 0; its signature is checked but not its expiry, "
    "as the live session it names is the credential), or, after a raid handoff made the handoff "
    "ticket the live session, user_id and that ticket (token empty). The reply is resumed: what "
    "was kept, as it is now (not a replay of the pushes missed). A player in a raid is then sent "
    "a raid_found push again with a new handoff ticket and its UDP key (then, if the raid is "
    "fighting, a raid_fight as the fight is now): the client moves to the "
    "raid's host if it is not there, and greets the UDP channel again; a connection that heard "
    "the raid's raid_found already (a resume racing the raid's forming) is not sent it twice. A "
    "raid that is over (its "
    "players being paid) gives no place: the reply names it with ms_left 0, no raid_found follows, "
    "and its raid_result comes as to every player. A raid_result told while the player was away "
    "(the raid ended meanwhile) is pushed once the player resumes, here or on another game server. "
    "Pushes never come before the resumed reply (nor before authenticated). The party's other members "
    "get party_changed with reason back. Errors: resume_expired (the grace ran out, or the session "
    "ended: log in and enter the world again; the connection is closed), the token_* codes, "
    "already_authenticated, unavailable, shutting_down (the server is stopping: resume on another).",
    "token" / String, "user_id" / Int64ul, "ticket" / String,
)
RESUMED = message(
    207, "resumed", Sender.SERVER,
    "The reply to resume: who the connection is (as authenticated), and what was kept: the party's "
    "code ('' for none), the level group of the ticket waiting (0 for none), and the raid the "
    "player is in ('' for none) with the boss's HP, the milliseconds left of its fight (0 while it "
    "waits for its players, or once over) and the player's own score so far (from the raid's "
    "host, or its last checkpoint at most a second old when hosted elsewhere).",
    "user_id" / Int64ul, "name" / String, "level" / Int8ul, "exp" / Int32ul,
    "party_code" / String, "queued_group" / Int8ul,
    "raid_id" / String, "boss_hp" / Int32ul, "ms_left" / Int32ul, "score" / Int32ul,
)

LEVEL_EXP = Struct("level" / Int16ul, "exp" / Int32ul)
ENHANCE_CHANCE = Struct("enhancement" / Int16ul, "percent" / Int8ul)
MONSTER = Struct("monster" / Int8ul, "exp" / Int32ul)
ITEM_KIND = Struct("item_code" / Int32ul, "tab" / Int8ul, "stack" / Int32ul)

GAME_TABLES = message(
    204, "game_tables", Sender.CLIENT,
    "The game tables this server plays by (its conf/tables.json), so a client need not hard-code them.",
)
TABLES = message(
    205, "tables", Sender.SERVER,
    "The reply to game_tables. Levels run from 1 to max_level; exp is cumulative and a player at "
    "level L advances while exp >= the exp_to_advance entry of L (one entry for each level below "
    "max_level, in level order). An enhancement at level E succeeds with the percent of E's "
    "enhance_chances entry (one for each level below max_enhancement, which cannot be enhanced). "
    "slots is the number of slots in each tab (slot numbers 0 to slots - 1); hunt_cooldown_ms the "
    "shortest time between two hunts; monsters the kinds hunt takes with the exp each grants; "
    "raid_exp_per_score the exp a cleared raid pays for each point of the player's score. items "
    "lists every item code with its tab (0 equipment, 1 consumables, 2 materials) and how many "
    "stack in one slot (always 1 for equipment); item_names holds their names in the same order, "
    "separated by single line feeds (a name is never empty and never holds one).",
    "max_level" / Int16ul, "exp_to_advance" / records(Int16ul, LEVEL_EXP),
    "max_enhancement" / Int16ul, "enhance_chances" / records(Int16ul, ENHANCE_CHANCE),
    "slots" / Int16ul, "hunt_cooldown_ms" / Int32ul, "monsters" / records(Int16ul, MONSTER),
    "raid_exp_per_score" / Int16ul, "items" / records(Int16ul, ITEM_KIND), "item_names" / String,
)
HUNT = message(
    210, "hunt", Sender.CLIENT,
    "Hunt a monster of a kind from the game tables (1 to 5 by default). Errors: unknown_monster, "
    "hunt_cooldown.",
    "monster" / Int8ul,
)
HUNTED = message(
    211, "hunted", Sender.SERVER,
    "The reply to hunt: exp gained, the new level and exp, levels gained, and the slots the drops "
    "went to (a drop with no room is lost).",
    "exp_gained" / Int32ul, "level" / Int8ul, "exp" / Int32ul, "levels_gained" / Int8ul,
    "changed" / records(Int16ul, SLOT_ITEM),
)
LIST_INVENTORY = message(
    220, "list_inventory", Sender.CLIENT, "List every occupied slot of every tab.",
)
INVENTORY = message(
    221, "inventory", Sender.SERVER,
    "Occupied slots, by tab then slot; also the reply to every inventory change, listing the slots it "
    "changed (an emptied slot has item_code 0).",
    "items" / records(Int16ul, SLOT_ITEM),
)
DELETE_ITEM = message(
    222, "delete_item", Sender.CLIENT, "Delete the item in a slot. Errors: bad_slot, empty_slot.",
    "tab" / Int8ul, "slot" / Int16ul,
)
MOVE_ITEM = message(
    223, "move_item", Sender.CLIENT,
    "Move an item to another slot of the same tab: onto an empty slot it moves; onto a stack of the "
    "same code that is not full it merges up to the stack size (the rest stays in from_slot); onto "
    "anything else (a full stack included) the two swap. The reply lists the slots changed (none when "
    "from_slot is to_slot). Errors: "
    "bad_slot, empty_slot (from_slot is empty).",
    "tab" / Int8ul, "from_slot" / Int16ul, "to_slot" / Int16ul,
)
USE_ITEM = message(
    224, "use_item", Sender.CLIENT,
    "Use one of the consumables in a slot of the consumables tab (its count goes down by one; the "
    "last empties the slot). Errors: bad_slot, empty_slot, wrong_item_kind (the tables no longer "
    "call that item a consumable).",
    "slot" / Int16ul,
)
ENHANCE = message(
    225, "enhance", Sender.CLIENT,
    "Try to enhance the equipment in a slot of the equipment tab; the server rolls against the "
    "table's chance for its level. Errors: bad_slot, empty_slot, max_enhancement, wrong_item_kind "
    "(the tables no longer call that item equipment).",
    "slot" / Int16ul,
)
ENHANCED = message(
    226, "enhanced", Sender.SERVER, "The reply to enhance: whether it worked and the item's level now.",
    "slot" / Int16ul, "success" / Flag, "enhancement" / Int8ul,
)
GRANT = message(
    227, "grant", Sender.CLIENT,
    "Development only (off unless [game] dev_grant = on): put count of an item into its tab, all "
    "or nothing. Errors: grant_disabled, unknown_item, bad_range (a count of 0), inventory_full "
    "(they do not all fit; nothing was added).",
    "item_code" / Int32ul, "count" / Int32ul,
)

RANK_ENTRY = Struct("rank" / Int32ul, "user_id" / Int64ul, "score" / Int32ul)

RANKING_PAGE = message(
    240, "ranking_page", Sender.CLIENT,
    "A page of the ranking board: count entries (1 to 100) from position first (from 1), best "
    "first. Equal scores share a rank. Errors: bad_range.",
    "first" / Int32ul, "count" / Int8ul,
)
RANKING = message(
    241, "ranking", Sender.SERVER,
    "The reply to ranking_page: the entries, and their names in the same order, separated by "
    "single spaces (names never hold one). Empty past the end of the board.",
    "entries" / records(Int8ul, RANK_ENTRY), "names" / String,
)
MY_RANK = message(242, "my_rank", Sender.CLIENT, "The user's own place on the ranking board.")
RANK = message(
    243, "rank", Sender.SERVER,
    "The reply to my_rank: the user's rank and best score; rank 0 before their first scored raid.",
    "rank" / Int32ul, "score" / Int32ul,
)

PARTY_MEMBER = Struct("user_id" / Int64ul)

CREATE_PARTY = message(
    250, "create_party", Sender.CLIENT,
    "Create a party led by this user; the reply is party, with the invite code. Errors: "
    "already_in_party.",
)
PARTY = message(
    251, "party", Sender.SERVER,
    "A party: its invite code, leader, members in join order and their names in the same order, "
    "separated by single spaces. The reply to create_party, join_party, kick_member and "
    "my_party (code empty when in no party).",
    "code" / String, "leader" / Int64ul, "members" / records(Int8ul, PARTY_MEMBER), "names" / String,
)
JOIN_PARTY = message(
    252, "join_party", Sender.CLIENT,
    "Join the party with this invite code (letters are taken in either case). A party changed "
    "while its ticket waits leaves the queue: its ticket (and any the joiner queued alone) is "
    "withdrawn and every member, leader and joiner included, gets a matchmaking push with state "
    "cancelled. Errors: already_in_party, no_such_party, party_full.",
    "code" / String,
)
LEAVE_PARTY = message(
    253, "leave_party", Sender.CLIENT,
    "Leave the party; if the leader leaves, the member who joined next leads. Its waiting ticket is "
    "withdrawn: every member, the one leaving included, gets a matchmaking push with state "
    "cancelled. Logging out or dropping the connection leaves too, but a connection closed because "
    "a newer authentication of the player replaced it (a second login, a raid handoff) does not: "
    "the player goes on there; nor does one closed while its player moves to a raid's host with a "
    "handoff ticket (until the ticket is used or expires). Errors: not_in_party.",
)
PARTY_LEFT = message(254, "party_left", Sender.SERVER, "The reply to leave_party.")
KICK_MEMBER = message(
    255, "kick_member", Sender.CLIENT,
    "The leader removes a member; the reply is party. Its waiting ticket is withdrawn: every "
    "member, the leader and the one kicked included, gets a matchmaking push with state "
    "cancelled. Errors: not_in_party, not_party_leader, not_a_member.",
    "user_id" / Int64ul,
)
PARTY_CHANGED = message(
    256, "party_changed", Sender.SERVER,
    "Push (request id 0) to the members of a party when someone joined, left or was kicked, or "
    "went away (their connection dropped; they are still a member) or came back with resume "
    "(reason), naming who (user_id), with the party as it is now; the kicked member gets it "
    "with an empty code.",
    "reason" / String, "user_id" / Int64ul,
    "code" / String, "leader" / Int64ul, "members" / records(Int8ul, PARTY_MEMBER), "names" / String,
)
MY_PARTY = message(257, "my_party", Sender.CLIENT, "The user's party; the reply is party.")

QUEUE_RAID = message(
    260, "queue_raid", Sender.CLIENT,
    "Wait for a raid: the user's party (only its leader may queue it) or the user alone. The "
    "reply is queued; the other members get a matchmaking push. A party that changes (a join, a "
    "leave, a kick) while queued is taken out of the queue, and every member is told (see "
    "matchmaking). Errors: not_party_leader, already_queued, party_changed_while_queueing (a member "
    "joined or left while it was being queued: nothing waits, the members told queued are told "
    "cancelled).",
)
QUEUED = message(261, "queued", Sender.SERVER, "The reply to queue_raid: the ticket's level group.",
                 "group" / Int8ul)
CANCEL_QUEUE = message(
    262, "cancel_queue", Sender.CLIENT,
    "Take the user's waiting ticket (their party's) out of the queue; the other members get a "
    "matchmaking push. Errors: not_queued (also when it was matched already).",
)
QUEUE_CANCELLED = message(263, "queue_cancelled", Sender.SERVER, "The reply to cancel_queue.")
MATCHMAKING = message(
    264, "matchmaking", Sender.SERVER,
    "Push about a waiting ticket. State queued, with the group: to the other members when the "
    "leader queued the party. State cancelled, group 0: the ticket no longer waits and was not "
    "matched. On cancel_queue the other members get it (the leader has the reply); when the party "
    "changed (join_party, leave_party, kick_member, a member logging out or dropping) every member "
    "of the withdrawn ticket and of the party as it is now gets it, the one who acted included; "
    "when the ticket's game server died, its members get it. A ticket is withdrawn once, so each "
    "member hears one cancelled per ticket.",
    "state" / String, "group" / Int8ul,
)
RAID_FOUND = message(
    265, "raid_found", Sender.SERVER,
    "Push to every player of a raid just formed, from its host: the raid's id (the raid_id of "
    "raid_ready, raid_hit and the raid pushes); the host's client address (host:port) and a handoff "
    "ticket, single use and short-lived, for a player connected to another game server to "
    "authenticate_handoff there (the client library moves by itself; '' for a player connected "
    "to the host already, who needs none); the UDP channel: its address "
    "(host:port), the raid number (the raid field of every datagram of the raid), this player's "
    "member number (from 0: the member field of every datagram to and from this player) and this "
    "player's own 16-byte key (32 hex digits) for the MAC of the datagrams it sends and is sent "
    "(each member has a different key, so none can sign datagrams as another); and the players' "
    "user ids in member-number order. Each connection (authentication) of a player hears it at "
    "most once a raid: at forming, or again after a resume.",
    "raid_id" / String, "host" / String, "ticket" / String,
    "udp" / String, "raid_number" / Int32ul, "member" / Int8ul, "key" / String,
    "members" / records(Int8ul, PARTY_MEMBER),
)
AUTHENTICATE_HANDOFF = message(
    266, "authenticate_handoff", Sender.CLIENT,
    "Instead of authenticate, on a raid's host: the ticket from raid_found, which becomes the "
    "user's live session (the connection elsewhere is closed with logged_in_elsewhere). A move "
    "is not a leave: the party keeps the player and nobody is told, in either order (the old "
    "connection may close first: the session waits for the ticket). The reply is authenticated. "
    "Errors: handoff_refused (the connection is then closed), already_authenticated, unavailable.",
    "user_id" / Int64ul, "ticket" / String,
)
RAID_READY = message(
    267, "raid_ready", Sender.CLIENT,
    "The player is ready to fight (on the raid's host); the fight begins when all are, or ready_grace "
    "after the raid formed with who is there (a player who never sends raid_ready stays in the raid: "
    "they may hit once it fights, and get its result and pay). Sending it again, or once the fight has "
    "begun, changes nothing. Errors: not_in_raid (also when this is not the raid's host).",
    "raid_id" / String,
)
RAID_READY_OK = message(268, "raid_ready_ok", Sender.SERVER, "The reply to raid_ready.")
RAID_FIGHT = message(
    269, "raid_fight", Sender.SERVER,
    "Push to the raid's players on its host when the fight begins: the boss's HP and its "
    "sequence (the HP's, as in hit and boss_hp), and the deadline (ms since the epoch, by the "
    "host's clock) after which the raid fails. Sent again, with the HP and sequence as they are "
    "then, after the raid_found a resumed player gets mid-fight.",
    "raid_id" / String, "hp" / Int32ul, "sequence" / Int32ul, "deadline_ms" / Int64ul,
)
RAID_HIT = message(
    270, "raid_hit", Sender.CLIENT,
    "Hit the boss; the server computes the damage. The reply is hit. Errors: not_in_raid, "
    "raid_not_fighting, hit_too_soon.",
    "raid_id" / String,
)
HIT = message(
    271, "hit", Sender.SERVER,
    "The reply to raid_hit: the damage it scored (the killing hit scores only the HP that was "
    "left) and the boss's HP after it with its sequence.",
    "damage" / Int32ul, "hp" / Int32ul, "sequence" / Int32ul,
)
RAID_RESULT = message(
    272, "raid_result", Sender.SERVER,
    "Push to every player of a raid at its end: cleared or not, the player's score and the team's, "
    "and what a clear paid: exp, the level after, the best score and the inventory slots the drops "
    "changed, as stored (a drop with no room is lost). A failure (time out, or the raid's host lost) "
    "scores 0 for everyone and pays nothing: exp_gained 0, no slots, and level and best are the "
    "player's own as they stand (0 only if the server could not read them). A clear that could not "
    "pay the player (the raid outlived its longest life) says level 0 and nothing paid; a player whose "
    "pay Redis never confirmed is not sent one. A client takes the first result of a raid and drops "
    "any later one.",
    "raid_id" / String, "cleared" / Flag, "score" / Int32ul, "team_score" / Int32ul,
    "exp_gained" / Int32ul, "level" / Int8ul, "best" / Int32ul, "changed" / records(Int16ul, SLOT_ITEM),
)

UDP_HELLO = datagram(
    1, "udp_hello", Sender.CLIENT,
    "Binds the sender's address to its raid membership; the host answers with boss_hp. Sent "
    "until that answer comes.",
)
POSITION = datagram(
    2, "position", Sender.CLIENT,
    "The player's position and state, at most 10 a second; the host relays the latest of each "
    "player to the others. The host takes at most [raids] datagram_rate datagrams from each member "
    "(10 a second with a burst of 20 by default, hellos included) and drops the rest; it drops a "
    "position whose x or y is not finite or lies outside -world_bound..world_bound ([raids] "
    "world_bound, 10,000 by default).",
    "x" / Float32l, "y" / Float32l, "state" / Int8ul,
)
BOSS_HP = datagram(
    3, "boss_hp", Sender.SERVER,
    "The boss's HP and its sequence (the HP's own, as in hit and raid_fight: not the datagram's), "
    "after every change and at least once a second: a client keeps the HP of the highest "
    "hp_sequence it has seen and drops the rest.",
    "hp" / Int32ul, "hp_sequence" / Int32ul,
)
POSITIONS = datagram(
    4, "positions", Sender.SERVER,
    "The latest position and state of the other players (by member number; those who sent none are "
    "left out), ten times a second.",
    "players" / records(Int8ul, Struct("member" / Int8ul, "x" / Float32l, "y" / Float32l, "state" / Int8ul)),
)

# What a server answers each client request with when it does not refuse it
# (an error frame); None: no answer.  docs/protocol.md says so beside each.
REPLY_OF = {
    PING: PONG, PONG: None, HELLO: WELCOME,
    REGISTER: REGISTERED, LOGIN: LOGGED_IN, ENTER_WORLD: WORLD_ENTERED, REFRESH: LOGGED_IN, REVOKE: REVOKED,
    AUTHENTICATE: AUTHENTICATED, LOGOUT: LOGGED_OUT, GAME_TABLES: TABLES, HUNT: HUNTED,
    LIST_INVENTORY: INVENTORY, DELETE_ITEM: INVENTORY, MOVE_ITEM: INVENTORY, USE_ITEM: INVENTORY,
    ENHANCE: ENHANCED, GRANT: INVENTORY, RANKING_PAGE: RANKING, MY_RANK: RANK,
    CREATE_PARTY: PARTY, JOIN_PARTY: PARTY, LEAVE_PARTY: PARTY_LEFT, KICK_MEMBER: PARTY, MY_PARTY: PARTY,
    QUEUE_RAID: QUEUED, CANCEL_QUEUE: QUEUE_CANCELLED, AUTHENTICATE_HANDOFF: AUTHENTICATED, RESUME: RESUMED,
    RAID_READY: RAID_READY_OK, RAID_HIT: HIT,
}
