"""
Renders the wire reference, C{docs/protocol.md}, from the schema in
L{dreamraid.protocols.packets}.

    dreamraid-protocol-doc            write docs/protocol.md
    dreamraid-protocol-doc --check    exit 1 if docs/protocol.md is stale
"""

import argparse
import sys
from pathlib import Path

from dreamraid.errors import ERROR_TEXT, ErrorCode
from dreamraid.protocols import packets

DOC_PATH = Path(__file__).resolve().parent.parent.parent / "docs" / "protocol.md"

_CHAR_TYPE = {
    "B": "u8", "H": "u16", "I": "u32", "L": "u32", "Q": "u64",
    "b": "i8", "h": "i16", "i": "i32", "l": "i32", "q": "i64",
    "f": "f32", "d": "f64", "?": "bool (u8)",
}


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
            kind_text = f"array ({_CHAR_TYPE[char]} count, then per entry: {record})"
        elif kind == "str":
            kind_text = f"string ({_CHAR_TYPE[char]} byte count + UTF-8)"
        else:
            kind_text = f"bytes ({_CHAR_TYPE[char]} byte count + bytes)"
        rows.append(f"| `{name}` | {kind_text} |")
    return rows or ["| (empty body) | |"]


def _message_section(message):
    lines = [
        f"### {message.id} `{message.name}` (sent by {message.sender.value})",
        "",
        message.doc,
        "",
        "| field | type |",
        "|---|---|",
        *_field_rows(message),
        "",
    ]
    return lines


def render():
    """The whole reference, as Markdown."""
    lines = [
        "# dreamraid wire protocol",
        "",
        "Generated from `dreamraid/protocols/packets.py` by `dreamraid-protocol-doc`; "
        "do not edit by hand (a test fails when this file is stale).",
        "",
        f"Protocol version: {packets.PROTOCOL_VERSION}. All integers are little-endian.",
        "",
        "## TCP frames",
        "",
        "```",
        "u16 length | u16 message id | u32 request id | body",
        "```",
        "",
        "`length` counts the bytes after itself (header and body); a server closes the "
        "connection on a frame over its `max_frame_size` setting, after an error push "
        "`FRAME_TOO_LARGE`. A reply echoes the id of its request, so requests may be "
        "pipelined; pushes from the server carry request id 0. A failed request is "
        "answered with an `error` frame. A frame that does not decode is answered with "
        "an `error` (`MALFORMED_FRAME`, `UNKNOWN_MESSAGE` or `MALFORMED_BODY`) and the "
        "connection stays open. Bodies must be consumed exactly: trailing bytes are "
        "`MALFORMED_BODY`.",
        "",
        "The server pings a connection it has not heard from for `ping_interval` "
        "seconds (a `ping` push), and each new one once to learn its round trip; the "
        "client answers with a `pong` carrying the same nonce. A client's own pings "
        "(or any other frame) keep it from being pinged. A connection silent for "
        "`idle_timeout` seconds, or not authenticated within `auth_timeout` seconds, "
        "is closed after an `error` push saying why.",
        "",
        "## Messages",
        "",
    ]
    for message in sorted(packets.MESSAGES.values(), key=lambda m: m.id):
        lines += _message_section(message)
    lines += [
        "## UDP datagrams",
        "",
        "```",
        f"u16 message id | u32 raid id | u8 member | u32 sequence | body | {packets.MAC_SIZE}-byte MAC",
        "```",
        "",
        f"The MAC is keyed BLAKE2b with a {packets.MAC_SIZE}-byte digest, under the key of the member "
        "the datagram is from or to (each member's own, from raid_found), of everything before it. "
        f"A datagram is at most {packets.MAX_DATAGRAM_SIZE} bytes. The host drops and counts forged, "
        "replayed (sequence not above its member's last) and unknown datagrams; a client drops a "
        "datagram from the host whose sequence is not above the last of its message.",
        "",
    ]
    for message in sorted(packets.DATAGRAMS.values(), key=lambda m: m.id):
        lines += _message_section(message)
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
