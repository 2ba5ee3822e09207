"""
Whole raids over real TCP and UDP against the real Redis Cluster: two
players cleared and timed out on one game server, a party of two and two
solo players raiding as four, forged and replayed datagrams dropped and
counted, positions relayed, the HP sequence never going backwards at a
client, a player who drops still paid, a player whose socket is cut
mid-fight resuming and paid once (MariaDB then agreeing), one cut on the
host resuming on the other process and sent back, a resume after the
grace refused; two game server processes, the
player on the other one handed over to the host by the client library, the
raid completed, results and ranking right; and a host killed mid-raid, its
players freed once its lease lapses.
"""

import json
import random

from twisted.internet import reactor

from dreamraid.client import RemoteError
from dreamraid.client.game import GameClient
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import STILL_ONLINE, profile_key, session_key
from dreamraid.services.loading import thd_load_profile
from dreamraid.services.matchmaking import GROUPS, matchmaking_keys
from dreamraid.services.presence import handoff_key
from dreamraid.services.sync import MysqlSnapshotStore, SyncWorker
from tests.support import eventually, greeted_channels
from tests.test_game import GameServerCase


class RaidPlayTests(GameServerCase):

    timeout = 90

    def raid_options(self, *extra):
        return ["--raids-matchmaking-prefix", f"testmm{random.getrandbits(40):x}", "--raids-hit-interval", "0",
                *extra]

    async def player(self, server):
        """
        A new user logged in on C{server} through the client library:
        C{(client, user_id)}.  It does not reconnect by itself: these tests
        cut connections and resume by hand, to check the server's side.
        """
        user_id = await self.new_user()
        client = await GameClient.login(reactor, "127.0.0.1", server.port, await self.entered_token(user_id),
                                        reconnect=False)
        self.addCleanup(client.close)
        return client, user_id

    async def matched(self, clients):
        """Queue every client; their raid_found pushes (after any move), and their UDP channels, hello said."""
        for client in clients:
            await client.request(packets.QUEUE_RAID, {})
        found = [await client.next_push("raid_found") for client in clients]
        channels, hp = await greeted_channels(self, found)
        self.assertEqual(hp, [30] * len(channels))
        return found, channels

    async def fight(self, clients, raid_id):
        """Everyone ready, then hit in turn until the boss falls; the hit replies."""
        for client in clients:
            await client.request(packets.RAID_READY, {"raid_id": raid_id})
        fights = [await client.next_push("raid_fight") for client in clients]
        self.assertEqual({(f["hp"], f["sequence"]) for f in fights}, {(30, 0)})
        return await self.hit_until_down(clients, raid_id)

    async def two_fighting(self, server):
        """
        Two players of C{server} matched and ready, the fight on:
        C{((a, a's id), (b, b's id), their raid_found pushes)}.
        """
        (a, a_id), (b, b_id) = [await self.player(server) for _ in range(2)]
        found, _ = await self.matched([a, b])
        raid_id = found[0]["raid_id"]
        for client in (a, b):
            await client.request(packets.RAID_READY, {"raid_id": raid_id})
        return (a, a_id), (b, b_id), found

    async def hit_until_down(self, clients, raid_id):
        """C{clients} hit in turn, the first first, until the boss falls; the hit replies, in order."""
        hits, turn = [], 0
        while not hits or hits[-1]["hp"] > 0:
            _, hit = await clients[turn % len(clients)].request(packets.RAID_HIT, {"raid_id": raid_id})
            hits.append(hit)
            turn += 1
        return hits

    async def test_two_players_clear_a_raid(self):
        """Queue, UDP hello, ready, hits to 0 HP: both paid by their score, the board updated, free to queue again."""
        server = await self.game_server(*self.raid_options())
        host = server.part("RaidHost")
        (a, a_id), (b, b_id) = [await self.player(server) for _ in range(2)]
        found, channels = await self.matched([a, b])
        raid_id = found[0]["raid_id"]
        self.assertEqual(found[0]["host"], f"127.0.0.1:{server.port}")

        # Forged (wrong key) and replayed (a sequence already used) datagrams are dropped and counted.
        forged = packets.seal_datagram(b"x" * 16, packets.UDP_HELLO, channels[0].number, 0, 99, {})
        replayed = packets.seal_datagram(channels[0].key, packets.POSITION, channels[0].number, 0, 1,
                                         {"x": 9.0, "y": 9.0, "state": 9})
        for datagram in (forged, replayed):
            channels[0].transport.write(datagram, channels[0].server)
        channels[0].position(1.5, -2.0, 3)
        await eventually(lambda: _true(host.counters["forged"] >= 1 and host.counters["replayed"] >= 1))
        await eventually(lambda: _true(channels[1].positions.get(0) == (1.5, -2.0, 3)))

        hits = await self.fight([a, b], raid_id)
        self.assertEqual(sum(h["damage"] for h in hits), 30)
        self.assertEqual([h["sequence"] for h in hits], list(range(1, len(hits) + 1)))
        results = {user_id: await client.next_push("raid_result") for client, user_id in ((a, a_id), (b, b_id))}
        scores = {user_id: r["score"] for user_id, r in results.items()}
        self.assertEqual(sum(scores.values()), 30)
        for user_id, result in results.items():
            self.assertEqual((result["cleared"], result["team_score"], result["exp_gained"], result["best"]),
                             (True, 30, scores[user_id], scores[user_id]))
            self.assertIn(301, [item["item_code"] for item in result["changed"]])
            self.assertEqual(int(await self.router.execute("HGET", profile_key(user_id), "exp")), scores[user_id])
        for channel in channels:
            self.assertEqual(await channel.when_hp(lambda hp: hp == 0), 0)
            self.assertEqual(channel.hp_sequence, len(hits))
        _, rank = await a.request(packets.MY_RANK, {})
        self.assertEqual(rank["score"], scores[a_id])
        await a.request(packets.QUEUE_RAID, {})

    async def test_a_party_of_two_and_two_solos_raid_as_four(self):
        """raid_size 4: a party queued by its leader plus two solo players form one raid, cleared together."""
        server = await self.game_server(*self.raid_options("--raids-raid-size", "4"))
        (leader, _), (member, _), (solo1, _), (solo2, _) = [await self.player(server) for _ in range(4)]
        _, party = await leader.request(packets.CREATE_PARTY, {})
        await member.request(packets.JOIN_PARTY, {"code": party["code"]})
        for client in (leader, solo1, solo2):
            await client.request(packets.QUEUE_RAID, {})
        clients = [leader, member, solo1, solo2]
        found = [await client.next_push("raid_found") for client in clients]
        self.assertEqual(len({f["raid_id"] for f in found}), 1)
        self.assertEqual(sorted(f["member"] for f in found), [0, 1, 2, 3])
        hits = await self.fight(clients, found[0]["raid_id"])
        self.assertEqual(sum(h["damage"] for h in hits), 30)
        results = [await client.next_push("raid_result") for client in clients]
        self.assertEqual({(r["cleared"], r["team_score"]) for r in results}, {(True, 30)})

    async def test_a_player_who_drops_is_paid_at_the_end(self):
        """B hits once and drops; A clears alone; B's live data got B's exp and best score."""
        server = await self.game_server(*self.raid_options())
        (a, a_id), (b, b_id), found = await self.two_fighting(server)
        raid_id = found[0]["raid_id"]
        _, hit = await b.request(packets.RAID_HIT, {"raid_id": raid_id})
        b.connection.transport.loseConnection()
        await b.connection.closed
        hp = hit["hp"]
        while hp > 0:
            _, hit = await a.request(packets.RAID_HIT, {"raid_id": raid_id})
            hp = hit["hp"]
        result = await a.next_push("raid_result")
        self.assertEqual((result["cleared"], result["score"]), (True, 30 - 1))
        exp, best = await self.router.execute("HMGET", profile_key(b_id), "exp", "best")
        self.assertEqual((int(exp), int(best)), (1, 1))

    async def test_a_player_cut_mid_fight_resumes_and_is_paid_once(self):
        """
        B's socket is aborted mid-fight (no logout): B is away, not gone.
        A hits while B is away; B resumes within seconds and is told the
        raid as it is now (HP, time left, own score), gets its place again
        (a new raid_found, a new UDP key) and greets the UDP channel again;
        the fight goes on, B's later hits count, B is paid once, and after
        B's logout MariaDB holds what B was told.
        """
        server = await self.game_server(*self.raid_options("--game-resume-grace", "30"))
        host = server.part("RaidHost")
        (a, a_id), (b, b_id), found = await self.two_fighting(server)
        raid_id = found[0]["raid_id"]
        _, b_hit = await b.request(packets.RAID_HIT, {"raid_id": raid_id})
        cut = reactor.seconds()
        b.connection.transport.abortConnection()
        await b.connection.closed
        _, a_hit = await a.request(packets.RAID_HIT, {"raid_id": raid_id})  # while B is away
        self.assertLess(a_hit["hp"], b_hit["hp"])

        resumed = await b.resume()
        self.assertLess(reactor.seconds() - cut, 5)
        self.assertEqual((resumed["user_id"], resumed["raid_id"], resumed["boss_hp"], resumed["score"]),
                         (b_id, raid_id, a_hit["hp"], b_hit["damage"]))
        self.assertGreater(resumed["ms_left"], 0)
        again = await b.next_push("raid_found")
        self.assertEqual((again["raid_id"], again["member"]), (raid_id, found[1]["member"]))
        self.assertNotEqual(again["key"], found[1]["key"])
        [channel], [hp] = await greeted_channels(self, [again])
        self.assertEqual(hp, a_hit["hp"])

        b_score = b_hit["damage"] + sum(hit["damage"] for hit in (await self.hit_until_down([b, a], raid_id))[0::2])
        self.assertEqual(await channel.when_hp(lambda hp: hp == 0), 0)
        result = await b.next_push("raid_result")
        self.assertEqual((result["cleared"], result["score"], result["exp_gained"]), (True, b_score, b_score))
        exp, best = await self.router.execute("HMGET", profile_key(b_id), "exp", "best")
        self.assertEqual((int(exp), int(best)), (b_score, b_score))  # paid once
        self.assertEqual(host.counters["forged"], 0)

        await b.logout()
        worker = SyncWorker(self.router, self.queue, self.live, MysqlSnapshotStore(self.database), reactor,
                            self.settings.sync)
        worker.startService()
        self.addCleanup(worker.stopService)
        await eventually(lambda: _true(worker.counters["evicted"] >= 1))
        stored = await self.database.pool.runWithConnection(thd_load_profile, b_id)
        self.assertEqual((stored.level, stored.exp, stored.best), (result["level"], b_score, b_score))

    async def test_players_on_the_host_get_no_ticket_and_their_leave_does_not_wait_for_one(self):
        """
        Both players are on the raid's host: their raid_found carries no
        handoff ticket and none waits in Redis.  B is cut, resumes there
        (told again, still no ticket), and is cut again: B's leave runs when
        the grace ends, not a ticket's 30 s later.
        """
        server = await self.game_server(*self.raid_options("--game-resume-grace", "3"))
        (a, a_id), (b, b_id) = [await self.player(server) for _ in range(2)]
        found, _ = await self.matched([a, b])
        self.assertEqual([f["ticket"] for f in found], ["", ""])
        self.assertEqual([await self.router.execute("EXISTS", handoff_key(u)) for u in (a_id, b_id)], [0, 0])
        b.connection.transport.abortConnection()
        await b.connection.closed
        await b.resume()
        again = await b.next_push("raid_found")
        self.assertEqual((again["raid_id"], again["ticket"]), (found[1]["raid_id"], ""))
        self.assertEqual(await self.router.execute("EXISTS", handoff_key(b_id)), 0)
        b.connection.transport.abortConnection()
        await b.connection.closed
        cut = reactor.seconds()
        await eventually(lambda: self.router.execute("EXISTS", session_key(b_id)).addCallback(lambda n: n == 0),
                         timeout=20)
        self.assertLess(reactor.seconds() - cut, 3 + 10)

    async def test_a_player_away_when_the_raid_ends_hears_its_result_on_resume(self):
        """
        B hits and is cut; A clears the raid while B is away (B's result
        is told to nobody connected).  B resumes after the end: the reply
        names no raid (it is over and its players free), and B hears the
        raid's result, with its own score, once.
        """
        server = await self.game_server(*self.raid_options("--game-resume-grace", "30"))
        (a, a_id), (b, b_id), found = await self.two_fighting(server)
        raid_id = found[0]["raid_id"]
        _, b_hit = await b.request(packets.RAID_HIT, {"raid_id": raid_id})
        b.connection.transport.abortConnection()
        await b.connection.closed
        await self.hit_until_down([a], raid_id)
        await a.next_push("raid_result")
        resumed = await b.resume()
        self.assertEqual(resumed["raid_id"], "")
        result = await b.next_push("raid_result").addTimeout(10, reactor)
        self.assertEqual((result["raid_id"], result["cleared"], result["score"]), (raid_id, True, b_hit["damage"]))

    async def test_a_resume_after_the_grace_is_refused(self):
        """Away past the grace: the leave ran once, and a resume gets RESUME_EXPIRED (enter the world again)."""
        server = await self.game_server("--game-resume-grace", "0.5")
        a, a_id = await self.player(server)
        a.connection.transport.abortConnection()
        await a.connection.closed
        await eventually(lambda: self.router.execute("EXISTS", session_key(a_id)).addCallback(lambda n: n == 0))
        with self.assertRaises(RemoteError) as raised:
            await a.resume()
        self.assertEqual(raised.exception.code, ErrorCode.RESUME_EXPIRED)

    async def test_time_out_fails_with_scores_zero_and_a_dropped_player_stays(self):
        """Nobody clears in time: every score 0, nothing paid; a player who dropped stays live until the end."""
        server = await self.game_server(*self.raid_options("--raids-time-limit", "1", "--raids-ready-grace", "0"))
        (a, a_id), (b, b_id) = [await self.player(server) for _ in range(2)]
        found, _ = await self.matched([a, b])
        fight = await a.next_push("raid_fight")
        _, hit = await a.request(packets.RAID_HIT, {"raid_id": found[0]["raid_id"]})
        self.assertEqual(hit["hp"], fight["hp"] - hit["damage"])
        b.connection.transport.loseConnection()
        await b.connection.closed
        version = await self.router.execute("HGET", profile_key(b_id), "version")
        self.assertEqual(await self.live.evict(b_id, int(version)), STILL_ONLINE)
        result = await a.next_push("raid_result")
        self.assertEqual((result["cleared"], result["score"], result["team_score"], result["exp_gained"]),
                         (False, 0, 0, 0))

    async def test_players_on_two_processes_handed_over_to_the_host(self):
        """The player on the other process is moved to the host by the client library; the raid completes there."""
        options = self.raid_options()
        first, second = await gather([self.game_process(*options), self.game_process(*options)])
        (a, _), (b, _) = await self.player(first), await self.player(second)
        old = [a.connection, b.connection]
        found, _ = await self.matched([a, b])
        host = found[0]["host"]
        self.assertEqual({f"{c.address[0]}:{c.address[1]}" for c in (a, b)}, {host})
        moved = [connection for connection, client in zip(old, (a, b)) if client.connection is not connection]
        self.assertEqual(len(moved), 1)
        await moved[0].closed
        await self.fight([a, b], found[0]["raid_id"])
        results = [await client.next_push("raid_result") for client in (a, b)]
        self.assertEqual([r["cleared"] for r in results], [True, True])
        self.assertEqual(sum(r["score"] for r in results), 30)
        for client, result in zip((a, b), results):
            _, rank = await client.request(packets.MY_RANK, {})
            self.assertEqual(rank["score"], result["score"])

    async def test_a_moved_player_cut_on_the_host_resumes_on_the_other_process(self):
        """
        Two processes; the player handed over to the raid's host (its live
        session is now the handoff ticket) has its socket cut there and
        resumes on the other process with that ticket: the other process
        asks the host to give the player its place again, the client moves
        back to the host by itself with the new ticket, greets UDP again,
        and its later hits count.
        """
        options = self.raid_options("--game-resume-grace", "30")
        first, second = await gather([self.game_process(*options), self.game_process(*options)])
        (a, _), (b, _) = await self.player(first), await self.player(second)
        found, _ = await self.matched([a, b])
        raid_id, host = found[0]["raid_id"], found[0]["host"]
        mover = next(c for c in (a, b) if c.ticket is not None)  # the one handed over to the host
        other = b if mover is a else a
        elsewhere = next(s for s in (first, second) if f"127.0.0.1:{s.port}" != host)
        for client in (a, b):
            await client.request(packets.RAID_READY, {"raid_id": raid_id})
        _, first_hit = await mover.request(packets.RAID_HIT, {"raid_id": raid_id})
        mover.connection.transport.abortConnection()
        await mover.connection.closed

        # The other process reads the raid from the host's checkpoint (at most a second old): wait for the hit in it.
        checkpoints = matchmaking_keys(options[1])[GROUPS + 7]

        async def checkpointed():
            state = await self.router.execute("HGET", checkpoints, raid_id)
            return state is not None and json.loads(state)["hp"] == first_hit["hp"]
        await eventually(checkpointed, timeout=10)
        resumed = await mover.resume("127.0.0.1", elsewhere.port)
        self.assertEqual((resumed["raid_id"], resumed["boss_hp"], resumed["score"]),
                         (raid_id, first_hit["hp"], first_hit["damage"]))
        again = await mover.next_push("raid_found")  # delivered once the client moved back to the host
        self.assertEqual(f"{mover.address[0]}:{mover.address[1]}", host)
        self.assertNotEqual(again["key"], next(f["key"] for f in found if f["member"] == again["member"]))
        [channel], [hp] = await greeted_channels(self, [again])
        self.assertEqual(hp, first_hit["hp"])
        score = first_hit["damage"] + sum(
            hit["damage"] for hit in (await self.hit_until_down([mover, other], raid_id))[0::2])
        result = await mover.next_push("raid_result")
        self.assertEqual((result["cleared"], result["score"]), (True, score))

    async def test_host_killed_mid_raid_releases_its_players(self):
        """The host dies mid-raid: another process ends the raid once the lease lapses, and the players may queue."""
        options = self.raid_options("--raids-host-lease", "2", "--raids-ready-grace", "0")
        first = await self.game_process(*options)
        (a, a_id), (b, b_id) = [await self.player(first) for _ in range(2)]
        found, _ = await self.matched([a, b])
        await a.next_push("raid_fight")
        await a.request(packets.RAID_HIT, {"raid_id": found[0]["raid_id"]})
        second = await self.game_process(*options)
        await first.kill()
        again = await GameClient.login(reactor, "127.0.0.1", second.port, await self.entered_token(a_id))
        self.addCleanup(again.close)

        async def queued():
            try:
                await again.request(packets.QUEUE_RAID, {})
            except RemoteError as e:
                self.assertEqual(e.code, ErrorCode.ALREADY_QUEUED)
                return False
            return True

        # Well before the raid's longest life (160 s) would free them.
        await eventually(queued, timeout=20)


async def _true(value):
    return value
