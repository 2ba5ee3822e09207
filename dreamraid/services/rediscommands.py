"""
What the cluster router must know of each Redis command before sending it:
where its keys are (to pick the slot and refuse cross-slot calls) and whether
it only reads (a read whose reply was lost may be sent again; a write may not).
"""

# Commands that change nothing.  Anything not listed is treated as a write,
# which is the safe default: a lost reply to it is reported, never resent.
READ_ONLY = frozenset("""
    GET MGET EXISTS STRLEN GETRANGE GETBIT BITCOUNT TTL PTTL TYPE DUMP OBJECT
    HGET HMGET HGETALL HEXISTS HLEN HKEYS HVALS HSTRLEN HSCAN HRANDFIELD
    LRANGE LLEN LINDEX LPOS
    SMEMBERS SISMEMBER SMISMEMBER SCARD SINTER SUNION SDIFF SSCAN SRANDMEMBER SINTERCARD
    ZSCORE ZMSCORE ZRANGE ZREVRANGE ZRANGEBYSCORE ZREVRANGEBYSCORE ZRANGEBYLEX
    ZREVRANGEBYLEX ZRANK ZREVRANK ZCARD ZCOUNT ZLEXCOUNT ZSCAN ZUNION ZINTER ZDIFF
    ZINTERCARD ZRANDMEMBER
    XLEN XRANGE XREVRANGE XPENDING XREAD XINFO PFCOUNT
    EVAL_RO EVALSHA_RO FCALL_RO
    PING ECHO INFO TIME CLUSTER DBSIZE COMMAND ROLE
""".split())

# (index of the first key, index of the last key or -1 for "to the end" or
# -2 for "all but the last", step) for commands whose keys sit in fixed places.
_FIXED = {}


def _keys_at(names, first, last, step):
    for name in names.split():
        _FIXED[name] = (first, last, step)


_keys_at("""
    GET SET SETNX SETEX PSETEX GETSET GETDEL GETEX GETRANGE SETRANGE GETBIT SETBIT
    BITCOUNT BITPOS INCR INCRBY INCRBYFLOAT DECR DECRBY APPEND STRLEN EXPIRE
    PEXPIRE EXPIREAT PEXPIREAT EXPIRETIME PEXPIRETIME TTL PTTL PERSIST TYPE DUMP RESTORE
    HGET HSET HSETNX HMSET HMGET HGETALL HDEL HINCRBY HINCRBYFLOAT HEXISTS HLEN
    HKEYS HVALS HSTRLEN HSCAN HRANDFIELD
    LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP LRANGE LLEN LINDEX LSET LREM LTRIM LINSERT LPOS
    SADD SREM SMEMBERS SISMEMBER SMISMEMBER SCARD SPOP SRANDMEMBER SSCAN
    ZADD ZREM ZSCORE ZMSCORE ZINCRBY ZRANGE ZREVRANGE ZRANGEBYSCORE ZREVRANGEBYSCORE
    ZRANGEBYLEX ZREVRANGEBYLEX ZRANK ZREVRANK ZCARD ZCOUNT ZLEXCOUNT
    ZREMRANGEBYRANK ZREMRANGEBYSCORE ZREMRANGEBYLEX ZPOPMIN ZPOPMAX ZSCAN ZRANDMEMBER
    XADD XLEN XRANGE XREVRANGE XDEL XTRIM XACK XPENDING XCLAIM XAUTOCLAIM XSETID
    PFADD
""", 1, 1, 1)
_keys_at("DEL EXISTS UNLINK TOUCH MGET WATCH PFCOUNT PFMERGE "
         "SINTER SUNION SDIFF SINTERSTORE SUNIONSTORE SDIFFSTORE", 1, -1, 1)
_keys_at("MSET MSETNX", 1, -1, 2)
_keys_at("RENAME RENAMENX SMOVE LMOVE RPOPLPUSH COPY ZRANGESTORE BLMOVE BRPOPLPUSH", 1, 2, 1)
_keys_at("BLPOP BRPOP BZPOPMIN BZPOPMAX", 1, -2, 1)
_keys_at("XGROUP OBJECT", 2, 2, 1)

# Commands with no key at all: the router sends them to any master unless the
# caller names a key to route by.
KEYLESS = frozenset("""
    PING ECHO INFO TIME CLUSTER SCRIPT PUBLISH DBSIZE COMMAND CONFIG ROLE
    FLUSHALL FLUSHDB WAIT READONLY READWRITE ASKING MULTI EXEC DISCARD UNWATCH
    FUNCTION LASTSAVE MEMORY SLOWLOG CLIENT
""".split())


class UnknownCommand(ValueError):
    """The router does not know where this command's keys are."""


def command_name(args):
    """The upper-case name of the command C{args[0]} (str or bytes)."""
    name = args[0]
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.upper()


def command_keys(name, args):
    """The keys of the command C{args} whose name is C{name}, as a list."""
    spec = _FIXED.get(name)
    if spec is not None:
        first, last, step = spec
        if last < 0:
            last = len(args) + last
        return list(args[first:last + 1:step])
    if name in KEYLESS:
        return []
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return list(args[3:3 + int(args[2])])
    if name in ("ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"):
        return [args[1], *args[3:3 + int(args[2])]]
    if name in ("ZUNION", "ZINTER", "ZDIFF", "SINTERCARD", "ZINTERCARD", "LMPOP", "ZMPOP"):
        return list(args[2:2 + int(args[1])])
    if name in ("XREAD", "XREADGROUP"):
        for i, arg in enumerate(args):
            if (arg.decode("ascii", "replace") if isinstance(arg, bytes) else str(arg)).upper() == "STREAMS":
                rest = args[i + 1:]
                return list(rest[:len(rest) // 2])
        raise UnknownCommand(f"{name} without STREAMS")
    raise UnknownCommand(f"the router does not know where the keys of {name} are")
