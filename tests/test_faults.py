"""
Faults injected into the real stack while players play through the client
library: MariaDB stopped while players log out, the session server killed
-9 with sync jobs pending, a game server killed -9 mid-raid, a Redis master
killed -9 under inventory and raid traffic.  Each test ends with the same
audit: once the players have logged out and the sync queue has drained,
MySQL (and the ranking board) hold exactly what the servers told them.
"""

import itertools
import random
import signal
from typing import NamedTuple

from twisted.internet import defer, reactor, task, threads

from dreamraid import game_tap, session_tap
from dreamraid.client import ConnectionClosed, GameClient, RemoteError, SessionClient, play
from dreamraid.errors import ErrorCode
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.database import MYSQL_UNAVAILABLE, connect
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import CONSUMABLES, EQUIPMENT, Item, profile_key
from dreamraid.services.loading import thd_load_profile
from dreamraid.services.matchmaking import matchmaking_keys
from dreamraid.services.ranking import Ranking
from dreamraid.services.rediscluster import RedisClusterError
from dreamraid.services.sync import GROUP
from dreamraid.tables import load_tables
from tests import cluster
from tests.storage import TEST_DATABASE, SessionServicesCase
from tests.support import RunningServer, ServerProcess, eventually, make_settings, stack

PASSWORD = "correct horse"
SWORD, POTION = 101, 201
TABLES = load_tables(make_settings().tables.path)
# A request answered with one of these may or may not have been carried out
# (a store outage is UNAVAILABLE; INTERNAL_ERROR would be a bug, and fails).
OUTCOME_UNKNOWN = (ErrorCode.UNAVAILABLE,)


class State(NamedTuple):
    """A player's durable data: level, exp, best raid score, and every occupied slot C{{(tab, slot): Item}}."""

    level: int
    exp: int
    best: int
    items: dict


def state_of(profile):
    return State(profile.level, profile.exp, profile.best, profile.items)


def _with(items, changed):
    """C{items} after the slot changes a reply listed (item code 0: a slot emptied)."""
    items = dict(items)
    for c in changed:
        if c.item_code:
            items[c.tab, c.slot] = Item(c.item_code, c.enhancement, c.count)
        else:
            items.pop((c.tab, c.slot), None)
    return items


def _slots_told(state, changed):
    return state._replace(items=_with(state.items, changed))


def _enhanced(state, slot, enhancement):
    return state._replace(items={**state.items, (EQUIPMENT, slot): state.items[EQUIPMENT, slot]._replace(
        enhancement=enhancement)})


def _enhanced_once(state, slot):
    """After a successful enhancement (a failed one leaves the state as it was)."""
    enhancement = state.items[EQUIPMENT, slot].enhancement
    return [_enhanced(state, slot, enhancement + 1)] if enhancement < TABLES.max_enhancement else []


def _swapped(state, a, b):
    """After moving equipment slot C{a} to C{b}: equipment never merges, so the two swap."""
    items = dict(state.items)
    first, second = items.pop((EQUIPMENT, a), None), items.pop((EQUIPMENT, b), None)
    if first:
        items[EQUIPMENT, b] = first
    if second:
        items[EQUIPMENT, a] = second
    return [state._replace(items=items)] if first else []


def _used(state, slot):
    item = state.items.get((CONSUMABLES, slot))
    if item is None:
        return []
    items = dict(state.items)
    if item.count > 1:
        items[CONSUMABLES, slot] = item._replace(count=item.count - 1)
    else:
        del items[CONSUMABLES, slot]
    return [state._replace(items=items)]


def _added(items, code, count):
    """C{items} after C{count} of C{code} came in: stacks of it topped up first, then the lowest free slots."""
    kind, items = TABLES.items[code], dict(items)
    for (tab, slot), item in sorted(items.items()):
        if count > 0 and kind.stack > 1 and tab == kind.tab and item.code == code and item.count < kind.stack:
            put = min(kind.stack - item.count, count)
            items[tab, slot], count = item._replace(count=item.count + put), count - put
    for slot in range(TABLES.slots):
        if count > 0 and (kind.tab, slot) not in items:
            put = min(kind.stack, count)
            items[kind.tab, slot], count = Item(code, 0, put), count - put
    return items


def _paid(state, score):
    """The states a cleared raid's pay for C{score} may leave: exp, level-ups, best score, each roll of its drops."""
    exp, level = state.exp + score * TABLES.raid_exp_per_score, state.level
    while level < TABLES.max_level and exp >= TABLES.exp_to_advance[level]:
        level += 1
    afters = []
    for rolled in itertools.product(*[(True,) if d.percent >= 100 else (False, True) for d in TABLES.raid_drops]):
        items = state.items
        for drop in itertools.compress(TABLES.raid_drops, rolled):
            items = _added(items, drop.item, drop.count)
        afters.append(State(level, exp, max(state.best, score), items))
    return afters


class OutcomeHidden(Exception):
    """The fault hid a request's outcome (an error reply or a lost connection): it may or may not have happened."""


class Player:
    """
    A player's game client and the ledger of what the servers told them:
    C{told} is the state MySQL must end up holding.  While a fault hides a
    request's outcome, C{hidden} lists the states it may have left (the one
    before it, the ones after it) until L{settle} picks the one re-read.
    """

    def __init__(self, client, name):
        self.client = client
        self.name = name
        self.user_id = client.user_id
        self.told = State(client.player.level, client.player.exp, 0, {})
        self.hidden = None
        self.settled = 0
        self.logged_out = False

    async def _ask(self, request, told, afters=None):
        """
        Await C{request}; C{told(state, reply)} is the state its reply says.
        C{afters(state)} are the states it may leave if a fault hides its
        outcome; without it, a hidden outcome fails the test.
        """
        before = self.told
        try:
            reply = await request
        except RemoteError as e:
            if afters is None or e.code not in OUTCOME_UNKNOWN:
                raise
            hidden_by = e
        except (ConnectionClosed, defer.TimeoutError) as e:
            if afters is None:
                raise
            hidden_by = e
        else:
            self.told = told(before, reply)
            return reply
        self.hidden = [before, *afters(before)]
        raise OutcomeHidden(f"{self.name}: {hidden_by!r}")

    def settle(self, found):
        """
        The state re-read after the fault must be one a hidden request may
        have left, and is then the truth; whether the request happened.
        """
        if found not in self.hidden:
            raise AssertionError(f"{self.name}: after a request whose outcome was hidden the state is {found}, "
                                 f"none of {self.hidden}")
        happened = found != self.hidden[0]
        self.told, self.hidden = found, None
        self.settled += 1
        return happened

    def hunt(self, monster):
        return self._ask(self.client.hunt(monster), lambda s, h: s._replace(
            level=h.level, exp=h.exp, items=_with(s.items, h.changed)))

    def grant(self, code, count):
        return self._ask(self.client.grant(code, count), _slots_told)

    def enhance(self, slot):
        return self._ask(self.client.enhance(slot), lambda s, e: _enhanced(s, slot, e.enhancement),
                         lambda s: _enhanced_once(s, slot))

    def swap(self, a, b):
        """Move equipment slot C{a} to C{b}, swapping with what is there."""
        return self._ask(self.client.move_item(EQUIPMENT, a, b), _slots_told, lambda s: _swapped(s, a, b))

    def use(self, slot):
        return self._ask(self.client.use_item(slot), _slots_told, lambda s: _used(s, slot))

    def raid_paid(self, result):
        """A cleared raid's result, which says what it paid."""
        self.told = State(result.level, self.told.exp + result.exp_gained, result.best,
                          _with(self.told.items, result.changed))

    def raid_result_hidden(self, score):
        """A raid cleared with C{score} for this player, its result not told: paid or not, as re-read later."""
        self.hidden = [self.told, *_paid(self.told, score)]

    async def logout(self):
        await self.client.logout()
        self.logged_out = True

    async def play_a_little(self):
        """A hunt (unless cooling down), a sword enhanced and put in slot 0, potions granted and one used."""
        try:
            await self.hunt(1 + self.user_id % 5)
        except RemoteError as e:
            if e.code != ErrorCode.HUNT_COOLDOWN:
                raise
        [sword] = await self.grant(SWORD, 1)
        await self.enhance(sword.slot)
        potions = await self.grant(POTION, 3)
        await self.use(potions[-1].slot)
        await self.swap(sword.slot, 0)


def _thd_stored(user_id):
    with connect(make_settings().mysql, TEST_DATABASE) as connection:
        return thd_load_profile(connection, user_id)


def stored(user_id):
    """A Deferred of the user's L{Profile} as MySQL holds it (read on a connection of its own)."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), _thd_stored, user_id)


class RowLocks:
    """Users' rows locked (C{FOR UPDATE}) by a MySQL transaction of the test's, as a long transaction would."""

    def __init__(self):
        self._connection = None

    async def take(self, user_ids):
        def thd():
            connection = connect(make_settings().mysql, TEST_DATABASE)
            with connection.cursor() as cursor:
                cursor.execute("SELECT id FROM users WHERE id IN %s FOR UPDATE", (list(user_ids),))
            return connection
        self._connection = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd)

    def release(self):
        connection, self._connection = self._connection, None
        if connection is None:
            return defer.succeed(None)

        def thd():
            connection.rollback()
            connection.close()
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd)


class FaultCase(SessionServicesCase):
    """Servers on this test's keys, players who play through the client library, and the audit."""

    async def setUp(self):
        await super().setUp()
        if set(self.router.masters()) != set(cluster.ORIGINAL_MASTERS):
            # A run stopped mid-failover (or a hand restart) left replicas leading: these tests kill chosen masters.
            await cluster.restore()
            await self.router.refresh()
        await self.router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))
        # The matchmaking stays off both masters the tests kill (ORIGINAL_MASTERS
        # [2] and [1]), the ranking board off the one killed as a raid ends
        # ([1]): a fault reaches players' data only.  (The board's two keys are
        # never both on [0]: their CRC16s differ by a constant.)
        self.matchmaking = self.prefix_away_from("testmm", matchmaking_keys, cluster.ORIGINAL_MASTERS[1:])
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(self.matchmaking)]))
        self.ranking = Ranking(self.router, self.prefix_away_from(
            "testranking", lambda prefix: [f"{prefix}:board", f"{prefix}:names"], cluster.ORIGINAL_MASTERS[1:2]))

    def prefix_away_from(self, stem, keys, masters):
        """A new prefix C{stem...} none of whose C{keys(prefix)} is served by one of C{masters}."""
        for _ in range(1000):
            prefix = f"{stem}{random.getrandbits(40):x}"
            if not {self.router.node_for(key) for key in keys(prefix)} & set(masters):
                return prefix
        raise AssertionError(f"no {stem} prefix keeps its keys off {masters}: is the cluster in its original layout?")

    def shared_options(self):
        return ["--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
                "--sync-ranking-prefix", self.ranking.board.rsplit(":", 1)[0]]

    def game_options(self, *extra):
        return [*self.shared_options(), "--game-dev-grant", "on", "--raids-hit-interval", "0",
                "--raids-match-interval", "0.1", "--raids-matchmaking-prefix", self.matchmaking, *extra]

    def session_options(self, game_port, *extra):
        return [*self.shared_options(), "--tokens-private-key", self.private_key,
                "--mysql-database", self.settings.mysql.database, "--accounts-scrypt-n", "1024",
                "--session-game-servers", f"127.0.0.1:{game_port}",
                "--sync-retry-backoff", "0.1", "--sync-retry-backoff-max", "1", *extra]

    async def game_server(self, *extra):
        """A game server in this process."""
        server = RunningServer(game_tap, "game", self.game_options(*extra)).start(self)
        await server.part("Players").when_listening()
        return server

    def session_server(self, game_port, *extra):
        """A session server in this process, sending players to the game server at C{game_port}."""
        return RunningServer(session_tap, "session", self.session_options(game_port, *extra)).start(self)

    async def player(self, session_port):
        """A new account, logged in through the session server and on its game server."""
        name = f"f_{random.getrandbits(40):x}"
        player = Player(await play(reactor, "127.0.0.1", session_port, name, PASSWORD, register=True,
                                  reconnect=False), name)  # these players log in again by hand, as told
        self.addCleanup(lambda: player.client.close())
        return player

    async def log_in_again(self, player, session_port, game_port):
        """
        Log C{player} in afresh on the game server at C{game_port}: the level
        and exp it reports are what the player was told.
        """
        session = await SessionClient.connect(reactor, "127.0.0.1", session_port)
        try:
            login = await session.login(player.name, PASSWORD)
            await session.enter_world(login.token)
        finally:
            session.close()
        player.client = await GameClient.login(reactor, "127.0.0.1", game_port, login.token, reconnect=False)
        reported = player.client.player
        self.assertEqual((reported.level, reported.exp), (player.told.level, player.told.exp), player.name)

    async def live_state(self, player):
        """The player's live data in Redis now."""
        return state_of(await self.live.snapshot(player.user_id))

    async def players_by_master(self, session_port, master, on_it, elsewhere):
        """
        New players until exactly C{on_it} have their data on C{master} and
        C{elsewhere} do not: both lists. A player past either count is left
        out, so callers can assert on each list whole.
        """
        there, others = [], []
        while len(there) < on_it or len(others) < elsewhere:
            player = await self.player(session_port)
            on_master = self.router.node_for(profile_key(player.user_id)) == master
            wanted, limit = (there, on_it) if on_master else (others, elsewhere)
            if len(wanted) < limit:
                wanted.append(player)
        return there, others

    def kill_master(self, master, player):
        """
        kill -9 of C{master} (the original layout is put back after the
        test); a Deferred that fires once C{player}'s data is served again.
        """
        self.assertIn(master, self.router.masters())
        # The servers here log the requests and raid ends the dead master failed.
        self.addCleanup(self.flushLoggedErrors, RedisClusterError)
        self.addCleanup(cluster.restore)
        cluster.signal_node(master, signal.SIGKILL)

        async def served():
            try:
                await self.live.snapshot(player.user_id)
            except RedisClusterError:
                return False
            return True

        return defer.ensureDeferred(eventually(served, timeout=40))

    async def raid(self, leader, member):
        """The two in a party (made the first time), queued and matched: their L{Raid}s, fighting."""
        if await leader.client.my_party() is None:
            party = await leader.client.create_party()
            await member.client.join_party(party.code)
        await leader.client.queue_raid()
        raids = [await leader.client.next_raid(), await member.client.next_raid()]
        for raid in raids:
            self.addCleanup(raid.close)
        for raid in raids:
            await raid.fight()
        return raids

    async def fight_to_the_end(self, players, raids, scores):
        """
        Hit in turn until the boss falls (C{scores}: each player's damage so
        far); each result must score what the player's hits were told and
        pay for it, and is recorded.
        """
        turn = 0
        while True:
            hit = await raids[turn % len(raids)].hit()
            scores[turn % len(raids)] += hit.damage
            if hit.hp == 0:
                break
            turn += 1
        for player, raid, score in zip(players, raids, scores):
            result = await raid.result()
            self.assertEqual((result.cleared, result.score, result.exp_gained),
                             (True, score, score * TABLES.raid_exp_per_score), player.name)
            before = player.told
            player.raid_paid(result)
            self.assertIn(player.told, _paid(before, score), player.name)

    async def audit(self, players):
        """
        Log out whoever is still in, wait for the sync queue to drain, and
        require MySQL and the ranking board to hold exactly what each player
        was told: no exp, item or score lost or counted twice.
        """
        for player in players:
            self.assertIsNone(player.hidden, f"{player.name}: a hidden outcome was never settled")
            if not player.logged_out:
                await player.logout()

        async def drained():
            jobs, _ = await self.queue.backlog()
            if jobs:
                return False
            for player in players:
                live = await self.live.snapshot(player.user_id)
                # A user is unloaded once synced, unless a raid mark keeps the data live.
                if live is not None and live.version != (await stored(player.user_id)).version:
                    return False
            return True

        await eventually(drained, timeout=30)
        wrong = []
        for player in players:
            in_mysql = state_of(await stored(player.user_id))
            on_board = (await self.ranking.own(player.user_id)).score
            if (in_mysql, on_board) != (player.told, player.told.best):
                wrong.append(f"{player.name} was told {player.told}; MySQL holds {in_mysql}, the board {on_board}")
        self.assertEqual(wrong, [], "\n".join(wrong))


class StoreFaultTests(FaultCase):
    """The durable side fails: MariaDB, the session server and its sync worker."""

    async def test_mariadb_stopped_while_players_log_out(self):
        """
        MariaDB stops just after a logout and stays down while players play
        on and half of them log out; after it starts again every player's
        data lands in MySQL exactly as told.
        """
        game = await self.game_server()
        session = self.session_server(game.port)
        worker = session.part("SyncWorker")
        players = [await self.player(session.port) for _ in range(6)]
        for player in players:
            await player.play_a_little()
        # adbapi logs each broken connection it throws away.
        self.addCleanup(self.flushLoggedErrors, *MYSQL_UNAVAILABLE)
        self.addCleanup(stack, "mysql-start")
        await players[0].logout()
        await stack("mysql-stop")
        written = worker.counters["written"]
        for player in players[1:]:
            await player.play_a_little()
        retries = worker.counters["retries"]
        for player in players[1:4]:
            await player.logout()

        async def failing():
            jobs, _ = await self.queue.backlog()
            return jobs >= 3 and worker.counters["retries"] > retries

        await eventually(failing)
        self.assertEqual(worker.counters["written"], written)
        await stack("mysql-start")
        for player in players[4:]:
            await player.play_a_little()
        await self.audit(players)

    async def test_session_server_killed_with_jobs_pending(self):
        """
        kill -9 of the session server while its sync batch waits on MySQL:
        a new one claims the jobs it had read and reads those queued while
        none ran; each player is written once, as told.
        """
        game = await self.game_server()
        options = self.session_options(game.port, "--sync-claim-idle", "1", "--sync-claim-interval", "0.2")
        first = await ServerProcess("dreamraid-session", "session", options).start(self)
        players = [await self.player(first.port) for _ in range(6)]
        for player in players:
            await player.play_a_little()
        synced, stuck, later = players[:2], players[2:4], players[4:]
        for player in synced:
            await player.logout()

        async def unloaded():
            return all([await self.live.snapshot(p.user_id) is None for p in synced])

        await eventually(unloaded)
        locks = RowLocks()
        self.addCleanup(locks.release)
        await locks.take([p.user_id for p in stuck])
        for player in stuck:
            await player.logout()

        async def read_not_acknowledged():
            pending = [await self.router.execute("XPENDING", stream, GROUP) for stream in self.queue.streams]
            return sum(summary[0] for summary in pending) == len(stuck)

        await eventually(read_not_acknowledged)
        await first.kill()
        await locks.release()
        for player in later:
            await player.play_a_little()
            await player.logout()
        await ServerProcess("dreamraid-session", "session", options).start(self)
        await self.audit(players)


class RaidFaultTests(FaultCase):
    """The live side fails under play and raids: a game server, a Redis master."""

    async def test_game_server_killed_mid_raid(self):
        """
        A raid played to the end stands; the game server hosting the next
        one is killed -9 mid-fight, with a request in flight: the players log
        in again elsewhere as they were told, and nothing of the broken raid
        is recorded.
        """
        first = await ServerProcess("dreamraid-game", "game", self.game_options("--raids-host-lease", "2")).start(self)
        session = self.session_server(first.port)
        players = [await self.player(session.port) for _ in range(2)]
        for player in players:
            await player.play_a_little()
        await self.fight_to_the_end(players, await self.raid(*players), [0, 0])
        raids = await self.raid(*players)
        hit = await raids[0].hit()
        self.assertGreater(hit.hp, 0)
        in_flight = defer.ensureDeferred(players[0].swap(0, 1))
        await first.kill()
        try:
            await in_flight
        except OutcomeHidden:
            players[0].settle(await self.live_state(players[0]))
        second = await self.game_server("--raids-host-lease", "2")
        for player in players:
            await self.log_in_again(player, session.port, second.port)
            await player.play_a_little()
        await self.audit(players)

    async def test_raid_ending_while_a_master_is_down(self):
        """
        The killing hit lands just after kill -9 of the master holding one
        player's data: once a replica has taken over and the host has ended
        the raid (its players are free), the raid's result is recorded for
        both players or for neither.
        """
        game = await self.game_server()
        session = self.session_server(game.port)
        victim = cluster.ORIGINAL_MASTERS[1]
        on_victim, elsewhere = await self.players_by_master(session.port, victim, 1, 1)
        raiders = [on_victim[0], elsewhere[0]]
        raids = await self.raid(*raiders)
        scores = [(await raids[0].hit()).damage, 0]
        while True:
            hit = await raids[1].hit()
            scores[1] += hit.damage
            if hit.hp <= hit.damage:
                break
        # The raid ends, and pays, while the master is down: its calls give up
        # after 2 s, a replica takes over after the 5 s node timeout.
        served = self.kill_master(victim, raiders[0])
        hit = await raids[1].hit()
        scores[1] += hit.damage
        self.assertEqual(hit.hp, 0)
        for player, score in zip(raiders, scores):
            player.raid_result_hidden(score)
        await served
        raiding = f"{{{self.matchmaking}}}:players"

        async def freed():
            return not await self.router.execute("HEXISTS", raiding, raiders[0].user_id)

        await eventually(freed)
        paid = [player.settle(await self.live_state(player)) for player in raiders]
        self.assertIn(set(paid), ({True}, {False}), f"the raid paid {dict(zip([p.name for p in raiders], paid))}")
        await self.audit(on_victim + elsewhere)

    async def test_redis_master_killed_under_traffic(self):
        """
        kill -9 of a Redis master while players change their inventories and
        two of them are mid-raid: requests the fault hid are settled once a
        replica has taken over, traffic resumes, the raid is finished and
        paid once, and the original masters are put back afterwards.
        """
        game = await self.game_server()
        session = self.session_server(game.port)
        on_victim, elsewhere = await self.players_by_master(session.port, cluster.ORIGINAL_MASTERS[2], 2, 2)
        players = on_victim + elsewhere
        swords = {}
        for player in players:
            [first], [second] = await player.grant(SWORD, 1), await player.grant(SWORD, 1)
            [potions] = await player.grant(POTION, 20)
            swords[player] = first.slot, second.slot, potions.slot
        raiders = [on_victim[0], elsewhere[0]]
        raids = await self.raid(*raiders)
        scores = [(await raid.hit()).damage for raid in raids]

        recovered, done = [], dict.fromkeys(players, 0)

        async def request(player):
            """The player's next request (swap, enhance, use); a hidden outcome is settled once recovered."""
            a, b, potions = swords[player]
            try:
                await [lambda: player.swap(a, b), lambda: player.enhance(a), lambda: player.use(potions)][
                    done[player] % 3]()
            except OutcomeHidden:
                await eventually(lambda: defer.succeed(recovered), timeout=60)
                player.settle(await self.live_state(player))
            except RemoteError as e:
                if e.code not in (ErrorCode.MAX_ENHANCEMENT, ErrorCode.EMPTY_SLOT):
                    raise
            done[player] += 1

        # Each player at a steady rate, under the game server's per-connection limit.
        loops = [task.LoopingCall(lambda p=p: defer.ensureDeferred(request(p))) for p in players]
        running = [loop.start(1 / 15) for loop in loops]
        self.addCleanup(lambda: [loop.stop() for loop in loops if loop.running])

        async def each_done(counts):
            for loop in running:
                if loop.called:
                    await loop  # a loop ends early only by an error: raise it
            return all(done[p] >= counts[p] for p in players)

        await eventually(lambda: each_done(dict.fromkeys(players, 30)))
        served = self.kill_master(cluster.ORIGINAL_MASTERS[2], on_victim[0])
        # The fight goes on in the host's memory meanwhile.
        for i, raid in enumerate(raids):
            scores[i] += (await raid.hit()).damage
        await served
        recovered.append(True)
        resumed_from = {p: done[p] + 30 for p in players}
        await eventually(lambda: each_done(resumed_from), timeout=30)
        for loop in loops:
            loop.stop()
        await gather(running)
        self.assertEqual([p.settled > 0 for p in on_victim], [True, True])
        await self.fight_to_the_end(raiders, raids, scores)
        await self.audit(players)
