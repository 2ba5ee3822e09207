"""dreamraid: an MMO raid backend on Twisted (session server and game servers)."""

__version__ = "0.1.0"
