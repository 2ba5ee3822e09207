"""
The dreamraid client library: the session server (L{SessionClient}), the
game servers (L{GameClient}, whose raids are L{Raid}s), and the protocol
connection beneath them.  See docs/client.md.
"""

from dreamraid.client.connection import ClientProtocol, ConnectionClosed, OutcomeUnknown, RemoteError, connect
from dreamraid.client.game import GameClient, Raid, RaidChannel, RaidEndedAway, RaidNotStarted
from dreamraid.client.session import Relogin, SessionClient, play

__all__ = ["ClientProtocol", "ConnectionClosed", "GameClient", "OutcomeUnknown", "Raid", "RaidChannel", "RaidEndedAway", "RaidNotStarted",
           "Relogin", "RemoteError", "SessionClient", "connect", "play"]
