"""C{twistd dreamraid-game}: the options and service tree of a game server."""

import os
import random
import re
import socket

from twisted.application.internet import UDPServer

from dreamraid.config import GAME_SECTIONS, settings_options
from dreamraid.frontends import add_frontends
from dreamraid.protocols.game import GameFactory
from dreamraid.protocols.realtime import RealtimeProtocol
from dreamraid.services.health import Health
from dreamraid.services.inventory import Inventory
from dreamraid.services.matchmaking import Matchmaker
from dreamraid.services.parties import Parties
from dreamraid.services.players import Players
from dreamraid.services.presence import Presence
from dreamraid.services.raidhost import RaidHost
from dreamraid.services.raids import longest_life
from dreamraid.services.ranking import Ranking
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.servicetree import InOrder
from dreamraid.services.sync import SyncQueue
from dreamraid.services.tokens import TokenKeyError, TokenVerifier
from dreamraid.tables import load_tables

Options = settings_options("game server", GAME_SECTIONS)


def makeService(options, reactor=None):
    """
    A game server: Redis Cluster router, players (authentication, presence,
    kicks), hunting and inventory, the ranking board, parties, matchmaking,
    the raids it hosts with their UDP socket, the client TCP endpoint with
    liveness, and HTTP health.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings = options["settings"]
    game = settings.game
    top = InOrder()
    redis = settings.redis
    router = RedisCluster.from_settings(reactor, random.Random(), redis)
    router.setServiceParent(top)
    try:
        verifier = TokenVerifier(settings.tokens, reactor)
    except TokenKeyError as e:
        raise SystemExit(f"dreamraid-game: {e} (dreamraid-admin keys creates the key pair)") from None
    server_id = f"{socket.gethostname()}-{os.getpid()}-{random.SystemRandom().getrandbits(32):08x}"
    presence = Presence(router, server_id, game.presence_ttl, settings.sync.session_ttl)
    queue = SyncQueue(router, reactor, settings.sync.shards, settings.sync.prefix)
    parties = Parties(router, presence, random.SystemRandom(), settings.raids.raid_size)
    raids = settings.raids
    matchmaker = Matchmaker(router, presence, parties, reactor, random.SystemRandom(), raids,
                            longest_life(raids), lambda formed: host.host(formed))
    players = Players(verifier, presence, queue, reactor, game.presence_ttl, game.resume_grace, parties,
                      matchmaker)
    players.setServiceParent(top)
    tables = load_tables(settings.tables.path)
    inventory = Inventory(router, tables, reactor, random.SystemRandom())
    health = Health(reactor, {
        "redis": (router.check, redis.connect_timeout + 2 * redis.command_timeout),
        "kicks": (players.check_kicks, 1.0),
    })
    ranking = Ranking(router, settings.sync.ranking_prefix)
    host = RaidHost(router, presence, players, inventory, ranking, matchmaker, reactor, random.SystemRandom(), raids,
                    f"{game.public_host}:{_tcp_port(game.listen)}")
    host.setServiceParent(top)
    matchmaker.setServiceParent(top)
    UDPServer(game.udp_port, RealtimeProtocol(host, game.public_host), interface=game.udp_interface).setServiceParent(top)
    factory = add_frontends(top, reactor, "dreamraid-game", game, health, GameFactory, players, inventory, ranking,
                            parties, matchmaker, host, tables)
    if factory.metrics is not None:
        _watch_game(factory.metrics, router, players, host, matchmaker)
    return top


def _watch_game(metrics, router, players, host, matchmaker):
    metrics.watch_router(router)
    matchmaker.waited = metrics.histogram("dreamraid_matchmaking_wait_seconds",
                                          "Seconds the tickets of raids formed here waited, by level group", "group")
    queues = metrics.gauge("dreamraid_matchmaking_queue", "Tickets waiting for a raid, by level group (all servers)",
                           ["group"])

    async def matchmaking_queues():
        for group, count in (await matchmaker.queue_lengths()).items():
            queues.labels(str(group)).set(count)
    metrics.every(matchmaking_queues)
    metrics.watch("dreamraid_players", "Authenticated players on this process", "gauge", lambda: len(players))
    metrics.watch("dreamraid_raids", "Raids hosted by this process", "gauge", lambda: len(host))
    metrics.watch("dreamraid_udp_datagrams_received", "Raid datagrams accepted", "counter",
                  lambda: host.counters["received"])
    metrics.watch("dreamraid_udp_datagrams_sent", "Raid datagrams sent", "counter", lambda: host.counters["sent"])
    metrics.watch("dreamraid_udp_datagrams_dropped", "Raid datagrams dropped, by reason", "counter",
                  lambda: {r: host.counters[r] for r in ("forged", "replayed", "unknown", "rate_limited", "bad_position",
                                                           "unsent")}, "reason")


def _tcp_port(listen):
    """The port of a C{tcp:PORT:...} endpoint: where a raid's players are sent."""
    match = re.match(r"tcp:(\d+)", listen)
    if match is None or match.group(1) == "0":
        raise SystemExit(f"dreamraid-game: [game] listen must be tcp:PORT with a fixed port for raid handoffs, "
                         f"not {listen}")
    return int(match.group(1))
