"""
Length-prefixed framing shared by the servers and the client library: turns
the byte stream into decoded L{Frame}s and codec errors.
"""

from twisted.protocols.basic import IntNStringReceiver

from dreamraid.protocols.packets import MAX_FRAME_LENGTH, CodecError, decode_payload


class FrameReceiver(IntNStringReceiver):
    """
    Splits the stream on the u16 little-endian length prefix and decodes each
    frame; subclasses implement L{frameReceived} and L{codecErrorReceived}.
    """

    structFormat = "<H"
    prefixLength = 2
    MAX_LENGTH = MAX_FRAME_LENGTH

    def stringReceived(self, payload):
        try:
            frame = decode_payload(payload)
        except CodecError as error:
            self.codecErrorReceived(error)
        else:
            self.frameReceived(frame)

    def frameReceived(self, frame):
        """One decoded L{Frame} arrived."""
        raise NotImplementedError

    def codecErrorReceived(self, error):
        """A frame arrived that does not decode (a L{CodecError})."""
        raise NotImplementedError
