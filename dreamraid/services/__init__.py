"""Game and system logic; never sees bytes or sockets."""
