"""
The error codes every server reports, one table for the whole system, and the
exception services raise to refuse a request with one of them.  The protocols
turn it into an error frame; C{docs/protocol.md} lists the table.
"""

import enum


class ErrorCode(enum.IntEnum):
    """Every error a server reports, with the text of L{ERROR_TEXT}."""

    MALFORMED_FRAME = 1
    UNKNOWN_MESSAGE = 2
    MALFORMED_BODY = 3
    FRAME_TOO_LARGE = 4
    NOT_ACCEPTED = 5
    UNSUPPORTED_VERSION = 6
    NOT_AUTHENTICATED = 7
    AUTH_TIMEOUT = 8
    IDLE_TIMEOUT = 9
    INTERNAL_ERROR = 10
    SHUTTING_DOWN = 11


ERROR_TEXT = {
    ErrorCode.MALFORMED_FRAME: "the frame is shorter than its header, or a datagram does not verify",
    ErrorCode.UNKNOWN_MESSAGE: "no message has this id",
    ErrorCode.MALFORMED_BODY: "the body does not decode as the message's schema",
    ErrorCode.FRAME_TOO_LARGE: "the frame is over the server's maximum size; the connection is closed",
    ErrorCode.NOT_ACCEPTED: "this server does not accept this message from a client",
    ErrorCode.UNSUPPORTED_VERSION: "the client speaks another protocol version",
    ErrorCode.NOT_AUTHENTICATED: "the request needs an authenticated connection",
    ErrorCode.AUTH_TIMEOUT: "the connection did not authenticate in time; it is closed",
    ErrorCode.IDLE_TIMEOUT: "nothing was heard from the connection for too long; it is closed",
    ErrorCode.INTERNAL_ERROR: "the server failed to handle the request; it was logged",
    ErrorCode.SHUTTING_DOWN: "the server is shutting down",
}


class RequestRefused(Exception):
    """A service refuses a request; C{code} is an L{ErrorCode}."""

    def __init__(self, code, detail=None):
        super().__init__(detail or ERROR_TEXT[code])
        self.code = code
        self.detail = detail or ERROR_TEXT[code]
