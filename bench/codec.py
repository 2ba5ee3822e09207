"""
Encode+decode rate of a typical frame (a hello: header, a u16 and a string)
through dreamraid's codec, against hand-written C{struct} code for the same
frame in the same run.  Compiled construct, the schema's own codec, is
reported beside them.  The last line printed is the JSON result.

    python bench/codec.py [--quick]
"""

import argparse
import json
import platform
import struct
import sys
import time

from dreamraid.protocols import packets

BODY = {"protocol_version": 1, "client": "dreamraid-terminal/0.1"}
REQUEST_ID = 123456


def dreamraid_codec(n):
    encode, decode = packets.HELLO.encode, packets.decode_payload
    for _ in range(n):
        frame = encode(REQUEST_ID, BODY)
        decode(frame[2:])


HEAD = struct.Struct("<HHIHH")
PARSE_HEAD = struct.Struct("<HIHH")


def hand_written_struct(n):
    for _ in range(n):
        client = BODY["client"].encode("utf-8")
        frame = HEAD.pack(10 + len(client), 4, REQUEST_ID, BODY["protocol_version"], len(client)) + client
        payload = frame[2:]
        message_id, request_id, version, size = PARSE_HEAD.unpack_from(payload)
        end = 10 + size
        if message_id != 4 or end != len(payload):
            raise ValueError
        {"protocol_version": version, "client": payload[10:end].decode("utf-8")}


def compiled_construct(n):
    hello = packets.HELLO
    header = packets.FRAME_HEADER.compile()
    for _ in range(n):
        body = hello.construct_encode(BODY)
        frame = packets.LENGTH_PREFIX.build(6 + len(body)) + header.build(
            {"message_id": hello.id, "request_id": REQUEST_ID}
        ) + body
        header.parse(frame[2:8])
        hello.construct_decode(frame, 8)


def rate(function, seconds, rounds):
    """Best frames/s of C{rounds} timed rounds, each about C{seconds} long."""
    n = 2000
    while True:
        start = time.perf_counter()
        function(n)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        n *= 2
    n = max(1, int(n * seconds / elapsed))
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        function(n)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="short rounds (well under 60 s)")
    args = parser.parse_args(argv)
    seconds, rounds = (0.5, 3) if args.quick else (2.0, 5)
    assert packets.decode_frame(packets.HELLO.encode(REQUEST_ID, BODY)).body == BODY
    value = rate(dreamraid_codec, seconds, rounds)
    baseline = rate(hand_written_struct, seconds, rounds)
    construct_rate = rate(compiled_construct, seconds, rounds)
    print(f"dreamraid codec      {value:12,.0f} frames/s", file=sys.stderr)
    print(f"hand-written struct  {baseline:12,.0f} frames/s", file=sys.stderr)
    print(f"compiled construct   {construct_rate:12,.0f} frames/s", file=sys.stderr)
    print(json.dumps({
        "metric": "codec_encode_decode_rate",
        "value": round(value),
        "baseline": round(baseline),
        "unit": "frames/s",
        "ratio": round(value / baseline, 3),
        "baseline_name": "hand-written struct",
        "compiled_construct": round(construct_rate),
        "python": platform.python_version(),
        "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
