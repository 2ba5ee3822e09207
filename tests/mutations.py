"""
Mutations for fuzzing the servers: a player's session as its client sends
it, corrupted frame by frame, and raid datagrams corrupted or sealed with
keys the server never gave out.  Each mutated frame keeps a length prefix
that matches its payload, so one connection carries many of them.
"""

import struct

from dreamraid.protocols import packets

# What dreamraid-play's client sends in a session after it authenticates
# (logout left out: it would end the session the fuzz runs in).
SESSION = [
    (packets.HELLO, {"protocol_version": packets.PROTOCOL_VERSION, "client": "dreamraid-play"}),
    (packets.PING, {"nonce": 1}),
    (packets.LIST_INVENTORY, {}),
    (packets.HUNT, {"monster": 1}),
    (packets.MOVE_ITEM, {"tab": 2, "from_slot": 0, "to_slot": 1}),
    (packets.ENHANCE, {"slot": 0}),
    (packets.USE_ITEM, {"slot": 1}),
    (packets.DELETE_ITEM, {"tab": 2, "slot": 5}),
    (packets.RANKING_PAGE, {"first": 1, "count": 10}),
    (packets.MY_RANK, {}),
    (packets.CREATE_PARTY, {}),
    (packets.MY_PARTY, {}),
    (packets.JOIN_PARTY, {"code": "ABCDEF"}),
    (packets.KICK_MEMBER, {"user_id": 2}),
    (packets.LEAVE_PARTY, {}),
    (packets.QUEUE_RAID, {}),
    (packets.CANCEL_QUEUE, {}),
    (packets.RAID_READY, {"raid_id": "r1"}),
    (packets.RAID_HIT, {"raid_id": "r1"}),
    (packets.PONG, {"nonce": 7}),
]
SESSION_PAYLOADS = [message.encode(i + 1, body)[2:] for i, (message, body) in enumerate(SESSION)]
_EDGES = (b"\x00", b"\xff", b"\x7f", b"\x80")


def framed(payload):
    """C{payload} with its u16 length prefix."""
    return struct.pack("<H", len(payload)) + payload


def mutate(payload, rng):
    """One corruption of a frame's payload: flipped bits, a cut, garbage, edge bytes, a splice or a new message id."""
    data = bytearray(payload)
    kind = rng.randrange(7)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:
        data += rng.randbytes(rng.randint(1, 32))
    elif kind == 3 and data:
        start, width = rng.randrange(len(data)), rng.choice((1, 2, 4, 8))
        data[start:start + width] = rng.choice(_EDGES) * width
    elif kind == 4:
        other = rng.choice(SESSION_PAYLOADS)
        data = data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]
    elif kind == 5 and len(data) >= 2:
        data[0:2] = struct.pack("<H", rng.choice(list(packets.MESSAGES)) if rng.random() < 0.8 else rng.getrandbits(16))
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 48)))
    return bytes(data)


def fuzzed_frames(rng, count):
    """C{count} framed payloads: the session replayed with each frame corrupted."""
    return [framed(mutate(SESSION_PAYLOADS[i % len(SESSION_PAYLOADS)], rng)) for i in range(count)]


def fuzzed_datagrams(rng, count, raid_numbers=(1,)):
    """
    C{count} datagrams no server would accept: position and hello datagrams
    for C{raid_numbers} sealed with keys of their own, then corrupted half
    the time, and bare garbage.
    """
    out = []
    for _ in range(count):
        message = rng.choice((packets.POSITION, packets.UDP_HELLO))
        body = {"x": rng.uniform(-1e6, 1e6), "y": rng.uniform(-1e6, 1e6), "state": rng.getrandbits(8)} \
            if message is packets.POSITION else {}
        data = packets.seal_datagram(rng.randbytes(16), message, rng.choice(raid_numbers),
                                     rng.getrandbits(8), rng.getrandbits(32), body)
        choice = rng.random()
        if choice < 0.5:
            data = mutate(data, rng)
        elif choice < 0.6:
            data = rng.randbytes(rng.randint(0, 600))
        out.append(data)
    return out
