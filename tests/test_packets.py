"""The wire codec: round trips, agreement with construct, and bad input."""

import struct

from construct import Int16ul, PrefixedArray, Struct
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from tests.strategies import body_strategy

FRAMES = sorted(packets.MESSAGES.values(), key=lambda m: m.id)
DATAGRAMS = sorted(packets.DATAGRAMS.values(), key=lambda m: m.id)
KEY = b"k" * 32


def frame_and_body(messages):
    return st.sampled_from(messages).flatmap(
        lambda m: st.tuples(st.just(m), st.integers(0, 2**32 - 1), body_strategy(m))
    )


class FrameCodecTests(TestCase):
    """Every TCP message encodes and decodes as its construct schema says."""

    def test_every_message_is_fast(self):
        """The generated codec covers every registered message (no slow fallback)."""
        self.assertEqual([m.name for m in FRAMES + DATAGRAMS if not m.fast], [])

    @given(frame_and_body(FRAMES))
    def test_round_trip(self, case):
        """decode(encode(body)) gives back the message, request id and body."""
        message, request_id, body = case
        frame = packets.decode_frame(message.encode(request_id, body))
        self.assertEqual(frame, (message, request_id, body))

    @given(frame_and_body(FRAMES))
    def test_agrees_with_construct(self, case):
        """The generated codec writes and reads exactly what construct does."""
        message, request_id, body = case
        data = message.encode(request_id, body)
        reference = message.construct_encode(body)
        self.assertEqual(data[8:], reference)
        self.assertEqual(struct.unpack_from("<HHI", data), (len(data) - 2, message.id, request_id))
        self.assertEqual(message.construct_decode(data, 8), body)

    @given(st.binary(max_size=64))
    def test_random_bytes_raise_only_codec_errors(self, data):
        """Arbitrary payloads decode or raise CodecError, nothing else."""
        try:
            packets.decode_payload(data)
        except packets.CodecError as e:
            self.assertIsInstance(e.code, ErrorCode)

    @given(frame_and_body(FRAMES), st.data())
    def test_corrupted_frames_raise_only_codec_errors(self, case, data):
        """A valid frame with bytes changed or cut decodes or raises CodecError."""
        message, request_id, body = case
        payload = bytearray(message.encode(request_id, body)[2:])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(payload) - 1))
            payload[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(payload)))
        try:
            packets.decode_payload(bytes(payload[:cut]))
        except packets.CodecError:
            pass

    def test_short_frame(self):
        """A payload shorter than the header is MALFORMED_FRAME with request id 0."""
        with self.assertRaises(packets.CodecError) as caught:
            packets.decode_payload(b"\x02\x00\x01")
        self.assertEqual((caught.exception.code, caught.exception.request_id), (ErrorCode.MALFORMED_FRAME, 0))

    def test_unknown_message_keeps_request_id(self):
        """An unknown message id is UNKNOWN_MESSAGE and keeps the request id for the reply."""
        with self.assertRaises(packets.UnknownMessage) as caught:
            packets.decode_payload(struct.pack("<HI", 0xFFFE, 77))
        self.assertEqual((caught.exception.code, caught.exception.request_id), (ErrorCode.UNKNOWN_MESSAGE, 77))

    def test_malformed_body(self):
        """A truncated body, a string past the end or trailing bytes are MALFORMED_BODY."""
        good = packets.HELLO.encode(9, {"protocol_version": 1, "client": "abc"})[2:]
        for bad in (good[:-1], good + b"x", good[:8] + b"\xff\xff" + good[10:], good[:7]):
            with self.assertRaises(packets.MalformedBody) as caught:
                packets.decode_payload(bad)
            self.assertEqual(caught.exception.request_id, 9)

    def test_invalid_utf8(self):
        """A string that is not UTF-8 is MALFORMED_BODY."""
        payload = struct.pack("<HIHH", packets.HELLO.id, 1, 1, 2) + b"\xff\xfe"
        self.assertRaises(packets.MalformedBody, packets.decode_payload, payload)

    def test_unencodable_bodies(self):
        """Out-of-range numbers, missing fields and wrong types raise CodecError."""
        for body in ({"nonce": -1}, {"nonce": 2**32}, {}, {"nonce": "1"}):
            self.assertRaises(packets.CodecError, packets.PING.encode, 1, body)
        self.assertRaises(packets.CodecError, packets.HELLO.encode, 1, {"protocol_version": 1, "client": 5})
        self.assertRaises(
            packets.CodecError, packets.HELLO.encode, 1, {"protocol_version": 1, "client": "x" * 70000}
        )

    def test_error_frame(self):
        """error_frame carries the code and, by default, the table's text."""
        frame = packets.decode_frame(packets.error_frame(5, ErrorCode.IDLE_TIMEOUT))
        self.assertEqual(frame.message, packets.ERROR)
        self.assertEqual(frame.body["code"], ErrorCode.IDLE_TIMEOUT)
        self.assertEqual(frame.body["detail"], packets.ERROR_TEXT[ErrorCode.IDLE_TIMEOUT])

    def test_frame_length_mismatch(self):
        """decode_frame refuses a frame whose length prefix is wrong."""
        data = packets.PING.encode(1, {"nonce": 1})
        self.assertRaises(packets.CodecError, packets.decode_frame, data + b"\x00")

    def test_construct_fallback(self):
        """A field the generator does not know falls back to construct, with the same API."""
        message = packets.Message(
            900, "test_list", packets.Sender.SERVER, "test",
            ["items" / PrefixedArray(Int16ul, Struct("code" / Int16ul))],
        )
        self.assertFalse(message.fast)
        body = {"items": [{"code": 1}, {"code": 2}]}
        data = message.encode(3, body)
        self.assertEqual(struct.unpack_from("<HHI", data), (len(data) - 2, 900, 3))
        self.assertEqual([dict(i) for i in message._decode(data, 8)["items"]], body["items"])
        self.assertRaises(packets.CodecError, message.encode, 3, {"items": [{"code": -1}]})

    def test_duplicate_registration(self):
        """A message id or name can be registered only once."""
        self.assertRaises(ValueError, packets.message, packets.PING.id, "other", packets.Sender.BOTH, "")
        self.assertRaises(ValueError, packets.message, 999, "ping", packets.Sender.BOTH, "")


class DatagramCodecTests(TestCase):
    """UDP datagrams: layout, MAC and bad input."""

    @given(frame_and_body(DATAGRAMS), st.integers(0, 255), st.integers(0, 2**32 - 1))
    def test_round_trip(self, case, member, sequence):
        """open(seal(x)) gives back x."""
        message, raid_id, body = case
        data = packets.seal_datagram(KEY, message, raid_id, member, sequence, body)
        self.assertEqual(
            packets.open_datagram(KEY, data), (message, raid_id, member, sequence, body)
        )
        self.assertEqual(packets.datagram_header(data), (message.id, raid_id, member, sequence))

    def test_forged(self):
        """A changed byte, a wrong key or a cut datagram does not verify."""
        data = packets.seal_datagram(KEY, packets.UDP_HELLO, 1, 2, 3, {})
        tampered = bytes([data[0] ^ 1]) + data[1:]
        for key, bad in ((KEY, tampered), (b"x" * 32, data), (KEY, data[:-1])):
            self.assertRaises(packets.CodecError, packets.open_datagram, key, bad)

    @given(st.binary(max_size=packets.MAX_DATAGRAM_SIZE + 8))
    def test_random_bytes_raise_only_codec_errors(self, data):
        """Arbitrary datagrams raise CodecError and nothing else."""
        self.assertRaises(packets.CodecError, packets.open_datagram, KEY, data)
