"""
Operations per second through dreamraid's cluster router against raw
txredisapi talking to one master, same keys (all on that master), same
concurrency, same run.  Workloads: SET+GET pairs and EVALSHA of a small
script.  Also reported: raw txredisapi with its pure-Python reply parser
against hiredis, the measurement behind using hiredis.  Needs the local
cluster (C{scripts/stack.sh up}).  The last line printed is the JSON result.

    python bench/redis_router.py [--quick]
"""

import argparse
import json
import platform
import random

import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dreamraid.config import load_settings
from dreamraid.services.rediscluster import RedisCluster, Script

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def run_workers(clock, operation, keys, concurrency, seconds):
    """Operations per second of C{concurrency} closed-loop workers for C{seconds}."""
    done = 0
    stop_at = clock.seconds() + seconds

    async def worker(index):
        nonlocal done
        key = keys[index % len(keys)]
        while clock.seconds() < stop_at:
            await operation(key)
            done += 1

    start = clock.seconds()
    await defer.gatherResults([defer.ensureDeferred(worker(i)) for i in range(concurrency)])
    return done / (clock.seconds() - start)


def set_get(execute):
    async def operation(key):
        await execute("SET", key, "value")
        await execute("GET", key)
    return operation


def evalsha(execute, sha):
    async def operation(key):
        await execute("EVALSHA", sha, 1, key + ":count", 1)
    return operation


async def raw_connection(reactor, address, protocol_class):
    endpoint = TCP4ClientEndpoint(reactor, address[0], address[1])
    return await connectProtocol(endpoint, protocol_class(charset=None, convertNumbers=False))


async def main(reactor, quick):
    settings = load_settings("conf/dreamraid.ini").redis
    seconds = 2.0 if quick else 8.0
    concurrency = 100
    router = RedisCluster(reactor, random.Random(7), settings.startup_nodes,
                          connect_timeout=settings.connect_timeout, command_timeout=settings.command_timeout)
    router.startService()
    await router.refresh()
    master = router.masters()[0]
    keys = [f"bench:{{{i}}}" for i in range(20000)]
    keys = [key for key in keys if router.node_for(key) == master][:concurrency]
    script = Script(router, SCRIPT)
    await script([keys[0] + ":count"], [0])
    hiredis = await raw_connection(reactor, master, txredisapi.HiredisProtocol)
    python_parser = await raw_connection(reactor, master, txredisapi.BaseRedisProtocol)
    await hiredis.execute_command("SCRIPT", "LOAD", SCRIPT)

    results = {"set_get": {"router": 0.0, "raw": 0.0}, "evalsha": {"router": 0.0, "raw": 0.0}}
    rounds = 2
    for _ in range(rounds):
        for name, make in (("set_get", set_get), ("evalsha", lambda e: evalsha(e, script.sha))):
            results[name]["raw"] += await run_workers(reactor, make(hiredis.execute_command), keys,
                                                      concurrency, seconds) / rounds
            results[name]["router"] += await run_workers(reactor, make(router.execute), keys,
                                                         concurrency, seconds) / rounds
    parser = {
        "hiredis": await run_workers(reactor, set_get(hiredis.execute_command), keys, concurrency, seconds),
        "python": await run_workers(reactor, set_get(python_parser.execute_command), keys, concurrency, seconds),
    }
    for connection in (hiredis, python_parser):
        connection.transport.loseConnection()
    await router.stopService()

    router_ops = results["set_get"]["router"] * 2 + results["evalsha"]["router"]
    raw_ops = results["set_get"]["raw"] * 2 + results["evalsha"]["raw"]
    details = {
        name: {side: round(ops * (2 if name == "set_get" else 1)) for side, ops in sides.items()}
        | {"ratio": round(sides["router"] / sides["raw"], 3)}
        for name, sides in results.items()
    }
    print(json.dumps({"workload": details, "concurrency": concurrency, "seconds_per_round": seconds,
                      "hiredis_over_python_parser": round(parser["hiredis"] / parser["python"], 3)}, indent=1))
    print(json.dumps({
        "metric": "redis_router_ops_per_second",
        "value": round(router_ops / 2),
        "baseline": round(raw_ops / 2),
        "unit": "operations/s (mean of SET/GET and EVALSHA)",
        "ratio": round(router_ops / raw_ops, 3),
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="short rounds (under a minute)")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick)))
