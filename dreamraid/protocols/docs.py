"""
Renders the wire reference, C{docs/protocol.md}, from the schema in
L{dreamraid.protocols.packets} and what the code says around it: which
server handles which message (the protocols' L{handles} marks), which reply
answers each request (L{packets.REPLY_OF}), the pushes the game server
sends, the party change reasons, the error table, and the defaults of the
shipped C{conf/dreamraid.ini} and C{conf/tables.json}.  Nothing a client
needs should have to be read from the code.

    dreamraid-protocol-doc            write docs/protocol.md
    dreamraid-protocol-doc --check    exit 1 if docs/protocol.md is stale
"""

import argparse
import re
import sys
from pathlib import Path

from dreamraid.config import DEFAULT_PATH, load_settings
from dreamraid.errors import ERROR_TEXT, ErrorCode
from dreamraid.protocols import game, packets
from dreamraid.protocols.session import SessionProtocol
from dreamraid.services import parties, raidhost
from dreamraid.tables import TABS, load_tables

DOC_PATH = Path(__file__).resolve().parent.parent.parent / "docs" / "protocol.md"

_CHAR_TYPE = {
    "B": "u8", "H": "u16", "I": "u32", "L": "u32", "Q": "u64",
    "b": "i8", "h": "i16", "i": "i32", "l": "i32", "q": "i64",
    "f": "f32", "d": "f64", "?": "bool (u8)",
}
_CHAR_SIZE = {"B": 1, "H": 2, "I": 4, "L": 4, "Q": 8, "b": 1, "h": 2, "i": 4, "l": 4, "q": 8, "f": 4, "d": 8, "?": 1}

# The servers a client talks to, and the protocol class that answers it on each.
SERVERS = (("session server", SessionProtocol), ("game server", game.GameProtocol))
# Messages the servers' shared protocol sends on its own: the error push
# before a close, and the liveness ping.
_BASE_PUSHES = (packets.ERROR, packets.PING)


def _port(endpoint):
    """The port of a C{tcp:PORT:...} endpoint description."""
    return int(re.match(r"(?:tcp|ssl):(\d+)", endpoint).group(1))


def servers_handling(message):
    """The names of the servers that accept C{message} from a client, with whether each needs authentication."""
    return [(name, protocol.handlers[message.id][1]) for name, protocol in SERVERS if message.id in protocol.handlers]


def game_pushes():
    """The messages the game server pushes to a player (request id 0) from its services."""
    return [message for message, _ in game._PUSHES.values()]


def senders_of(message):
    """
    For a message a server sends: C{(servers, requests, pushed)}, the names
    of the servers that send it, the requests it answers, and whether it is
    also a push.
    """
    requests = [r for r, reply in packets.REPLY_OF.items() if reply is message]
    servers = {name for r in requests for name, _ in servers_handling(r)}
    pushed = message in _BASE_PUSHES or message in game_pushes()
    if message in _BASE_PUSHES:
        servers |= {name for name, _ in SERVERS}
    elif pushed:
        servers.add("game server")
    return [name for name, _ in SERVERS if name in servers], requests, pushed


def _direction(message):
    """One line: who sends C{message} to whom, whether it needs authentication, and what answers it."""
    if message.sender is not packets.Sender.SERVER:
        handled = servers_handling(message)
        where = " and ".join(name for name, _ in handled)
        auth = ("needs an authenticated connection" if all(needs for _, needs in handled)
                else "needs no authentication")
        reply = packets.REPLY_OF.get(message)
        answer = (f"answered with `{reply.name}` ({reply.id}) or `error`" if reply is not None
                  else "never answered")
        text = f"*Client → {where}; {auth}; {answer}.*"
        if message.sender is packets.Sender.BOTH:
            servers, requests, pushed = senders_of(message)
            what = [f"the reply to `{r.name}`" for r in requests] + (["a push (request id 0)"] if pushed else [])
            text += f" *Also {' and '.join(servers)} → client: {'; '.join(what)}.*"
        return text
    servers, requests, pushed = senders_of(message)
    parts = []
    if requests:
        parts.append("the reply to " + ", ".join(f"`{r.name}` ({r.id})" for r in requests))
    if pushed:
        parts.append("a push (request id 0)")
    return f"*{' and '.join(servers).capitalize()} → client: {'; also '.join(parts)}.*"


def _field_rows(message):
    if message.fields is None:
        return [f"| (construct) | `{message.schema}` | |"]
    rows = []
    for name, kind, char, element in message.fields:
        if kind == "fixed":
            kind_text = _CHAR_TYPE[char]
        elif kind == "array":
            chars, names = element
            record = ", ".join(f"`{n}` {_CHAR_TYPE[c]}" for n, c in zip(names, chars))
            size = sum(_CHAR_SIZE[c] for c in chars)
            kind_text = f"array ({_CHAR_TYPE[char]} count, then per entry, {size} bytes: {record})"
        elif kind == "str":
            kind_text = f"string ({_CHAR_TYPE[char]} byte count + UTF-8)"
        else:
            kind_text = f"bytes ({_CHAR_TYPE[char]} byte count + bytes)"
        rows.append(f"| `{name}` | {kind_text} |")
    return rows or ["| (empty body) | |"]


def _extra(message):
    """What the code, not the schema, says about a message: lists derived from the services."""
    if message is packets.PARTY:
        return [f"An invite code is {parties.CODE_LENGTH} characters of A-Z and 0-9.", ""]
    if message is packets.PARTY_CHANGED:
        lines = ["`reason` is one of:", ""]
        lines += [f"- `{reason}`: {text}." for reason, text in parties.CHANGE_REASONS.items()]
        return lines + [""]
    return []


def _message_section(message, datagram=False):
    sender = f" (sent by {message.sender.value})" if datagram else ""
    return [
        f"### {message.id} `{message.name}`{sender}",
        "",
        *([] if datagram else [_direction(message), ""]),
        message.doc,
        "",
        *_extra(message),
        "| field | type |",
        "|---|---|",
        *_field_rows(message),
        "",
    ]


def _summary():
    """The table of every TCP message: id, name, direction, authentication, answer."""
    lines = ["| id | message | from → to | auth | answered with |", "|---|---|---|---|---|"]
    for message in sorted(packets.MESSAGES.values(), key=lambda m: m.id):
        if message.sender is packets.Sender.SERVER:
            servers, requests, pushed = senders_of(message)
            what = ", ".join(["reply to " + ", ".join(f"`{r.name}`" for r in requests)] * bool(requests)
                             + ["push"] * pushed)
            lines.append(f"| {message.id} | `{message.name}` | {' / '.join(servers)} → client | | ({what}) |")
            continue
        handled = servers_handling(message)
        reply = packets.REPLY_OF.get(message)
        auth = "yes" if all(needs for _, needs in handled) else "no"
        arrow = "↔" if message.sender is packets.Sender.BOTH else "→"
        lines.append(f"| {message.id} | `{message.name}` | client {arrow} {' / '.join(n for n, _ in handled)} | {auth} | "
                     f"{f'`{reply.name}`' if reply else '(nothing)'} |")
    return lines


def _rates(rates):
    if not rates:
        return "off"
    ordered = sorted(rates.items(), key=lambda item: item[0] == "*")  # the named first, then each other
    return ", ".join(f"{('each other message' if len(rates) > 1 else 'each message') if name == '*' else f'`{name}`'}: "
                     f"{rate.per_second:g} a second, burst {rate.burst:g}" for name, rate in ordered)


def _limits(settings):
    game_s, session_s = settings.game, settings.session
    rows = [
        ("largest frame accepted (`length`, in bytes)", "max_frame_size", lambda s: s.max_frame_size),
        ("the server pings a connection silent this long (s)", "ping_interval", lambda s: f"{s.ping_interval:g}"),
        ("a connection silent this long is closed, `IDLE_TIMEOUT` (s)", "idle_timeout",
         lambda s: f"{s.idle_timeout:g}"),
        ("a connection not authenticated by then is closed, `AUTH_TIMEOUT` (s)", "auth_timeout",
         lambda s: f"{s.auth_timeout:g}"),
        ("requests a second per connection, one token bucket per message name; past it `RATE_LIMITED`",
         "rate_limits", lambda s: _rates(s.rate_limits)),
        ("`RATE_LIMITED` answers in a row that close the connection", "rate_limited_drop",
         lambda s: s.rate_limited_drop),
        ("frames a second read from one connection, all kinds together (past it the server stops reading; "
         "no error)", "frame_rate",
         lambda s: "off" if s.frame_rate is None else f"{s.frame_rate.per_second:g} a second, burst "
                                                      f"{s.frame_rate.burst:g}"),
        ("connections one client address may hold (0: no cap); past it `TOO_MANY_CONNECTIONS` and closed",
         "connections_per_address", lambda s: s.connections_per_address),
        ("a client that leaves its replies unread is dropped after (s), or this many bytes more",
         "slow_reader_timeout, write_buffer_limit", lambda s: f"{s.slow_reader_timeout:g}, {s.write_buffer_limit}"),
    ]
    lines = ["| what | setting | game server | session server |", "|---|---|---|---|"]
    lines += [f"| {what} | `{key}` | {get(game_s)} | {get(session_s)} |" for what, key, get in rows]
    return lines


def _tables_section(tables):
    tab_names = {number: name for name, number in TABS.items()}
    lines = [
        "## Game tables",
        "",
        "An inventory has three tabs, numbered on the wire:",
        "",
        "| tab | holds | slot holds |",
        "|---|---|---|",
        f"| {TABS['equipment']} | equipment | one item: `item_code`, `enhancement` (0 to max_enhancement), "
        "`count` always 1 |",
        f"| {TABS['consumables']} | consumables (`use_item` takes one) | a stack: `item_code`, `enhancement` 0, "
        "`count` 1 to the item's stack size |",
        f"| {TABS['materials']} | materials | a stack, as consumables |",
        "",
        "Slots are numbered from 0 to `slots` - 1 in each tab. An item's code says which tab it goes to. "
        "`move_item` moves within one tab: onto an empty slot it moves; onto a slot holding the same code, "
        "in a tab that stacks, it merges up to the stack size (what does not fit stays in the source slot); "
        "onto any other item (a full stack of the same code included) the two slots swap. Moving a slot onto "
        "itself changes nothing. A hit's damage is 1 + level // 3 + the enhancement of the item in "
        "equipment slot 0.",
        "",
        "The numbers below are the shipped `conf/tables.json`; a server may run other tables. Ask it with "
        "`game_tables` (204) rather than hard-coding them.",
        "",
        "Exp is cumulative: a player at level L advances while exp >= exp to advance[L] (several levels may "
        f"come at once); level {tables.max_level} is the cap.",
        "",
        "| level | " + " | ".join(str(level) for level in sorted(tables.exp_to_advance)) + " |",
        "|---|" + "---|" * len(tables.exp_to_advance),
        "| exp to advance | " + " | ".join(str(tables.exp_to_advance[level])
                                           for level in sorted(tables.exp_to_advance)) + " |",
        "",
        f"Enhancement: success chance by current level, in percent; +{tables.max_enhancement} is the maximum. "
        "A failure leaves the item unchanged.",
        "",
        "| enhancement | " + " | ".join(str(level) for level in sorted(tables.enhance_success_percent)) + " |",
        "|---|" + "---|" * len(tables.enhance_success_percent),
        "| chance % | " + " | ".join(str(tables.enhance_success_percent[level])
                                      for level in sorted(tables.enhance_success_percent)) + " |",
        "",
        f"Monsters (`hunt`), at most one hunt every {tables.hunt_cooldown_ms} ms:",
        "",
        "| monster | exp | drops (percent chance: count × item) |",
        "|---|---|---|",
    ]
    for kind in sorted(tables.monster_exp):
        drops = ", ".join(f"{d.percent}%: {d.count} × {d.item}" for d in tables.monster_drops.get(kind, ()))
        lines.append(f"| {kind} | {tables.monster_exp[kind]} | {drops or '—'} |")
    raid_drops = ", ".join(f"{d.percent}%: {d.count} × {d.item}" for d in tables.raid_drops)
    lines += [
        "",
        f"A cleared raid pays {tables.raid_exp_per_score} exp per point of the player's score, and drops "
        f"{raid_drops or 'nothing'}.",
        "",
        "| item code | name | tab | stack |",
        "|---|---|---|---|",
    ]
    lines += [f"| {code} | {kind.name} | {kind.tab} ({tab_names[kind.tab]}) | {kind.stack} |"
              for code, kind in sorted(tables.items.items())]
    return lines + [""]


def _example_frames():
    ping = packets.PING.encode(1, {"nonce": 7})
    authenticate = packets.AUTHENTICATE.encode(2, {"token": "abc"})
    return [
        "Two frames as bytes (hex), for checking an encoder:",
        "",
        "```",
        f"ping, request id 1, nonce 7:          {ping.hex(' ')}",
        f"authenticate, request id 2, \"abc\":    {authenticate.hex(' ')}",
        "```",
        "",
    ]


def _example_datagram():
    key = bytes(range(16))
    hello = packets.seal_datagram(key, packets.UDP_HELLO, 0x01020304, 1, 1, {})
    position = packets.seal_datagram(key, packets.POSITION, 0x01020304, 1, 2, {"x": 1.5, "y": -2.0, "state": 3})
    return [
        f"With the key `{key.hex()}` (raid_found's `key`), raid number 0x01020304 (16909060) and member 1:",
        "",
        "```",
        f"udp_hello, sequence 1:                      {hello.hex(' ')}",
        f"position, sequence 2, x 1.5, y -2, state 3:  {position.hex(' ')}",
        "```",
        "",
        f"(In each, the last {packets.MAC_SIZE} bytes are the MAC; in Python "
        "`hashlib.blake2b(datagram[:-16], key=key, digest_size=16).digest()`; in Go "
        "`blake2b.New(16, key)` from `golang.org/x/crypto/blake2b`, writing the same bytes.)",
        "",
    ]


def render(settings=None):
    """The whole reference, as Markdown, with the defaults of C{settings} (the shipped configuration by default)."""
    settings = settings or load_settings(DEFAULT_PATH)
    tables = load_tables(settings.tables.path)
    raids = settings.raids
    session_port, game_port = _port(settings.session.listen), _port(settings.game.listen)
    udp_port = settings.game.udp_port
    lines = [
        "# dreamraid wire protocol",
        "",
        "Generated from `dreamraid/protocols/packets.py` (and the protocols, services and shipped "
        "configuration it names) by `dreamraid-protocol-doc`; do not edit by hand (a test fails when this "
        "file is stale).",
        "",
        f"Protocol version: {packets.PROTOCOL_VERSION}. All integers are little-endian.",
        "",
        "## Servers and ports",
        "",
        "A client talks to two kinds of server, each over plain TCP (the shipped configuration has no TLS), "
        "with the same framing:",
        "",
        "| server | default port | what for |",
        "|---|---|---|",
        f"| session server | TCP {session_port} | register, login, enter_world |",
        f"| game server | TCP {game_port}, UDP {udp_port} | everything else; UDP for a raid's real-time sync |",
        "",
        "The ports are the shipped `conf/dreamraid.ini` defaults (`[session] listen`, `[game] listen`, "
        "`[game] udp_port`). A player is sent to a game server by `world_entered` (host and port), and to a "
        "raid's UDP channel and host by `raid_found`, so a client needs to be configured only with the "
        "session server's address. Several game servers may run at once. Sending a message to the other "
        "server's port is answered `NOT_ACCEPTED`.",
        "",
        "A player's way through:",
        "",
        "1. Connect to the session server. `register` once; `login` with name and password gives a token "
        "(a JWT: treat it as an opaque string; it expires at `expires_at`). `enter_world` with the token "
        "loads the player into the game and answers with the game server to use. The session connection "
        "may be closed then.",
        "2. Connect to that game server and send `authenticate` with the same token as the first request. "
        "Then play: `game_tables`, `hunt`, the inventory, the ranking, parties.",
        "3. `queue_raid` (alone, or the leader for the party). When a raid forms, each player gets "
        "`raid_found` (see [Raids](#raids)).",
        "4. `logout` ends the session; the server closes the connection after its reply. A player whose "
        "connection drops is logged out the same way.",
        "",
        "`hello` (answered with `welcome`: the server's protocol version, ping interval and largest frame) "
        "is optional, on either server, at any time.",
        "",
        "## TCP frames",
        "",
        "```",
        "u16 length | u16 message id | u32 request id | body",
        "```",
        "",
        f"`length` counts the bytes after itself: the {packets.FRAME_HEADER_SIZE}-byte header and the body. "
        "A server closes the connection on a frame over its `max_frame_size` setting (in `welcome`), after "
        "an error push `FRAME_TOO_LARGE`; a frame from a server may be up to 65535. A body is its fields in "
        "the order listed, packed with no padding or alignment:",
        "",
        "- `u8` `u16` `u32` `u64`: unsigned little-endian integers; `f32`: an IEEE 754 single, little-endian;",
        "- `bool (u8)`: 0 false, 1 true;",
        "- `string`: a u16 byte count, then that many bytes of UTF-8 (no terminator);",
        "- `array`: a count (u8 or u16, as listed), then that many entries, each its fields packed in order;",
        "- an empty body is no bytes.",
        "",
        "A body must be consumed exactly: a short body or trailing bytes are `MALFORMED_BODY`.",
        "",
        *_example_frames(),
        "**Request ids.** A client numbers its requests from 1 to 4294967295 (say, counting up and "
        "wrapping to 1); each reply echoes the id of its request, so requests may be pipelined: several "
        "written before the first reply. Replies need not come in the order of the requests; match them by "
        "id. Request id 0 marks a push: a frame the server sends on its own (a `ping`, an `error` before it "
        "closes the connection, and the game server's "
        + ", ".join(f"`{m.name}`" for m in game_pushes()) + "). A client request with id 0 is refused "
        "with `ZERO_REQUEST_ID` "
        "(request id 0) and not handled. The one frame a client sends with id 0 is the `pong` that answers "
        "a server's `ping` push.",
        "",
        "**Errors.** A refused or failed request is answered with an `error` frame carrying its request id "
        "instead of its reply: `code` from the [error table](#error-codes) and `detail`, text for people "
        "(not stable: match on the code). A refused request changed nothing; after `UNAVAILABLE` or "
        "`INTERNAL_ERROR` a change may have been made: read before retrying. A frame that does not decode "
        "is answered with an `error` (`MALFORMED_FRAME`, `UNKNOWN_MESSAGE` or `MALFORMED_BODY`, with the "
        "frame's request id where it could be read) and the connection stays open. An `error` with "
        "request id 0 is either the answer to a frame with no request id to echo (shorter than the header, "
        "or sent with id 0), after which the connection stays open, or a push just before the server "
        "closes the connection, saying why: `AUTH_TIMEOUT`, `IDLE_TIMEOUT`, `LOGGED_IN_ELSEWHERE`, "
        "`SHUTTING_DOWN`, `FRAME_TOO_LARGE`, `TOO_MANY_CONNECTIONS`, or `RATE_LIMITED` after "
        "`rate_limited_drop` refusals in a row.",
        "",
        "**Liveness.** A server pings a connection whose round trip it has not measured yet, and any "
        "connection it has not heard from for `ping_interval` seconds: a `ping` push (request id 0) with "
        "a nonce. The client answers "
        "with a `pong` carrying the same nonce, with request id 0; the server does not answer a pong. Any "
        "frame from the client counts as hearing from it, so a busy client is not pinged. A client may "
        "also send its own `ping` (request id not 0) and gets a `pong` reply with its nonce. A connection "
        "silent for `idle_timeout` seconds is closed after an `IDLE_TIMEOUT` push. A connection that has "
        "not authenticated within `auth_timeout` seconds is closed after an `AUTH_TIMEOUT` push: on a game "
        "server, authenticated means a successful `authenticate` or `authenticate_handoff`; on the session "
        "server, a successful `login` or `enter_world` (`register` alone does not count).",
        "",
        "## Limits",
        "",
        "Each connection is limited; the defaults of the shipped `conf/dreamraid.ini` (an operator may "
        "change them):",
        "",
        *_limits(settings),
        "",
        "A request past its bucket is answered `RATE_LIMITED` with its request id and not handled; frames "
        "that do not decode share one more bucket, at the rate of each other message. One request allowed "
        "resets the count of refusals in a row. Pongs count too. Past the frame "
        "budget nothing is refused: the server reads the connection more slowly, so replies come later.",
        "",
        "Game rules that limit a player: one `hunt` every `hunt_cooldown_ms` (`HUNT_COOLDOWN`), one "
        f"`raid_hit` every {raids.hit_interval:g} s (`[raids] hit_interval`, `HIT_TOO_SOON`), positions "
        "over UDP at most 10 a second.",
        "",
        "## Raids",
        "",
        f"The shipped `[raids]` settings: {raids.raid_size} players a raid (`raid_size`, also the most in a "
        f"party), a boss of {raids.boss_hp} HP (`boss_hp`), a fight of at most {raids.time_limit:g} s "
        f"(`time_limit`), {raids.ready_grace:g} s for the players to be ready (`ready_grace`). Matchmaking "
        "puts players of one level group together (group = level // 3 + 1; a party's is that of its "
        f"highest level); a ticket waiting {raids.widen_after:g} s (`widen_after`) may also match the "
        "neighbouring group.",
        "",
        "1. `raid_found` (push) tells each player the raid's id, `host` (the game server hosting the raid, "
        "`host:port`), the UDP channel (`udp`, `raid_number`, the player's `member` number and `key`) and "
        "the players in member-number order: `members[m]` is member m, counting from 0.",
        "2. If `host` is not the game server the client is connected to (the `host:port` it was sent to by "
        "`world_entered`, or by the last `raid_found`), the client opens a TCP connection to `host` and "
        "sends `authenticate_handoff` with its user id and `ticket` (instead of `authenticate`; the ticket "
        f"is good once, for {raidhost.HANDOFF_TTL:g} s). The old connection is then closed by its server with "
        "a `LOGGED_IN_ELSEWHERE` push. From then on the client plays on the host.",
        "3. The client sends `udp_hello` datagrams to `udp` (every half second or so) until a `boss_hp` "
        "datagram comes back.",
        "4. The client sends `raid_ready` (on the host). The fight begins when every player is ready, or "
        f"`ready_grace` ({raids.ready_grace:g} s) after the raid formed, with or without the others: a player "
        "who never sends `raid_ready` is still a player of the raid. They get `raid_fight` like the others "
        "if connected to the host, may hit from then on, and get the result (and a clear's pay) at the end.",
        "5. `raid_fight` (push) says the fight began, with the boss's HP and the deadline. The client sends "
        "`raid_hit` (TCP); each `hit` reply gives the damage and the HP after. The HP also comes as "
        "`boss_hp` datagrams after every change and at least once a second, and the other players' "
        "positions as `positions` datagrams; the client sends its own as `position` datagrams.",
        "6. `raid_result` (push) ends the raid, for a clear (HP 0) or a failure (time out, or the raid's "
        "host was lost). Datagrams for the raid are dropped after it.",
        "",
        "A player who disconnects stays a player of the raid until its end and is paid at the end.",
        "",
        "## Messages",
        "",
        "Every TCP message, with who sends it to whom, whether it needs an authenticated connection, and "
        "what answers it:",
        "",
        *_summary(),
        "",
        "Each request's text names, in lower case, the error codes particular to it (`bad_slot` is "
        "`BAD_SLOT`, 42). Besides those, a request may be answered `MALFORMED_BODY`, `NOT_ACCEPTED` (the "
        "other server's message), `NOT_AUTHENTICATED`, `RATE_LIMITED`, `ZERO_REQUEST_ID`, `UNAVAILABLE` or "
        "`INTERNAL_ERROR`, and on a game server `SESSION_NOT_LIVE` (the player's live data is gone: log in "
        "again).",
        "",
    ]
    for message in sorted(packets.MESSAGES.values(), key=lambda m: m.id):
        lines += _message_section(message)
    lines += [
        "## UDP datagrams",
        "",
        "```",
        f"u16 message id | u32 raid | u8 member | u32 sequence | body | {packets.MAC_SIZE}-byte MAC",
        "```",
        "",
        f"The header is {packets.DATAGRAM_HEADER_SIZE} bytes, little-endian like the TCP frames; the body is "
        "laid out as a TCP body is. A datagram is one UDP packet of at most "
        f"{packets.MAX_DATAGRAM_SIZE} bytes; its message ids are their own (not the TCP ones).",
        "",
        "- `raid`: the raid's `raid_number` from `raid_found` (not its `raid_id` string).",
        "- `member`: in a datagram a client sends, its own member number (`raid_found.member`); in a "
        "datagram from the host, the member number of the player it is sent to, which is also the "
        "recipient's own. Member numbers count from 0, in the order of `raid_found.members`.",
        "- `sequence`: in a client's datagrams, 1 for its first and one more for each after, counting its "
        "`udp_hello`s and `position`s together for the whole raid; the host drops one whose sequence is "
        "not above the last it accepted from that member (so 0 is always dropped). In the host's "
        "datagrams, a count of its own, rising; a client drops one whose sequence is not above the last it "
        "accepted of that message, which keeps late or repeated datagrams out.",
        f"- MAC: keyed BLAKE2b (RFC 7693) with a digest length of {packets.MAC_SIZE} bytes (a parameter of "
        "BLAKE2b, not a longer digest cut short), no salt or personalization, of every byte before it "
        f"(header and body). The key is the {raidhost.KEY_SIZE} bytes of `raid_found.key`, which is hex. "
        "Each member has its own key, which signs both the datagrams it sends and those sent to it; the "
        "host drops (and counts) a datagram that does not verify under the key of the member it names.",
        "",
        "The host sends to the address (IP and port) that the member's last accepted datagram came from, so "
        "a client sends from the socket it reads on. It answers each `udp_hello` with a `boss_hp` to that "
        "member; it sends `boss_hp` to every member whose address it knows after each change of HP and at "
        f"least once a second, and `positions` every {raidhost.RELAY_INTERVAL:g} s to each member with "
        "the other members' latest (those who sent one; none, no datagram).",
        "",
        *_example_datagram(),
    ]
    for message in sorted(packets.DATAGRAMS.values(), key=lambda m: m.id):
        lines += _message_section(message, datagram=True)
    lines += _tables_section(tables)
    lines += ["## Error codes", "", "| code | name | meaning |", "|---|---|---|"]
    lines += [f"| {code.value} | `{code.name}` | {ERROR_TEXT[code]} |" for code in ErrorCode]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write or check docs/protocol.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--path", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.path} is stale: run dreamraid-protocol-doc\n")
            return 1
        return 0
    args.path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
