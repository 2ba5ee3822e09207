"""
A raid against the real stack with clients that reconnect by themselves
(DREAMRAID_STACK): a raiding player's TCP connection is aborted hard
mid-fight, the client library comes back within seconds with its
reconnecting and resumed events, and the application's own L{Raid} goes
on: its later hits count, its UDP channel hears the boss again, the
result comes once, the player is paid once, and MariaDB then holds what
the player was told.  Once with the player connected to the raid's host
from the start, once with the player handed over to a host in another
game server process (its live session the handoff ticket).
"""

import random

from twisted.internet import defer, reactor

from dreamraid.client.game import GameClient
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import profile_key
from dreamraid.services.loading import thd_load_profile
from dreamraid.services.sync import MysqlSnapshotStore, SyncWorker
from tests.support import eventually
from tests.test_game import GameServerCase

RAID_SIZE = 3


class CountingClient(GameClient):
    """A game client that notes the pushes that reach it, before it drops repeated ones."""

    def __init__(self, *args, **kwargs):
        self.results_heard = []  # raid ids of every raid_result push, in order
        self.pushes_heard = []  # names of every push, in order
        super().__init__(*args, **kwargs)

    def _pushed(self, message, body):
        self.pushes_heard.append(message.name)
        if message is packets.RAID_RESULT:
            self.results_heard.append(body["raid_id"])
        super()._pushed(message, body)


class RaidReconnectTests(GameServerCase):
    """Players raid with clients that reconnect by themselves; one has its socket aborted mid-fight."""

    timeout = 90

    def options(self):
        return ["--raids-matchmaking-prefix", f"testmm{random.getrandbits(40):x}", "--raids-hit-interval", "0",
                "--raids-raid-size", str(RAID_SIZE), "--game-resume-grace", "30"]

    async def player(self, port):
        """A new user (level 1, no exp) whose client reconnects by itself, logged in on the game server at C{port}."""
        user_id = await self.new_user()
        client = await CountingClient.login(reactor, "127.0.0.1", port, await self.entered_token(user_id))
        self.addCleanup(client.close)
        self.assertTrue(client.reconnect)
        return client

    def watch(self, client):
        """The events C{client} fires, and a Deferred of its next resumed record (failing after 10 s)."""
        events, resumed = [], defer.Deferred()
        client.on("reconnecting", lambda attempt, delay: events.append(("reconnecting", attempt)))
        client.on("reconnect_failed", lambda e: events.append(("reconnect_failed", e)))
        client.on("entered_again", lambda player: events.append(("entered_again",)))

        def back(record):
            events.append(("resumed",))
            resumed.callback(record)
        client.on("resumed", back)
        return events, resumed.addTimeout(10, reactor)

    async def raid_of(self, clients):
        """Queue every client alone: their L{Raid}s (one raid), each fighting."""
        for client in clients:
            await client.queue_raid()
        raids = await gather([client.next_raid() for client in clients])
        for raid in raids:
            self.addCleanup(raid.close)
        self.assertEqual(len({raid.raid_id for raid in raids}), 1)
        fights = await gather([raid.fight() for raid in raids])
        self.assertEqual({fight.hp for fight in fights}, {30})
        return raids

    async def cut_mid_fight_and_clear(self, clients, raids, victim):
        """
        Everyone hits once; C{victim}'s socket is aborted; another player
        hits while it is away; the victim's client comes back by itself in
        under 5 s, its same L{Raid} hears the boss again over a new UDP key
        and its hits count; the boss falls.  The victim's result, once.
        """
        raid = raids[clients.index(victim)]
        others = [r for r in raids if r is not raid]
        before = [await r.hit() for r in raids]
        mine = before[clients.index(victim)].damage
        events, resumed = self.watch(victim)
        old_key, old_connection = raid.channel.key, victim.connection
        heard_again = defer.Deferred()  # the first HP heard once the channel has its new key

        def on_hp(hp, sequence):
            if raid.channel.key != old_key and not heard_again.called:
                heard_again.callback(hp)
        raid.channel.on_hp = on_hp

        cut = reactor.seconds()
        victim.connection.transport.abortConnection()
        away_hit = await others[0].hit()  # while the victim is away
        self.assertLess(away_hit.hp, before[-1].hp)
        record = await resumed
        self.assertLess(reactor.seconds() - cut, 5)
        self.assertEqual(events, [("reconnecting", 1), ("resumed",)])
        self.assertIsNot(victim.connection, old_connection)
        self.assertEqual((record.player.user_id, record.raid_id, record.score), (victim.user_id, raid.raid_id, mine))
        self.assertLessEqual(record.boss_hp, away_hit.hp)
        self.assertGreater(record.seconds_left, 0)

        # The raid's place again: a new key, the UDP channel greeted again, the boss's HP heard under it.
        self.assertLessEqual(await heard_again.addTimeout(10, reactor), away_hit.hp)
        self.assertEqual(raid.channel.dropped, 0)

        # Later hits count: the victim's score grows after the resume.
        later = await raid.hit()
        self.assertGreater(later.damage, 0)
        self.assertLess(later.hp, record.boss_hp)
        mine += later.damage
        turn, hp = 0, later.hp
        while hp > 0:
            hit = await raids[turn % len(raids)].hit()
            if raids[turn % len(raids)] is raid:
                mine += hit.damage
            hp, turn = hit.hp, turn + 1

        outcomes = await gather([r.result() for r in raids])
        result = outcomes[raids.index(raid)]
        self.assertEqual({(o.cleared, o.team_score) for o in outcomes}, {(True, 30)})
        self.assertEqual((result.score, result.exp_gained, result.best), (mine, mine, mine))
        self.assertEqual(sum(o.score for o in outcomes), 30)
        self.assertEqual(raid.hp, 0)  # the channel heard the boss fall
        for other in others:
            self.assertEqual(other.hp, 0)
        return result

    async def paid_once_and_stored(self, victim, result):
        """
        The victim was paid once (its live exp is the one raid's); after its
        logout and the sync, MariaDB holds what it was told: level, exp,
        best score and the drops where the result said they went.
        """
        exp, best = await self.router.execute("HMGET", profile_key(victim.user_id), "exp", "best")
        self.assertEqual((int(exp), int(best)), (result.exp_gained, result.best))
        self.assertEqual(victim.results_heard, [result.raid_id])
        await victim.logout()
        worker = SyncWorker(self.router, self.queue, self.live, MysqlSnapshotStore(self.database), reactor,
                            self.settings.sync)
        worker.startService()
        self.addCleanup(worker.stopService)
        await eventually(lambda: _true(worker.counters["evicted"] >= 1))
        stored = await self.database.pool.runWithConnection(thd_load_profile, victim.user_id)
        self.assertEqual((stored.level, stored.exp, stored.best), (result.level, result.exp_gained, result.best))
        self.assertTrue(result.changed)
        for item in result.changed:
            kept = stored.items.get((item.tab, item.slot))
            self.assertEqual((kept.code, kept.enhancement, kept.count), (item.item_code, item.enhancement, item.count))
        self.assertEqual(victim.results_heard, [result.raid_id])  # and no second result came before the logout

    async def test_a_player_on_the_host_cut_mid_fight_comes_back_by_itself(self):
        """Three players on one game server (the host); one's socket is aborted mid-fight and its client resumes."""
        server = await self.game_server(*self.options())
        clients = [await self.player(server.port) for _ in range(RAID_SIZE)]
        raids = await self.raid_of(clients)
        victim = clients[1]
        self.assertIsNone(victim.ticket)  # its live session is its login token
        result = await self.cut_mid_fight_and_clear(clients, raids, victim)
        self.assertEqual(server.part("RaidHost").counters["forged"], 0)
        await self.paid_once_and_stored(victim, result)

    def held_away(self, client):
        """
        C{client}'s reconnect, once its backoff is over, waits to connect
        until the test fires the Deferred returned: its player stays away
        for as long as the test needs, however slow the machine.
        """
        gate, connect = defer.Deferred(), client._connect

        async def held(host, port):
            await gate
            return await connect(host, port)
        client._connect = lambda host, port: defer.ensureDeferred(held(host, port))
        return gate

    async def away(self, server, client):
        """Once the in-process C{server} holds C{client}'s player away (it has seen the drop)."""
        players = server.part("Players")
        await eventually(lambda: _true(players.player_of(client.user_id).away))

    async def test_a_raid_cleared_while_a_player_is_away_is_told_to_it_once_back(self):
        """
        The others clear the raid while the cut player is away: its result
        is kept for it, and comes once its client is back by itself (the
        resumed record names no raid: it is over); the player is paid once
        for the hit it made, and MariaDB holds what it was told.
        """
        server = await self.game_server(*self.options())
        clients = [await self.player(server.port) for _ in range(RAID_SIZE)]
        raids = await self.raid_of(clients)
        victim, raid = clients[1], raids[1]
        mine = (await raid.hit()).damage
        events, resumed = self.watch(victim)
        gate = self.held_away(victim)
        victim.connection.transport.abortConnection()
        await self.away(server, victim)
        hp, turn, others = 1, 0, [raids[0], raids[2]]
        while hp > 0:
            hp, turn = (await others[turn % 2].hit()).hp, turn + 1
        for other in others:
            self.assertTrue((await other.result()).cleared)
        self.assertFalse(resumed.called)  # the raid ended while the player was away
        released, heard_away = reactor.seconds(), len(victim.pushes_heard)
        gate.callback(None)
        record = await resumed
        self.assertLess(reactor.seconds() - released, 5)
        self.assertEqual(events, [("reconnecting", 1), ("resumed",)])
        self.assertEqual((record.raid_id, record.score), ("", 0))
        result = await defer.ensureDeferred(raid.result()).addTimeout(10, reactor)
        self.assertEqual((result.cleared, result.team_score, result.score, result.exp_gained), (True, 30, mine, mine))
        self.assertEqual(victim.pushes_heard[heard_away:].count(packets.RAID_RESULT.name), 1)  # told once back
        self.assertNotIn(packets.RAID_RESULT.name, victim.pushes_heard[:heard_away])
        await self.paid_once_and_stored(victim, result)

    async def test_a_fight_begun_while_a_player_is_away_reaches_its_raid_once_back(self):
        """
        The fight begins while a player who readied is away (the last
        player readies then): once its client is back by itself, the same
        Raid's fight() gets the fight as it is, its hits count, and it is
        paid once.
        """
        server = await self.game_server(*self.options(), "--raids-ready-grace", "60")
        clients = [await self.player(server.port) for _ in range(RAID_SIZE)]
        for client in clients:
            await client.queue_raid()
        raids = await gather([client.next_raid() for client in clients[:2]])
        for raid in raids:
            self.addCleanup(raid.close)
        late = clients[2]
        found = await late.next_push(packets.RAID_FOUND.name)
        victim, raid = clients[1], raids[1]
        events, resumed = self.watch(victim)
        gate = self.held_away(victim)
        victim.connection.transport.abortConnection()
        await self.away(server, victim)
        await late.request(packets.RAID_READY, {"raid_id": found["raid_id"]})
        first_hit = await raids[0].hit()  # the fight is on, the victim away
        self.assertFalse(resumed.called)
        heard_away = len(victim.pushes_heard)
        self.assertNotIn(packets.RAID_FIGHT.name, victim.pushes_heard)
        gate.callback(None)
        await resumed
        fight = await defer.ensureDeferred(raid.fight()).addTimeout(10, reactor)
        # Its one raid_fight came on the connection opened after the gate: told again once it resumed.
        self.assertEqual(victim.pushes_heard[heard_away:].count(packets.RAID_FIGHT.name), 1)
        self.assertEqual(fight.hp, first_hit.hp)
        self.assertGreater(fight.deadline, reactor.seconds())
        mine, hp = 0, fight.hp
        while hp > 0:
            hit = await raid.hit()
            mine, hp = mine + hit.damage, hit.hp
        result = await defer.ensureDeferred(raid.result()).addTimeout(10, reactor)
        self.assertEqual((result.cleared, result.score, result.exp_gained), (True, mine, mine))
        await self.paid_once_and_stored(victim, result)

    async def test_a_player_moved_to_another_process_cut_mid_fight_comes_back_by_itself(self):
        """
        Two game server processes, players on both: the raid is hosted on
        one, and a player who logged in on the other was handed over to it
        (its live session is now the handoff ticket).  That player's socket
        on the host is aborted mid-fight; its client resumes there with the
        ticket by itself and the raid goes on.
        """
        options = self.options()
        first, second = await gather([self.game_process(*options), self.game_process(*options)])
        clients = [await self.player(port) for port in (first.port, first.port, second.port)]
        logged_in = [client.address for client in clients]
        raids = await self.raid_of(clients)
        host = {client.address for client in clients}
        self.assertEqual(len(host), 1)
        movers = [c for c, address in zip(clients, logged_in) if c.address != address]
        self.assertTrue(movers)
        victim = movers[0]
        self.assertIsNotNone(victim.ticket)
        result = await self.cut_mid_fight_and_clear(clients, raids, victim)
        self.assertEqual(victim.address, host.pop())
        await self.paid_once_and_stored(victim, result)


async def _true(value):
    return value
