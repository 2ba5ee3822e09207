"""
Helpers for tests that run against the local Redis Cluster and change it:
send a command to one node, read who is master of what, wait for the cluster
to settle, and put the original masters back so every test starts from the
layout C{scripts/stack.sh} made.
"""

import os
import random
import signal

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

import txredisapi

from dreamraid.services.rediscluster import RedisCluster, key_slot
from tests.support import STACK_VAR, eventually, make_settings, stack

SETTINGS = make_settings().redis
NODES = list(SETTINGS.startup_nodes)
# redis-cli --cluster create makes the first three nodes the masters.
ORIGINAL_MASTERS = NODES[:3]


def router(cls=RedisCluster, **overrides):
    """A started router on the local cluster; stop it with C{stopService}."""
    options = dict(connect_timeout=SETTINGS.connect_timeout, command_timeout=SETTINGS.command_timeout)
    options.update(overrides)
    started = cls(reactor, random.Random(5), NODES, **options)
    started.startService()
    return started


async def router_for(testcase):
    """A router on the local cluster with its slot table read, stopped after C{testcase}."""
    started = router()
    testcase.addCleanup(started.stopService)
    await started.refresh()
    return started


async def node_command(address, *command, timeout=2.0):
    """C{command} on the node at C{address}, on a connection of its own."""
    endpoint = TCP4ClientEndpoint(reactor, address[0], address[1], timeout=timeout)
    protocol = await connectProtocol(endpoint, txredisapi.HiredisProtocol(charset=None, convertNumbers=False))
    try:
        reply = protocol.execute_command(*command)
        reply.addTimeout(timeout, reactor)
        return await reply
    finally:
        protocol.transport.loseConnection()


async def flush_scripts(router_):
    """Empty the script cache of every master, as a failover to a fresh replica would."""
    for master in router_.masters():
        await node_command(master, "SCRIPT", "FLUSH")


async def cluster_nodes(address):
    """C{{(host, port): (flags, master id, node id, slot ranges)}} as C{address} sees it."""
    text = (await node_command(address, "CLUSTER", "NODES")).decode()
    nodes = {}
    for line in text.splitlines():
        node_id, where, flags, master, *_, state = line.split()[:8]
        ranges = line.split()[8:]
        host, port = where.split("@")[0].rsplit(":", 1)
        nodes[host, int(port)] = (set(flags.split(",")), master, node_id, ranges)
    return nodes


async def master_of(key, asked=None):
    """The address of the master that serves C{key}'s slot, as C{asked} (default: any live node) says."""
    slot = key_slot(key)
    for address in [asked] if asked else NODES:
        try:
            reply = await node_command(address, "CLUSTER", "SLOTS")
        except Exception:
            continue
        for start, end, master, *_ in reply:
            if start <= slot <= end:
                return master[0].decode(), master[1]
    raise AssertionError(f"no node says who serves slot {slot}")


def pid_of(address):
    """The pid of the redis-server at C{address} (from its pidfile)."""
    return int((STACK_VAR / "redis" / str(address[1]) / "redis.pid").read_text())


def signal_node(address, signum):
    os.kill(pid_of(address), signum)


async def healthy():
    """True when every node answers, says cluster_state:ok, and 3 masters each have a replica."""
    try:
        views = [await cluster_nodes(address) for address in NODES]
        for address in NODES:
            info = (await node_command(address, "CLUSTER", "INFO")).decode()
            if "cluster_state:ok" not in info:
                return False
    except Exception:
        return False
    for view in views:
        masters = [n for n, (flags, *_) in view.items() if "master" in flags and "fail" not in flags]
        replicas = [n for n, (flags, *_) in view.items() if "slave" in flags and "fail" not in flags]
        if len(masters) != 3 or len(replicas) != 3 or any("fail?" in flags for flags, *_ in view.values()):
            return False
    for address, (flags, *_) in views[0].items():
        if "slave" in flags and not await in_sync(address):
            return False
    return True


async def wait_healthy(timeout=60.0):
    await eventually(healthy, timeout=timeout, interval=0.2)


async def restore():
    """
    Bring back any stopped or killed node, wait for a healthy cluster, and
    make the original masters masters again (a planned failover on each that
    is a replica now), so the next test sees the layout the stack made.
    """
    for address in NODES:
        try:
            signal_node(address, signal.SIGCONT)
        except (OSError, ValueError):
            pass
    await stack("ensure")
    for address in NODES:
        for opened in (await cluster_nodes(address))[address][3]:
            if opened.startswith("["):
                await node_command(address, "CLUSTER", "SETSLOT", opened[1:].split("-")[0], "STABLE")
    await wait_healthy()
    for address in ORIGINAL_MASTERS:
        flags = (await cluster_nodes(address))[address][0]
        if "slave" in flags:
            await failover_to(address, takeover=True)
    await wait_healthy()


async def failover_to(replica, takeover=False):
    """
    A planned C{CLUSTER FAILOVER} on C{replica}, once it is in sync (a
    failover asked of a replica still syncing times out after pausing its
    master's writes for 5 s).  Returns once every node sees the replica as a
    master and the old master has become its replica.

    @param takeover: use C{TAKEOVER}, which needs no votes: masters refuse
        to vote twice for the same shard within two node timeouts (10 s
        here), so putting the layout back right after a failover needs it.
        Only for a quiet cluster, where the replica has every write.
    """
    view = await cluster_nodes(replica)
    _, master_id, replica_id, _ = view[replica]
    old_master = next(address for address, (_, _, node_id, _) in view.items() if node_id == master_id)
    await eventually(lambda: in_sync(replica, quiet=takeover), timeout=30.0, interval=0.05)
    await node_command(replica, "CLUSTER", "FAILOVER", *(["TAKEOVER"] if takeover else []))

    async def promoted():
        try:
            for address in NODES:
                if "master" not in (await cluster_nodes(address))[replica][0]:
                    return False
            return (await cluster_nodes(old_master))[old_master][1] == replica_id
        except Exception:
            return False

    await eventually(promoted, timeout=30.0, interval=0.05)


async def in_sync(replica, quiet=False):
    """
    True when C{replica}'s link to its master is up, past its initial sync,
    and online for the master; with C{quiet}, only once it has also
    acknowledged every write the master has.
    """
    try:
        _, fields = await replication_info(replica)
    except Exception:
        return False
    if fields.get("master_link_status") != "up" or fields.get("master_sync_in_progress") != "0":
        return False
    master_text, master_fields = await replication_info((fields["master_host"], int(fields["master_port"])))
    online = f"port={replica[1]},state=online"
    if quiet:
        return f"{online},offset={master_fields['master_repl_offset']}," in master_text
    return online in master_text


async def replication_info(address):
    """C{INFO replication} of the node at C{address}: its text and its C{field: value} lines."""
    text = (await node_command(address, "INFO", "replication")).decode()
    return text, dict(line.split(":", 1) for line in text.split() if ":" in line)


async def replica_of(master):
    """The address of a replica of the master at C{master}."""
    view = await cluster_nodes(master)
    master_id = view[master][2]
    for address, (flags, of, _, _) in view.items():
        if "slave" in flags and of == master_id:
            return address
    raise AssertionError(f"{master} has no replica")


def keys_on(router_, master, count, prefix="k"):
    """C{count} keys, each in its own slot, all served by C{master} per the router's table."""
    keys = []
    i = 0
    while len(keys) < count:
        key = f"{prefix}:{{{i}}}"
        if router_.node_for(key) == master:
            keys.append(key)
        i += 1
    return keys


async def move_slot(slot, source, target):
    """Migrate C{slot} and all its keys from master C{source} to master C{target}, the whole protocol."""
    await begin_migration(slot, source, target)
    await migrate_keys(slot, source, target)
    await finish_migration(slot, target)


async def migrate_keys(slot, source, target):
    """MIGRATE every key C{source} still holds in C{slot} to C{target}."""
    while True:
        keys = await node_command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            return
        await node_command(source, "MIGRATE", target[0], target[1], "", 0, 5000, "KEYS", *keys)


async def begin_migration(slot, source, target):
    view = await cluster_nodes(source)
    await node_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", view[source][2])
    await node_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", view[target][2])


async def finish_migration(slot, target):
    view = await cluster_nodes(target)
    masters = [a for a, (flags, *_) in view.items() if "master" in flags]
    for address in [target] + [a for a in masters if a != target]:
        await node_command(address, "CLUSTER", "SETSLOT", slot, "NODE", view[target][2])
