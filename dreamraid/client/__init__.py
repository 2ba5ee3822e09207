"""The dreamraid client library: connect to a server and speak its protocol."""

from dreamraid.client.connection import ClientProtocol, ConnectionClosed, RemoteError, connect

__all__ = ["ClientProtocol", "ConnectionClosed", "RemoteError", "connect"]
