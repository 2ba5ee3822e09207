"""The client library end to end: a session server and a game server on the test database, players as a game would have them."""

import random

from twisted.internet import reactor

from dreamraid import game_tap, session_tap
from dreamraid.client import RemoteError, SessionClient, play
from dreamraid.client.game import GameClient
from dreamraid.client.results import Member, RankEntry, SlotItem
from dreamraid.errors import ErrorCode
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.deferreds import gather
from dreamraid.services.matchmaking import matchmaking_keys
from tests.storage import SessionServicesCase
from tests.support import RunningServer


class ServersCase(SessionServicesCase):
    """A session server that sends players to a game server (dev grant on), both on this test's keys and prefixes."""

    game_options = ()  # more options for the game server

    async def setUp(self):
        await super().setUp()
        # Every test logs in from 127.0.0.1, some with wrong passwords on purpose: start each with a clean count.
        await self.router.execute("DEL", LoginThrottle.address_key("127.0.0.1"))
        shared = ["--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
                  "--sync-ranking-prefix", self.settings.sync.ranking_prefix]
        matchmaking = f"testmm{random.getrandbits(40):x}"
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(matchmaking)]))
        self.game = RunningServer(game_tap, "game", [*shared, "--game-dev-grant", "on", "--raids-boss-hp", "4",
                                                     "--raids-hit-interval", "0", "--raids-match-interval", "0.1",
                                                     "--raids-matchmaking-prefix", matchmaking,
                                                     *self.game_options])
        self.game.start(self)
        await self.game.part("Players").when_listening()
        self.session = RunningServer(session_tap, "session", [
            *shared, "--tokens-private-key", self.private_key, "--mysql-database", self.settings.mysql.database,
            "--accounts-scrypt-n", "1024", "--session-game-servers", f"127.0.0.1:{self.game.port}"]).start(self)

    async def player(self):
        """A new account, logged in through the session server and authenticated on the game server."""
        name = f"c_{random.getrandbits(40):x}"
        client = await play(reactor, "127.0.0.1", self.session.port, name, "correct horse", register=True)
        self.addCleanup(client.close)
        return client


class ClientLibraryTests(ServersCase):

    async def test_session_calls_return_typed_results_and_raise_codes(self):
        session = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        self.addCleanup(session.close)
        name = f"c_{random.getrandbits(40):x}"
        user_id = await session.register(name, "correct horse")
        login = await session.login(name, "correct horse")
        self.assertEqual(login.user_id, user_id)
        world = await session.enter_world(login.token)
        self.assertEqual((world.user_id, world.host, world.port), (user_id, "127.0.0.1", self.game.port))
        with self.assertRaises(RemoteError) as raised:
            await session.login(name, "wrong password")
        self.assertEqual(raised.exception.code, ErrorCode.WRONG_CREDENTIALS)

    async def test_a_refreshed_token_plays_without_the_password(self):
        """
        A client back after its access token expired resumes without the
        password: refresh on a new connection, enter the world with the new
        token and authenticate on the game server with it.  The refresh token
        it used is spent; logging out revokes the new one.
        """
        session = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        self.addCleanup(session.close)
        name = f"c_{random.getrandbits(40):x}"
        user_id = await session.register(name, "correct horse")
        login = await session.login(name, "correct horse")
        session.close()

        later = await SessionClient.connect(reactor, "127.0.0.1", self.session.port)
        self.addCleanup(later.close)
        refreshed = await later.refresh(login.refresh_token)
        world = await later.enter_world(refreshed.token)
        game = await GameClient.login(reactor, world.host, world.port, refreshed.token)
        self.addCleanup(game.close)
        self.assertEqual((game.player.user_id, game.player.name), (user_id, name))

        await game.logout()
        await later.revoke(refreshed.refresh_token)
        for spent_or_revoked in (login.refresh_token, refreshed.refresh_token):
            with self.assertRaises(RemoteError) as raised:
                await later.refresh(spent_or_revoked)
            self.assertEqual(raised.exception.code, ErrorCode.REFRESH_REFUSED)

    async def test_progression_and_inventory(self):
        client = await self.player()
        self.assertEqual((client.player.level, client.player.exp), (1, 0))
        hunted = await client.hunt(1)
        self.assertEqual((hunted.exp_gained, hunted.level, hunted.levels_gained), (1, 2, 1))
        with self.assertRaises(RemoteError) as raised:
            await client.hunt(9)
        self.assertEqual(raised.exception.code, ErrorCode.UNKNOWN_MONSTER)
        [sword] = await client.grant(101, 1)
        self.assertEqual((sword.item_code, sword.enhancement, sword.count), (101, 0, 1))
        enhanced = await client.enhance(sword.slot)  # +0 to +1 always succeeds
        self.assertEqual((enhanced.slot, enhanced.success, enhanced.enhancement), (sword.slot, True, 1))
        [potions] = await client.grant(201, 3)
        await client.use_item(potions.slot)
        moved = await client.move_item(potions.tab, potions.slot, potions.slot + 1)
        self.assertEqual(sorted(moved), [SlotItem(potions.tab, potions.slot, 0, 0, 0),
                                         SlotItem(potions.tab, potions.slot + 1, 201, 0, 2)])
        inventory = {(i.tab, i.slot): i for i in await client.inventory()}
        self.assertEqual(inventory[(sword.tab, sword.slot)].enhancement, 1)
        self.assertEqual(inventory[(potions.tab, potions.slot + 1)].count, 2 + sum(
            i.count for i in hunted.changed if i.item_code == 201 and i.slot == potions.slot + 1))
        await client.delete_item(sword.tab, sword.slot)
        self.assertNotIn((sword.tab, sword.slot), {(i.tab, i.slot) for i in await client.inventory()})

    async def test_party_raid_and_ranking(self):
        """Two players party up by code, raid together through the library, and are ranked."""
        leader, friend = await self.player(), await self.player()
        party = await leader.create_party()
        joined = await friend.join_party(party.code.lower())
        self.assertEqual(joined.members, (Member(leader.user_id, leader.player.name),
                                          Member(friend.user_id, friend.player.name)))
        change = await leader.next_party_change()
        self.assertEqual((change.reason, change.user_id), ("joined", friend.user_id))
        self.assertEqual(await friend.my_party(), joined)
        self.assertEqual(await leader.queue_raid(), 1)
        raids = [await leader.next_raid(), await friend.next_raid()]
        for raid in raids:
            self.addCleanup(raid.close)
        self.assertEqual(raids[0].members, [leader.user_id, friend.user_id])
        fights = [await raid.fight() for raid in raids]
        self.assertEqual(fights[0].hp, 4)
        while True:
            hit = await raids[0].hit()
            if hit.hp == 0:
                break
        outcome = [await raid.result() for raid in raids]
        self.assertTrue(all(r.cleared for r in outcome))
        self.assertEqual(outcome[0].score, 4)
        # The test database's other scores are on the board too: find the leader by its own rank.
        mine = await leader.my_rank()
        self.assertEqual(mine.score, 4)
        board = await leader.ranking(mine.rank, 100)
        self.assertIn(RankEntry(mine.rank, leader.user_id, leader.player.name, 4), board)
        self.assertEqual((await friend.my_rank()).rank, 0)
        await friend.leave_party()
        self.assertIsNone(await friend.my_party())

    async def test_logout_closes(self):
        client = await self.player()
        await client.logout()
        await client.connection.closed
        self.assertFalse(client.connection.connected)
