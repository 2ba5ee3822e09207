"""
The Redis Cluster router (issue 3, in progress): this module will hold the
twisted Service that routes every Redis call by key slot.  What is here now is
the slot function, which the router and the key layout both stand on.
"""

from binascii import crc_hqx

SLOTS = 16384


def key_slot(key):
    """
    The cluster slot of C{key} (str or bytes), exactly as C{CLUSTER KEYSLOT}:
    CRC16/XMODEM of the key, or of its hash tag (the text between the first
    C{{} and the next C{}}, when that is not empty), modulo 16384.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key, 0) % SLOTS
