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
    UNAVAILABLE = 12
    RATE_LIMITED = 13
    TOO_MANY_CONNECTIONS = 14

    TOKEN_MALFORMED = 20
    TOKEN_SIGNATURE = 21
    TOKEN_EXPIRED = 22
    TOKEN_NOT_YET_VALID = 23
    TOKEN_AUDIENCE = 24
    TOKEN_ISSUER = 25
    SESSION_NOT_LIVE = 26
    LOGGED_IN_ELSEWHERE = 27
    ALREADY_AUTHENTICATED = 28

    INVALID_NAME = 30
    INVALID_PASSWORD = 31
    NAME_TAKEN = 32
    WRONG_CREDENTIALS = 33
    LOGIN_THROTTLED = 34
    REGISTER_THROTTLED = 35

    UNKNOWN_MONSTER = 40
    HUNT_COOLDOWN = 41
    BAD_SLOT = 42
    EMPTY_SLOT = 43
    WRONG_ITEM_KIND = 44
    MAX_ENHANCEMENT = 45
    INVENTORY_FULL = 46
    UNKNOWN_ITEM = 47
    GRANT_DISABLED = 48

    BAD_RANGE = 60
    ALREADY_IN_PARTY = 61
    NO_SUCH_PARTY = 62
    PARTY_FULL = 63
    NOT_IN_PARTY = 64
    NOT_PARTY_LEADER = 65
    NOT_A_MEMBER = 66
    ALREADY_QUEUED = 67
    NOT_QUEUED = 68
    NOT_IN_RAID = 69
    RAID_NOT_FIGHTING = 70
    HIT_TOO_SOON = 71
    HANDOFF_REFUSED = 72
    ZERO_REQUEST_ID = 73
    PARTY_CHANGED_WHILE_QUEUEING = 74
    RESUME_EXPIRED = 75

    REFRESH_REFUSED = 80


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
    ErrorCode.UNAVAILABLE: "a store the request needs (MySQL or Redis) is unavailable; try again later "
                           "(a change it asked for may have been made: read before retrying)",
    ErrorCode.RATE_LIMITED: "too many requests of this kind on this connection; slow down (a flood of them closes it)",
    ErrorCode.TOO_MANY_CONNECTIONS: "this address holds as many connections as the server allows; this one is closed",
    ErrorCode.TOKEN_MALFORMED: "the token is not a JWT, or lacks a required claim",
    ErrorCode.TOKEN_SIGNATURE: "the token's signature or algorithm is not the server's",
    ErrorCode.TOKEN_EXPIRED: "the token has expired; log in again",
    ErrorCode.TOKEN_NOT_YET_VALID: "the token was issued in the future",
    ErrorCode.TOKEN_AUDIENCE: "the token is meant for another audience",
    ErrorCode.TOKEN_ISSUER: "the token comes from another issuer",
    ErrorCode.SESSION_NOT_LIVE: "the token is not the user's live session (logged out, or replaced by a newer login)",
    ErrorCode.INVALID_NAME: "a user name is 3 to 20 of A-Z, a-z, 0-9 and _",
    ErrorCode.INVALID_PASSWORD: "a password is 8 to 128 characters",
    ErrorCode.NAME_TAKEN: "that user name is taken",
    ErrorCode.WRONG_CREDENTIALS: "no such user, or the wrong password",
    ErrorCode.LOGIN_THROTTLED: "too many failed logins for this account or address; wait and try again",
    ErrorCode.REGISTER_THROTTLED: "this address has registered as many accounts as the server allows for now; "
                                  "wait and try again",
    ErrorCode.LOGGED_IN_ELSEWHERE: "the same user logged in again elsewhere; this connection is closed",
    ErrorCode.ALREADY_AUTHENTICATED: "this connection is authenticated already",
    ErrorCode.UNKNOWN_MONSTER: "no monster of that kind",
    ErrorCode.HUNT_COOLDOWN: "hunting again too soon",
    ErrorCode.BAD_SLOT: "no such tab or slot",
    ErrorCode.EMPTY_SLOT: "that slot is empty",
    ErrorCode.WRONG_ITEM_KIND: "that item cannot be used this way",
    ErrorCode.MAX_ENHANCEMENT: "the item is at the highest enhancement",
    ErrorCode.INVENTORY_FULL: "no room in that tab",
    ErrorCode.UNKNOWN_ITEM: "no item has that code",
    ErrorCode.GRANT_DISABLED: "the grant command is off on this server",
    ErrorCode.BAD_RANGE: "a number of the request is out of its range (a ranking page starts at position 1 or "
                         "later and holds 1 to 100 entries; a grant's count is 1 or more)",
    ErrorCode.ALREADY_IN_PARTY: "the user is in a party already; leave it first",
    ErrorCode.NO_SUCH_PARTY: "no party has that invite code",
    ErrorCode.PARTY_FULL: "the party has as many members as a raid",
    ErrorCode.NOT_IN_PARTY: "the user is in no party",
    ErrorCode.NOT_PARTY_LEADER: "only the party's leader may do that",
    ErrorCode.NOT_A_MEMBER: "that user is not another member of the party",
    ErrorCode.ALREADY_QUEUED: "a member is already waiting for a raid or in one",
    ErrorCode.NOT_QUEUED: "no ticket of the user is waiting (it was matched or cancelled)",
    ErrorCode.NOT_IN_RAID: "the user is not a player of that raid",
    ErrorCode.RAID_NOT_FIGHTING: "the raid's fight has not begun, or has ended",
    ErrorCode.HIT_TOO_SOON: "a player's hits must be hit_interval apart",
    ErrorCode.HANDOFF_REFUSED: "the handoff ticket is used, expired or not this user's",
    ErrorCode.ZERO_REQUEST_ID: "a request's id must be 1 or more: 0 marks the server's pushes (only a pong, "
                               "which answers one, carries it); the request was not handled",
    ErrorCode.PARTY_CHANGED_WHILE_QUEUEING: "the party changed (a member joined or left) while it was being "
                                            "queued; nothing is queued: queue again",
    ErrorCode.REFRESH_REFUSED: "the refresh token is unknown, expired, used already or revoked; log in with the "
                               "password (a token used twice ends every token of its login)",
    ErrorCode.RESUME_EXPIRED: "nothing to resume: the session is no longer live (the resume grace ran out, or "
                              "the user logged out or entered the world again); log in and enter the world again",
}


class RequestRefused(Exception):
    """A service refuses a request; C{code} is an L{ErrorCode}."""

    def __init__(self, code, detail=None):
        super().__init__(detail or ERROR_TEXT[code])
        self.code = code
        self.detail = detail or ERROR_TEXT[code]
