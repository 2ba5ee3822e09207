"""
A player away after their connection dropped, on a task.Clock with a
presence that plays the real scripts' rules in memory: the grace runs the
leave once (also when a resume races its timer), a resume in time keeps
everything, a resume after the grace gets RESUME_EXPIRED, a player taken
over on another process leaves nothing behind here; and the Player state
machine itself.  Against the real stack: a party member sees away and
back, a resume on another game server takes the player over, and 100
resumes at once leave one connection holding the player, and a resume
drops an old connection still half open.
"""

import inspect
import json
import random

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dreamraid.client.connection import ConnectionClosed
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.services.avatar import Player, Stage
from dreamraid.services.deferreds import gather
from dreamraid.services.inventory import Rewarded
from dreamraid.services.livestore import session_key
from dreamraid.services.matchmaking import Formed
from dreamraid.services.players import EARLY_FOR, PLACE_AGAIN, Players
from dreamraid.services.presence import Entered, Left, Presence, away_key, handoff_key, holder_server, presence_key
from dreamraid.services.raidhost import RaidHost, Standing
from dreamraid.services.raids import Stage as Stage_
from dreamraid.services.rediscluster import RedisClusterError
from tests import cluster
from tests.support import eventually, log_lines, make_settings, require_stack, when_logged
from tests.test_game import GameServerCase
from tests.test_players import FakeConnection, FakeVerifier, RecordingQueue
from tests.test_realtime import NobodyConnected

GRACE = 30.0
TTL = 300.0
USER = 7


class MemoryPresence:
    """
    The presence scripts' rules for one process, in memory: the session,
    the holder, the away mark.  C{held} holds a leave's answer back until
    the test releases it (to race it with a resume).
    """

    server_id = "here"

    def __init__(self, clock=None):
        self.session, self.holder, self.away = {}, {}, {}
        self.leaves, self.renewed, self.held, self.told = [], [], None, []
        self._count = 0
        self.clock = clock
        self.away_until = {}  # user id -> when the away mark's TTL runs out (with a clock)
        self.ticket_until = {}  # user id -> when a waiting handoff ticket expires (with a clock)

    def _away(self, user_id):
        """The away mark, unless its TTL ran out."""
        if self.clock is not None and self.away_until.get(user_id, float("inf")) <= self.clock.seconds():
            self.away.pop(user_id, None)
        return self.away.get(user_id)

    def listen(self, on_kick, on_notice):
        return self

    def stop(self):
        return defer.succeed(None)

    def _entered(self, user_id, jti):
        if self.session.get(user_id) != jti:
            raise RequestRefused(ErrorCode.SESSION_NOT_LIVE)
        self._count += 1
        holder = f"here {self._count}"
        self.holder[user_id] = holder
        was_away = self._away(user_id) is not None
        self.away.pop(user_id, None)
        return Entered(user_id, "n", 1, 0, holder, was_away)

    def enter(self, user_id, jti):
        try:
            return defer.succeed(self._entered(user_id, jti))
        except RequestRefused:
            return defer.fail()

    def enter_handoff(self, user_id, ticket):
        return self.enter(user_id, ticket)

    def renew(self, user_id, jti, holder):
        self.renewed.append(user_id)
        if self.holder.get(user_id, holder) != holder:
            return defer.succeed(ErrorCode.LOGGED_IN_ELSEWHERE)
        return defer.succeed(None if self.session.get(user_id) == jti else ErrorCode.SESSION_NOT_LIVE)

    def tell(self, user_ids, event, body):
        self.told.append((list(user_ids), event, body))
        return defer.succeed(None)

    def mark_away(self, user_id, holder, seconds):
        if self.holder.get(user_id) == holder:
            self.away[user_id] = holder
            if self.clock is not None:
                self.away_until[user_id] = self.clock.seconds() + seconds
            return defer.succeed(True)
        return defer.succeed(False)

    def _leave(self, user_id, jti, holder, wait_for_handoff=False):
        current = self.holder.get(user_id)
        if current and current != holder:
            return Left.REPLACED
        ticket_left = self.ticket_until.get(user_id, 0) - (self.clock.seconds() if self.clock else 0)
        if wait_for_handoff and self.session.get(user_id) == jti and ticket_left > 0:
            return ticket_left
        self.holder.pop(user_id, None)
        self.away.pop(user_id, None)
        if self.session.get(user_id) != jti:
            return Left.NOT_LIVE
        del self.session[user_id]
        return Left.ENDED

    def leave(self, user_id, jti, holder, wait_for_handoff=False):
        self.leaves.append(user_id)
        if self.held is not None:
            # The script runs when the test says, as Redis would run it later.
            answer, self.held = self.held, None
            return answer.addCallback(lambda _: self._leave(user_id, jti, holder, wait_for_handoff))
        return defer.succeed(self._leave(user_id, jti, holder, wait_for_handoff))


class RecordingParties:
    """The parties a leaving player leaves, and the away and back notices, recorded."""

    def __init__(self):
        self.left, self.told = [], []

    async def leave_if_any(self, user_id):
        self.left.append(user_id)
        return None

    async def tell_status(self, user_id, reason):
        self.told.append((user_id, reason))


class RecordingMatchmaker:
    def __init__(self):
        self.withdrawn = []

    async def withdraw(self, user_ids, party=None):
        self.withdrawn.append(list(user_ids))
        return False


class AwayTests(TestCase):
    """Players with a resume grace, on a task.Clock."""

    def setUp(self):
        self.clock = Clock()
        self.presence = MemoryPresence()
        self.presence.session[USER] = "jti1"
        self.queue = RecordingQueue()
        self.parties = RecordingParties()
        self.matchmaker = RecordingMatchmaker()
        self.verifier = FakeVerifier()
        self.players = Players(self.verifier, self.presence, self.queue, self.clock, TTL, GRACE, self.parties,
                               self.matchmaker)
        self.players.startService()
        self.addCleanup(lambda: self.players.running and self.players.stopService())
        self.connection = FakeConnection()
        self.successResultOf(defer.ensureDeferred(self.players.authenticate(self.connection, f"{USER}:jti1")))

    def test_the_fakes_match_the_real_presence(self):
        for name in ("enter", "enter_handoff", "renew", "leave", "mark_away", "listen", "tell"):
            self.assertEqual(inspect.signature(getattr(MemoryPresence, name)),
                             inspect.signature(getattr(Presence, name)), name)

    def left_game(self):
        """What the leave did: parties left, tickets withdrawn, syncs queued."""
        return self.parties.left, self.matchmaker.withdrawn, self.queue.jobs

    def dropped(self):
        self.assertIsNone(self.players.connection_lost(self.connection))

    def resumed(self, token=f"{USER}:jti1"):
        connection = FakeConnection()
        d = defer.ensureDeferred(self.players.resume(connection, token))
        return connection, d

    def test_a_resume_after_the_token_expired_is_taken(self):
        """
        The login token expired while the player played on (its session is
        still live): a resume with it is taken, as the session is the
        credential; an authenticate with it is still refused.
        """
        self.dropped()
        self.verifier.expired = True
        self.failureResultOf(defer.ensureDeferred(self.players.authenticate(FakeConnection(), f"{USER}:jti1")),
                             RequestRefused)
        connection, resumed = self.resumed()
        self.assertEqual(self.successResultOf(resumed).user_id, USER)
        self.assertIs(self.players.player_of(USER).stage, Stage.PLAYING)

    def test_a_presence_taken_before_the_mark_tells_nobody_away(self):
        """A resume elsewhere took the presence before the drop's mark: no mark, and the party hears no "away"."""
        self.presence.holder[USER] = "elsewhere 1"
        self.dropped()
        self.assertEqual((self.presence.away, self.parties.told), ({}, []))

    def test_a_stopping_server_takes_nobody_over(self):
        """Once stopping, a resume (or authenticate) is refused SHUTTING_DOWN: nobody would run its leave."""
        self.dropped()
        self.successResultOf(defer.ensureDeferred(defer.maybeDeferred(self.players.stopService)))
        connection, resumed = self.resumed()
        self.assertEqual(self.failureResultOf(resumed, RequestRefused).value.code, ErrorCode.SHUTTING_DOWN)
        self.assertIsNone(self.players.player_of(USER))

    def test_a_ticket_wait_told_while_stopping_ends_at_once(self):
        """
        A leave asked before the server stopped learns, once it is
        stopping, that a handoff ticket waits: the stop does not wait the
        ticket's 30 s; the player is let go (its session expires by itself).
        """
        answer = defer.Deferred()
        self.presence.leave = lambda user_id, jti, holder, wait_for_handoff=False: answer
        leaving = defer.ensureDeferred(self.players.leave(self.connection))
        stopped = defer.maybeDeferred(self.players.stopService)
        answer.callback(29.8)
        self.successResultOf(stopped)
        self.assertIsNone(self.successResultOf(leaving))
        self.assertIsNone(self.players.player_of(USER))

    def test_a_drop_keeps_the_player_away_and_the_grace_runs_the_leave_once(self):
        """Away: nothing ends, the party hears away, renewals go on; at the grace's end the leave runs, once."""
        self.dropped()
        player = self.players.player_of(USER)
        self.assertIs(player.stage, Stage.AWAY)
        self.assertEqual((self.presence.away, self.parties.told), ({USER: player.holder}, [(USER, "away")]))
        self.clock.advance(GRACE - 0.01)
        self.assertEqual((self.presence.leaves, self.left_game()), ([], ([], [], [])))
        self.assertIn(USER, self.presence.renewed)  # still renewed while away: the presence does not lapse
        self.clock.advance(0.01)
        self.assertEqual(self.presence.leaves, [USER])
        self.assertEqual(self.left_game(), ([USER], [[USER]], [(USER, "logout")]))
        self.assertIsNone(self.players.player_of(USER))
        self.clock.advance(GRACE * 10)
        self.assertEqual(self.presence.leaves, [USER])
        self.assertEqual(len(self.queue.jobs), 1)

    def test_a_resume_in_time_keeps_everything(self):
        """A resume within the grace: the same player plays on, the party hears back, no leave ever runs."""
        self.dropped()
        self.clock.advance(GRACE - 1)
        connection, d = self.resumed()
        entered = self.successResultOf(d)
        self.assertTrue(entered.was_away)
        player = self.players.player_of(USER)
        self.assertIs(connection.player, player)
        self.assertEqual((player.stage, player.connection), (Stage.PLAYING, connection))
        self.assertEqual(self.parties.told, [(USER, "away"), (USER, "back")])
        self.clock.advance(GRACE * 10)
        self.assertEqual((self.presence.leaves, self.left_game()), ([], ([], [], [])))
        self.assertEqual(self.presence.session[USER], "jti1")

    def test_a_resume_after_the_grace_is_refused_with_its_code(self):
        """The grace ran out and the leave ended the session: the resume gets RESUME_EXPIRED."""
        self.dropped()
        self.clock.advance(GRACE)
        connection, d = self.resumed()
        self.assertEqual(self.failureResultOf(d, RequestRefused).value.code, ErrorCode.RESUME_EXPIRED)
        self.assertIsNone(connection.player)
        self.assertEqual(len(self.queue.jobs), 1)

    def test_a_resume_while_the_leave_script_runs_wins_if_redis_ran_it_first(self):
        """
        The grace ran out and the leave's script is on its way, but the
        resume's script gets there first: the leave finds the player
        replaced and ends nothing; the resumed player stays.
        """
        self.dropped()
        self.presence.held = held = defer.Deferred()
        self.clock.advance(GRACE)
        self.assertEqual(self.presence.leaves, [USER])
        connection, d = self.resumed()
        self.successResultOf(d)
        held.callback(None)  # the leave's script runs now, after the resume's
        self.assertEqual(self.left_game(), ([], [], []))
        self.assertIs(self.players.player_of(USER).connection, connection)
        self.clock.advance(GRACE * 10)
        self.assertEqual((self.presence.leaves, self.left_game()), ([USER], ([], [], [])))

    def test_a_leave_that_redis_ran_first_refuses_the_resume(self):
        """The leave's script ran first: the session ended once, and the resume is RESUME_EXPIRED."""
        self.dropped()
        self.clock.advance(GRACE)
        connection, d = self.resumed()
        self.assertEqual(self.failureResultOf(d, RequestRefused).value.code, ErrorCode.RESUME_EXPIRED)
        self.assertEqual(self.left_game(), ([USER], [[USER]], [(USER, "logout")]))

    def test_a_resume_on_another_process_lets_the_player_go_here_without_leaving(self):
        """Another process took the away player over (its kick names this holder): no timer, no leave here."""
        self.dropped()
        holder = self.players.player_of(USER).holder
        self.presence.holder[USER] = "there 1"
        self.players.taken_over(USER, holder)
        self.assertIsNone(self.players.player_of(USER))
        self.clock.advance(GRACE * 10)
        self.assertEqual((self.presence.leaves, self.left_game()), ([], ([], [], [])))

    def test_a_lost_kick_is_made_good_by_the_renewal_while_away(self):
        """The kick from the process that resumed the player was lost: the renewal lets the player go, no leave."""
        self.dropped()
        self.presence.holder[USER] = "there 1"
        self.clock.advance(TTL / 3)
        self.assertIsNone(self.players.player_of(USER))
        self.clock.advance(GRACE * 10)
        self.assertEqual((self.presence.leaves, self.left_game()), ([], ([], [], [])))

    def test_a_logout_is_no_away(self):
        """A logout leaves at once: no grace, no away notice."""
        left = self.successResultOf(defer.ensureDeferred(self.players.leave(self.connection, wait_for_handoff=False)))
        self.assertIs(left, Left.ENDED)
        self.assertEqual(self.parties.told, [])
        self.assertEqual(self.left_game(), ([USER], [[USER]], [(USER, "logout")]))

    def test_a_hundred_resumes_at_once_leave_one_connection_holding_the_player(self):
        """
        100 resumes of the away player: each newer one closes the one
        before (LOGGED_IN_ELSEWHERE), exactly one ends up holding the
        player, and the leave never runs.
        """
        self.dropped()
        resumes = [self.resumed() for _ in range(100)]
        for _, d in resumes:
            self.successResultOf(d)
        connections = [c for c, _ in resumes]
        holding = [c for c in connections if self.players.connection_of(USER) is c]
        self.assertEqual(len(holding), 1)
        self.assertEqual(sum(1 for c in connections if c.kicked == [ErrorCode.LOGGED_IN_ELSEWHERE]), 99)
        self.assertEqual(holding[0].kicked, [])
        self.clock.advance(GRACE * 10)
        self.assertEqual((self.presence.leaves, self.left_game()), ([], ([], [], [])))

    def test_stopping_lets_an_away_player_go(self):
        """A server that stops lets every player go, away ones too (their data is synced)."""
        self.dropped()
        self.successResultOf(self.players.stopService())
        self.assertEqual(self.left_game(), ([USER], [[USER]], [(USER, "logout")]))
        self.clock.advance(GRACE * 10)
        self.assertEqual(self.presence.leaves, [USER])


class PushRecorder(FakeConnection):
    """A connection that keeps what was pushed to it."""

    def __init__(self):
        super().__init__()
        self.pushed = []

    def push(self, event, body):
        self.pushed.append((event, body))


class AddressedNoticeTests(TestCase):
    """
    Notices for one authentication (a raid's raid_found): only it hears
    them, also when they come before its enter script's reply.
    """

    def setUp(self):
        self.clock = Clock()
        self.presence = MemoryPresence()
        self.presence.session[USER] = "jti1"
        self.players = Players(FakeVerifier(), self.presence, RecordingQueue(), self.clock, TTL, GRACE,
                               RecordingParties(), RecordingMatchmaker())
        self.players.startService()
        self.addCleanup(lambda: self.players.running and self.players.stopService())
        self.connection = PushRecorder()
        self.successResultOf(defer.ensureDeferred(self.players.authenticate(self.connection, f"{USER}:jti1")))

    def test_a_notice_for_the_away_authentication_does_not_reach_the_resumed_one(self):
        """Told to the authentication that went away, raid_found is dropped; told to the resumed one, it is pushed."""
        away = self.players.player_of(USER).holder
        self.players.connection_lost(self.connection)
        fresh = PushRecorder()
        self.successResultOf(defer.ensureDeferred(self.players.resume(fresh, f"{USER}:jti1")))
        self.players.notified([USER], "raid_found", {"n": 1}, away)
        self.players.notified([USER], "raid_found", {"n": 2}, self.players.player_of(USER).holder)
        self.assertEqual((self.connection.pushed, fresh.pushed), ([], [("raid_found", {"n": 2})]))

    def test_a_notice_that_comes_before_the_enter_reply_waits_for_it(self):
        """
        The resume's enter script ran (the host read its holder and told it)
        but its reply is still on the way: the notice is pushed to the new
        connection once it is attached, and never to the old one.
        """
        answer = defer.Deferred()
        self.presence.enter = lambda user_id, jti: answer
        fresh = PushRecorder()
        resumed = defer.ensureDeferred(self.players.resume(fresh, f"{USER}:jti1"))
        self.players.notified([USER], "raid_found", {"n": 1}, "here 99")
        self.players.notified([USER], "raid_found", {"n": 0}, "here 98")  # an authentication that never attaches
        answer.callback(Entered(USER, "n", 1, 0, "here 99", True))
        self.successResultOf(resumed)
        self.assertEqual((self.connection.pushed, fresh.pushed), ([], [("raid_found", {"n": 1})]))
        self.assertEqual(self.players._early, {})  # the one for "here 98" waits for nobody now

    def test_notices_for_an_authentication_that_failed_are_not_kept(self):
        """The enter script's reply never came: what was kept for its authentication goes with it."""
        answer = defer.Deferred()
        self.presence.enter = lambda user_id, jti: answer
        resumed = defer.ensureDeferred(self.players.resume(PushRecorder(), f"{USER}:jti1"))
        self.players.notified([USER], "raid_found", {"n": 1}, "here 99")
        self.assertEqual(list(self.players._early), ["here 99"])
        answer.errback(RedisClusterError("timed out"))
        self.failureResultOf(resumed, RequestRefused)
        self.assertEqual(self.players._early, {})

    def test_a_result_told_while_away_is_pushed_on_resume_here(self):
        """
        The raid ended while the player was away: its raid_result is kept
        (a party change is not: the resume reply has the party) and pushed
        to the resumed connection, once.
        """
        self.players.connection_lost(self.connection)
        self.players.notified([USER], "raid_result", {"raid_id": "r1"})
        self.players.notified([USER], "party_changed", {"reason": "left"})
        fresh = PushRecorder()
        self.successResultOf(defer.ensureDeferred(self.players.resume(fresh, f"{USER}:jti1")))
        self.assertEqual(fresh.pushed, [("raid_result", {"raid_id": "r1"})])
        self.players.connection_lost(fresh)
        again = PushRecorder()
        self.successResultOf(defer.ensureDeferred(self.players.resume(again, f"{USER}:jti1")))
        self.assertEqual(again.pushed, [])

    def test_a_result_told_while_away_follows_a_resume_elsewhere(self):
        """The away player resumed on another process: the kept raid_result is sent there, and nothing stays here."""
        holder = self.players.player_of(USER).holder
        self.players.connection_lost(self.connection)
        self.players.notified([USER], "raid_result", {"raid_id": "r1"}, holder)
        self.players.taken_over(USER, holder)
        self.assertEqual(self.presence.told, [([USER], "raid_result", {"raid_id": "r1"})])
        self.assertIsNone(self.players.player_of(USER))

    def test_a_result_that_comes_just_after_the_takeover_follows_the_player(self):
        """
        The host read the presence (away here) before a resume elsewhere took
        the player over, and its raid_result arrives after that takeover: it
        is sent on to where the player resumed, for EARLY_FOR; later, not.
        """
        holder = self.players.player_of(USER).holder
        self.players.connection_lost(self.connection)
        self.players.taken_over(USER, holder)
        self.players.notified([USER], "raid_result", {"raid_id": "r1"}, holder)
        self.players.notified([USER], "party_changed", {"reason": "left"})  # state, which the resume reply has
        self.assertEqual(self.presence.told, [([USER], "raid_result", {"raid_id": "r1"})])
        self.clock.advance(EARLY_FOR + 1)
        self.players.notified([USER], "raid_result", {"raid_id": "r2"})
        self.assertEqual(len(self.presence.told), 1)

    def test_a_kept_notice_goes_after_a_while(self):
        """A notice kept for an authentication is dropped if it attaches only after EARLY_FOR."""
        answer = defer.Deferred()
        self.presence.enter = lambda user_id, jti: answer
        fresh = PushRecorder()
        resumed = defer.ensureDeferred(self.players.resume(fresh, f"{USER}:jti1"))
        self.players.notified([USER], "raid_found", {"n": 0}, "here 99")
        self.clock.advance(EARLY_FOR + 1)
        answer.callback(Entered(USER, "n", 1, 0, "here 99", True))
        self.successResultOf(resumed)
        self.assertEqual(fresh.pushed, [])


class AwayMarkTests(TestCase):
    """The away mark's TTL, on a task.Clock: it outlives the grace and any handoff wait after it."""

    def setUp(self):
        self.clock = Clock()
        self.presence = MemoryPresence(self.clock)
        self.presence.session[USER] = "jti1"
        self.parties = RecordingParties()
        # A presence TTL short beside the grace and the handoff wait: the mark cannot lean on it.
        self.players = Players(FakeVerifier(), self.presence, RecordingQueue(), self.clock, 3.0, GRACE, self.parties,
                               RecordingMatchmaker())
        self.players.startService()
        self.addCleanup(lambda: self.players.running and self.players.stopService())
        self.connection = FakeConnection()
        self.successResultOf(defer.ensureDeferred(self.players.authenticate(self.connection, f"{USER}:jti1")))

    def test_the_mark_outlives_a_handoff_wait_after_the_grace(self):
        """
        A raid handoff ticket, offered just before the grace ran out, keeps
        the player away up to 30 s more: the away mark is still there at the
        wait's last moment, so a resume then is "back" to the party, as
        "away" was told; the leave after the wait takes it off.
        """
        self.players.connection_lost(self.connection)
        self.presence.ticket_until[USER] = GRACE + 29.5
        self.clock.advance(GRACE)
        player = self.players.player_of(USER)
        self.assertIs(player.stage, Stage.AWAY)
        self.clock.advance(29.4)
        self.assertIsNotNone(self.presence._away(USER))
        entered = self.successResultOf(defer.ensureDeferred(self.players.resume(FakeConnection(), f"{USER}:jti1")))
        self.assertTrue(entered.was_away)
        self.assertEqual(self.parties.told, [(USER, "away"), (USER, "back")])

    def test_the_mark_is_taken_off_by_the_leave_after_the_wait(self):
        """No resume: the wait ends, the leave runs once and the mark goes with it."""
        self.players.connection_lost(self.connection)
        self.presence.ticket_until[USER] = GRACE + 10
        self.clock.advance(GRACE)
        self.clock.advance(10)
        self.assertIsNone(self.players.player_of(USER))
        self.assertEqual((self.presence.away, self.presence.leaves), ({}, [USER, USER]))
        self.assertEqual(self.parties.told, [(USER, "away")])


class PlayerTests(TestCase):
    """The Player state machine alone."""

    def setUp(self):
        self.clock = Clock()
        self.over = []
        self.player = Player(1, "n", "jti", "h 1", object(), self.clock, self.over.append)

    def test_grace_over_fires_once(self):
        self.player.went_away(5)
        self.clock.advance(5)
        self.clock.advance(50)
        self.assertEqual(self.over, [self.player])

    def test_attach_cancels_the_grace(self):
        self.player.went_away(5)
        self.player.attach(object(), "jti", "h 2")
        self.clock.advance(50)
        self.assertEqual((self.over, self.player.stage, self.player.holder), ([], Stage.PLAYING, "h 2"))

    def test_gone_cancels_the_grace(self):
        self.player.went_away(5)
        self.player.gone()
        self.clock.advance(50)
        self.assertEqual((self.over, self.player.stage), ([], Stage.GONE))

    def test_wait_more_moves_the_end(self):
        self.player.went_away(5)
        self.player.wait_more(20)
        self.clock.advance(19)
        self.assertEqual(self.over, [])
        self.clock.advance(1)
        self.assertEqual(self.over, [self.player])


class ResumeOnTheStackTests(GameServerCase):
    """
    Game servers over real TCP against the real Redis Cluster: a party
    member sees away and back; a resume on another game server process
    takes the player over and the first lets it go without leaving; 100
    resumes at once leave exactly one connection holding the player; a
    resume drops an old connection still half open.
    """

    timeout = 90

    async def party_of_two(self, server):
        """Two players on C{server}, in one party: C{(stayer, stayer_id, mover, mover_id, token of the mover, code)}."""
        ids = [await self.new_user() for _ in range(2)]
        tokens = [await self.entered_token(u) for u in ids]
        clients = [await server.client(self) for _ in ids]
        for client, token in zip(clients, tokens):
            await client.request(packets.AUTHENTICATE, {"token": token})
        _, party = await clients[0].request(packets.CREATE_PARTY, {})
        await clients[1].request(packets.JOIN_PARTY, {"code": party["code"]})
        await clients[0].next_push("party_changed")  # joined
        return clients[0], ids[0], clients[1], ids[1], tokens[1], party["code"]

    async def test_a_resume_on_another_server_takes_the_away_player_over(self):
        """
        The mover's socket is cut on server A: the party hears away, the
        presence is marked away.  It resumes on server B: the reply names
        the party, the party hears back, A lets the player go without
        leaving (no timer left there), and the session and party stay.
        """
        first = await self.game_server("--game-resume-grace", "30")
        second = await self.game_server("--game-resume-grace", "30")
        stayer, stayer_id, mover, mover_id, token, code = await self.party_of_two(first)
        mover.transport.abortConnection()
        away = await stayer.next_push("party_changed")
        self.assertEqual((away["reason"], away["user_id"], away["code"]), ("away", mover_id, code))
        self.assertIsNotNone(await self.router.execute("GET", away_key(mover_id)))
        let_go = when_logged(self, f"user {mover_id}: away here, taken over elsewhere")

        resumed_on = await second.client(self)
        _, resumed = await resumed_on.request(packets.RESUME, {"token": token, "user_id": 0, "ticket": ""})
        self.assertEqual((resumed["user_id"], resumed["party_code"], resumed["raid_id"]), (mover_id, code, ""))
        back = await stayer.next_push("party_changed")
        self.assertEqual((back["reason"], back["user_id"]), ("back", mover_id))
        await let_go.addTimeout(10, reactor)
        self.assertIsNone(first.part("Players").player_of(mover_id))
        self.assertIsNone(await self.router.execute("GET", away_key(mover_id)))
        self.assertEqual(await self.router.execute("GET", presence_key(mover_id)),
                         second.part("Players").player_of(mover_id).holder.encode())
        _, party = await resumed_on.request(packets.MY_PARTY, {})
        self.assertEqual(sorted(m["user_id"] for m in party["members"]), sorted([stayer_id, mover_id]))

    async def test_a_hundred_resumes_at_once(self):
        """
        100 resumes of one away player at once, over 100 connections: each
        is answered, exactly one connection ends up holding the player, the
        other 99 are told logged_in_elsewhere and dropped, and the leave
        never runs (the session, party and presence stay).
        """
        server = await self.game_server("--game-resume-grace", "30", "--game-connections-per-address", "256")
        stayer, stayer_id, mover, mover_id, token, code = await self.party_of_two(server)
        mover.transport.abortConnection()
        await stayer.next_push("party_changed")  # away
        clients = await gather([server.client(self) for _ in range(100)])
        outcomes = await defer.DeferredList(
            [c.request(packets.RESUME, {"token": token, "user_id": 0, "ticket": ""}) for c in clients],
            consumeErrors=True)
        players = server.part("Players")
        await eventually(lambda: defer.succeed(sum(1 for c in clients if c.connected) == 1))
        holding = [c for c in clients if c.connected]
        for client, (ok, value) in zip(clients, outcomes):
            if ok:
                self.assertEqual(value[1]["user_id"], mover_id)
            else:
                self.assertIsInstance(value.value, ConnectionClosed)
        dropped = [c for c in clients if not c.connected]
        self.assertEqual(len(dropped), 99)
        self.assertEqual({c.close_reason[0] for c in dropped}, {ErrorCode.LOGGED_IN_ELSEWHERE})
        self.assertIs(players.connection_of(mover_id).player, players.player_of(mover_id))
        self.assertEqual(players.player_of(mover_id).holder.encode(),
                         await self.router.execute("GET", presence_key(mover_id)))
        self.assertIsNotNone(await self.router.execute("GET", session_key(mover_id)))
        _, served = await holding[0].request(packets.MY_PARTY, {})
        self.assertEqual(served["code"], code)
        back = await stayer.next_push("party_changed")
        self.assertEqual((back["reason"], back["user_id"]), ("back", mover_id))
        _, party = await stayer.request(packets.MY_PARTY, {})
        self.assertEqual(sorted(m["user_id"] for m in party["members"]), sorted([stayer_id, mover_id]))

    async def test_a_resume_while_the_old_connection_is_half_open_drops_the_old_one(self):
        """
        The old connection never closed (half open, as after a silent link
        loss): a resume on a new one takes the player over, the old one is
        told logged_in_elsewhere and closed, nothing was away so nobody
        hears away or back, and the party and session stay.
        """
        server = await self.game_server("--game-resume-grace", "30")
        stayer, stayer_id, mover, mover_id, token, code = await self.party_of_two(server)
        fresh = await server.client(self)
        _, resumed = await fresh.request(packets.RESUME, {"token": token, "user_id": 0, "ticket": ""})
        self.assertEqual((resumed["user_id"], resumed["party_code"]), (mover_id, code))
        await mover.closed
        self.assertEqual(mover.close_reason[0], ErrorCode.LOGGED_IN_ELSEWHERE)
        _, party = await stayer.request(packets.MY_PARTY, {})
        self.assertEqual(sorted(m["user_id"] for m in party["members"]), sorted([stayer_id, mover_id]))
        _, hunted = await fresh.request(packets.HUNT, {"monster": 1})
        self.assertEqual(hunted["exp"], 1)
        self.assertIsNotNone(await self.router.execute("GET", session_key(mover_id)))
        self.assertEqual([name for name, _ in stayer.pushes if name == "party_changed"], [])  # no away, no back


class LeaveFailureTests(TestCase):
    """
    A leave that fails with something other than a Redis error (a bug in
    the script's reply, a party service that raises) still ends: whoever
    waits for it hears, the player is let go here, one line is logged, and
    the server can stop.
    """

    def setUp(self):
        self.clock = Clock()
        self.presence = MemoryPresence()
        self.parties = RecordingParties()
        self.matchmaker = RecordingMatchmaker()
        self.queue = RecordingQueue()
        self.players = Players(FakeVerifier(), self.presence, self.queue, self.clock, TTL, GRACE, self.parties,
                               self.matchmaker)
        self.players.startService()
        self.addCleanup(lambda: self.players.running and self.players.stopService())
        self.lines = log_lines(self)

    def entered(self, user_id):
        self.presence.session[user_id] = f"jti{user_id}"
        connection = FakeConnection()
        self.successResultOf(defer.ensureDeferred(self.players.authenticate(connection, f"{user_id}:jti{user_id}")))
        return connection

    def failures(self):
        return [line for line in self.lines if "the leave failed" in line]

    def test_a_bug_in_the_session_script_ends_a_hundred_leaves_at_once(self):
        """
        The presence's leave raises a TypeError (not a Redis error) for 100
        players logging out at once: every logout's Deferred fires, each
        player is let go here, the rest of the leave (party, ticket) runs,
        one line each is logged, and the server stops without hanging.
        """
        connections = {user_id: self.entered(user_id) for user_id in range(1, 101)}

        def broken(user_id, jti, holder, wait_for_handoff=False):
            raise TypeError("a bug")
        self.presence.leave = broken
        leaves = [defer.ensureDeferred(self.players.leave(c, wait_for_handoff=False)) for c in connections.values()]
        self.assertEqual([self.successResultOf(d) for d in leaves], [None] * 100)
        self.assertEqual(len(self.players), 0)
        self.assertEqual(sorted(self.parties.left), list(range(1, 101)))
        self.assertEqual(len(self.failures()), 100)
        self.assertIn("TypeError", self.failures()[0])
        self.successResultOf(defer.maybeDeferred(self.players.stopService))

    def test_a_failing_party_service_ends_the_grace_leave(self):
        """
        The grace ran out and the leave's party step raises (not a Redis
        error): the leave still ends, the player is gone here, one line is
        logged, and the server stops without hanging.
        """
        connection = self.entered(1)

        async def failing(user_id):
            raise ValueError("party bug")
        self.parties.leave_if_any = failing
        self.players.connection_lost(connection)
        self.clock.advance(GRACE)
        self.assertIsNone(self.players.player_of(1))
        self.assertEqual(len(self.failures()), 1)
        self.assertIn("ValueError", self.failures()[0])
        self.successResultOf(defer.maybeDeferred(self.players.stopService))

    def test_a_failure_after_a_racing_resume_leaves_the_resumed_player(self):
        """
        The grace's leave script fails unexpectedly after a resume took the
        player back: the resumed player stays, playing, and nothing ends.
        """
        connection = self.entered(1)
        self.players.connection_lost(connection)
        answer = defer.Deferred()
        self.presence.leave = lambda user_id, jti, holder, wait_for_handoff=False: answer
        self.clock.advance(GRACE)
        fresh = FakeConnection()
        self.successResultOf(defer.ensureDeferred(self.players.resume(fresh, "1:jti1")))
        answer.errback(KeyError("a bug"))
        self.assertIs(self.players.connection_of(1), fresh)
        self.assertEqual((self.parties.left, self.queue.jobs), ([], []))
        self.assertEqual(len(self.failures()), 1)


class PlacePresence:
    """
    The part of L{Presence} a raid's host gives places through, with its
    scripts' rules in memory: who holds each user (C{holder}), the handoff
    tickets waiting (C{tickets}), and every push: C{(user id, the holder it
    went to, event, body)}.  A user's first offer, for a user in
    C{hold_first}, waits in C{waiting} until the test runs its script
    (C{run()}) and answers (the script may run before the answer comes).
    """

    server_id = "host"

    def __init__(self):
        self.holder, self.tickets, self.pushed, self.asked = {}, {}, [], []
        self.hold_first, self.waiting = set(), {}

    def _offer(self, user_id, ticket, expected=None):
        holder = self.holder.get(user_id)
        if holder is None or (expected is not None and holder != expected):
            return holder, False
        if holder_server(holder) == self.server_id:
            self.tickets.pop(user_id, None)
            return holder, False
        self.tickets[user_id] = ticket
        return holder, True

    def offer_place(self, user_id, ticket, ttl, expected=None):
        if user_id in self.hold_first:
            self.hold_first.discard(user_id)
            answer = defer.Deferred()
            self.waiting[user_id] = (answer, lambda: self._offer(user_id, ticket, expected))
            return answer
        return defer.succeed(self._offer(user_id, ticket, expected))

    def withdraw_place(self, user_id, ticket):
        if self.tickets.get(user_id) != ticket:
            return defer.succeed(False)
        del self.tickets[user_id]
        return defer.succeed(True)

    def offer_handoff(self, user_id, ticket, ttl):
        self.tickets[user_id] = ticket
        return defer.succeed(None)

    def tell_holder(self, user_id, holder, event, body):
        self.pushed.append((user_id, holder, event, body))
        return defer.succeed(None)

    def tell(self, user_ids, event, body):
        """A push to whoever holds each user when it is sent."""
        for user_id in user_ids:
            self.pushed.append((user_id, self.holder.get(user_id), event, body))
        return defer.succeed(None)

    def ask(self, server_id, event, body):
        self.asked.append((server_id, event, body))
        return defer.succeed(None)

    def heard(self, user_id, event="raid_found"):
        """The bodies of C{event} pushed to the authentication holding C{user_id} now."""
        return [body for u, holder, e, body in self.pushed
                if u == user_id and e == event and holder == self.holder.get(user_id)]


class HostRouter:
    """Redis as a raid's host sees it at forming (every player level 1, no weapon); every script succeeds."""

    FIELDS = {"name": b"n", "level": b"1"}

    def execute(self, *args, timeout=None, route=None, replicas=0):
        if args[0] == "HMGET":
            return defer.succeed([self.FIELDS.get(field, b"0") for field in args[2:]])
        return defer.succeed(None if args[0] == "HGET" else 1)


class HostMatchmaker:
    """The host's lease and its players' release, recorded: the checkpoints renewed, the raids released."""

    def __init__(self):
        self.checkpoints, self.released = [], []

    async def renew(self, server_id, address, checkpoints):
        self.checkpoints.append(dict(checkpoints))
        return []

    async def reap(self):
        return []

    async def release(self, raid_id):
        self.released.append(raid_id)

    async def checkpoint(self, raid_id):
        return None


class HeldPay:
    """Pays every player 1 exp once the test lets C{paying} fire."""

    def __init__(self):
        self.paying = defer.Deferred()

    async def reward(self, user_id, raid_id, score, keep):
        await self.paying
        return Rewarded(score, 1, score, 0, score, [])


class NoRanking:
    async def record(self, scores):
        pass


class RaidPlaceTests(TestCase):
    """
    A raid's host giving places, on a task.Clock with an in-memory
    presence: a resume racing the raid's forming hears raid_found once; a
    player on the host is offered no ticket and a resume there takes a
    waiting one off; a raid that is over gives no place, only its end.
    """

    RAID = "r1"

    def setUp(self):
        self.clock = Clock()
        self.presence = PlacePresence()
        self.matchmaker = HostMatchmaker()
        self.pay = HeldPay()
        settings = make_settings(raids_hit_interval="0").raids
        self.host = RaidHost(HostRouter(), self.presence, NobodyConnected(), self.pay, NoRanking(), self.matchmaker,
                             self.clock, random.Random(5), settings, "127.0.0.1:9090")
        self.host.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if not self.pay.paying.called:
            self.pay.paying.callback(None)
        return self.host.stopService()

    def test_the_fake_matches_the_real_presence(self):
        for name in ("offer_place", "withdraw_place", "offer_handoff", "tell_holder", "tell", "ask"):
            self.assertEqual(inspect.signature(getattr(PlacePresence, name)),
                             inspect.signature(getattr(Presence, name)), name)

    def hosted(self, members):
        self.host.host(Formed(self.RAID, members))
        return self.host._raids[self.RAID]

    def test_a_hundred_resumes_racing_the_forming_each_hear_raid_found_once(self):
        """
        100 players resume on another process while the host is still
        telling them where the raid is: for half, the forming's script read
        the old (away) authentication, for the other half the resumed one.
        Each resumed authentication hears raid_found exactly once, with the
        ticket that waits for it and the datagram key the host checks.
        """
        members = list(range(1, 101))
        for user_id in members:
            self.presence.holder[user_id] = f"there {user_id}"
        self.presence.hold_first = set(members)
        hosted = self.hosted(members)
        self.assertEqual(len(self.presence.waiting), 100)
        early = {}
        for user_id in members:
            if user_id % 2:
                early[user_id] = self.presence.waiting[user_id][1]()  # the forming's script ran before the resume
            self.presence.holder[user_id] = f"elsewhere {user_id}"
        for user_id in members:  # the resumes' notices, all at once
            self.host.place_again(user_id, self.RAID, f"elsewhere {user_id}")
        for user_id in members:
            answer, run = self.presence.waiting[user_id]
            answer.callback(early[user_id] if user_id in early else run())
        for member, user_id in enumerate(members):
            [found] = self.presence.heard(user_id)
            self.assertEqual((found["member"], found["ticket"]), (member, self.presence.tickets[user_id]))
            self.assertEqual(found["key"], hosted.keys[member].hex())
        self.assertIs(hosted.raid.stage, Stage_.WAITING)

    def test_a_hundred_resumes_of_one_player_at_once_place_the_last_once(self):
        """
        100 resumes of one player, each replacing the one before, ask the
        host at once: only the authentication holding the player is told,
        once, and its ticket is the one waiting.
        """
        self.presence.holder.update({1: "there 1", 2: "there 2"})
        hosted = self.hosted([1, 2])
        self.presence.holder[1] = "elsewhere 100"
        for n in range(1, 101):
            self.host.place_again(1, self.RAID, f"elsewhere {n}")
        [found] = self.presence.heard(1)
        self.assertEqual((found["ticket"], found["key"]), (self.presence.tickets[1], hosted.keys[0].hex()))

    def test_a_player_on_the_host_needs_no_ticket_and_a_resume_there_takes_one_off(self):
        """
        At forming, the player connected to the host is offered no ticket
        (its raid_found carries none), the other one is.  The other resumes
        on the host before using its ticket: it is told again, with no
        ticket, and the unused one is taken off (a later leave would wait
        for it).
        """
        self.presence.holder.update({1: "host 1", 2: "there 2"})
        self.hosted([1, 2])
        self.assertEqual([f["ticket"] for f in self.presence.heard(1)], [""])
        [offered] = self.presence.heard(2)
        self.assertEqual(list(self.presence.tickets), [2])
        self.presence.holder[2] = "host 3"
        self.host.place_again(2, self.RAID, "host 3")
        self.assertEqual([f["ticket"] for f in self.presence.heard(2)], [""])
        self.assertEqual(self.presence.tickets, {})

    def test_a_raid_that_ends_while_places_are_offered_tells_none_and_leaves_no_ticket(self):
        """
        100 players resume elsewhere mid-fight and the host offers each its
        place again; the boss falls before any offer returns (for half, the
        offer's script ran before it fell, for the other half after).  None
        is told raid_found or raid_fight, no datagram key changes, and every
        ticket offered is taken off (unused, it would hold up the player's
        leave), but not a newer one that replaced it.  Each hears the
        raid's result once it is paid.
        """
        members = list(range(1, 101))
        for user_id in members:
            self.presence.holder[user_id] = f"there {user_id}"
        hosted = self.hosted(members)
        for user_id in members:
            self.host.ready(user_id, self.RAID)
        self.assertIs(hosted.raid.stage, Stage_.FIGHTING)
        keys = hosted.keys
        self.presence.tickets.clear()  # the forming's, used
        self.presence.hold_first = set(members)
        for user_id in members:
            self.presence.holder[user_id] = f"elsewhere {user_id}"
            self.host.place_again(user_id, self.RAID, f"elsewhere {user_id}")
        self.assertEqual(len(self.presence.waiting), 100)
        early = {user_id: self.presence.waiting[user_id][1]() for user_id in members if user_id % 2}
        self.assertEqual(len(self.presence.tickets), 50)
        while self.host.hit(1, self.RAID).hp:
            pass
        self.assertTrue(hosted.over)
        newer = {user_id: f"newer {user_id}" for user_id in members if user_id % 4 == 1}
        self.presence.tickets.update(newer)  # another offer replaced these before the answer came
        for user_id in members:
            answer, run = self.presence.waiting[user_id]
            answer.callback(early[user_id] if user_id in early else run())
        for user_id in members:
            self.assertEqual((self.presence.heard(user_id), self.presence.heard(user_id, "raid_fight")), ([], []))
        self.assertEqual(self.presence.tickets, newer)
        self.assertEqual(hosted.keys, keys)
        self.pay.paying.callback(None)
        for user_id in members:
            [result] = self.presence.heard(user_id, "raid_result")
            self.assertEqual((result["cleared"], result["score"]), (True, hosted.raid.scores[user_id]))

    def test_a_resume_into_a_raid_that_is_over_gets_its_end_not_a_place(self):
        """
        The boss fell and the host is paying: its end is checkpointed at
        once (a resume elsewhere reads it), a resume on the host is told the
        raid with no time left and its final HP and score, gets no
        raid_found and no ticket, and hears the result once the pay is done.
        """
        self.presence.holder.update({1: "there 1", 2: "there 2"})
        hosted = self.hosted([1, 2])
        self.host.ready(1, self.RAID)
        self.host.ready(2, self.RAID)
        while self.host.hit(1, self.RAID).hp:
            pass
        self.assertIn("cleared", [json.loads(c[self.RAID])["stage"] for c in self.matchmaker.checkpoints
                                  if self.RAID in c])
        self.presence.holder[1] = "host 7"
        self.presence.tickets.clear()
        standing = self.successResultOf(defer.ensureDeferred(self.host.rejoin(1, self.RAID, "host", "host 7")))
        self.assertEqual(standing, Standing(self.RAID, 0, 0, hosted.raid.scores[1]))
        self.assertEqual((self.presence.heard(1), self.presence.tickets), ([], {}))
        self.pay.paying.callback(None)
        [result] = self.presence.heard(1, "raid_result")
        self.assertEqual((result["cleared"], result["score"]), (True, hosted.raid.scores[1]))

    def test_a_resume_elsewhere_asks_the_host_for_its_own_authentication(self):
        """A resume on a process that does not host the raid asks the host, naming the resumed authentication."""
        standing = self.successResultOf(defer.ensureDeferred(self.host.rejoin(1, "r9", "other", "host 4")))
        self.assertEqual(self.presence.asked, [("other", PLACE_AGAIN, {"user_id": 1, "raid_id": "r9",
                                                                       "holder": "host 4"})])
        self.assertEqual(standing.ms_left, 0)


class PlaceScriptTests(TestCase):
    """The host's place script and addressed notices against the real Redis Cluster."""

    timeout = 60

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)
        self.presence = Presence(self.router, f"test-place-{random.getrandbits(40):x}", 30, 900)
        self.user = random.randrange(10**13, 10**14)
        self.addCleanup(lambda: self.router.execute("DEL", presence_key(self.user), handoff_key(self.user)))

    async def test_a_ticket_only_for_a_holder_elsewhere_and_only_the_one_expected(self):
        """
        Nobody holds the user: nothing offered.  A holder elsewhere: the
        ticket waits.  Another holder than the one expected: nothing changes.
        A holder on this server: no ticket, and the waiting one is taken off.
        """
        self.assertEqual(await self.presence.offer_place(self.user, "t1", 30), (None, False))
        self.assertIsNone(await self.router.execute("GET", handoff_key(self.user)))
        await self.router.execute("SET", presence_key(self.user), "elsewhere 4")
        self.assertEqual(await self.presence.offer_place(self.user, "t2", 30), ("elsewhere 4", True))
        self.assertEqual(await self.router.execute("GET", handoff_key(self.user)), b"t2")
        here = f"{self.presence.server_id} 9"
        await self.router.execute("SET", presence_key(self.user), here)
        self.assertEqual(await self.presence.offer_place(self.user, "t3", 30, "elsewhere 4"), (here, False))
        self.assertEqual(await self.router.execute("GET", handoff_key(self.user)), b"t2")
        self.assertEqual(await self.presence.offer_place(self.user, "t4", 30, here), (here, False))
        self.assertIsNone(await self.router.execute("GET", handoff_key(self.user)))

    async def test_a_withdrawn_place_takes_off_only_its_own_ticket(self):
        """
        withdraw_place takes the ticket off only while it is the one
        waiting: not one a newer offer put in its place, and once only.
        """
        await self.router.execute("SET", presence_key(self.user), "elsewhere 4")
        self.assertEqual(await self.presence.offer_place(self.user, "t1", 30), ("elsewhere 4", True))
        self.assertEqual(await self.presence.offer_place(self.user, "t2", 30), ("elsewhere 4", True))
        self.assertFalse(await self.presence.withdraw_place(self.user, "t1"))
        self.assertEqual(await self.router.execute("GET", handoff_key(self.user)), b"t2")
        self.assertTrue(await self.presence.withdraw_place(self.user, "t2"))
        self.assertIsNone(await self.router.execute("GET", handoff_key(self.user)))
        self.assertFalse(await self.presence.withdraw_place(self.user, "t2"))

    async def test_an_addressed_notice_names_its_holder(self):
        """tell_holder reaches the holder's process with the holder named; tell names none."""
        heard = []
        subscription = self.presence.listen(lambda user_id, holder: None,
                                             lambda users, event, body, holder: heard.append((users, event, holder)))
        self.addCleanup(subscription.stop)
        await subscription.when_subscribed()
        here = f"{self.presence.server_id} 3"
        await self.router.execute("SET", presence_key(self.user), here)
        await self.presence.tell_holder(self.user, here, "raid_found", {})
        await self.presence.tell([self.user], "party_changed", {})
        await eventually(lambda: defer.succeed(len(heard) == 2))
        self.assertEqual(heard, [([self.user], "raid_found", here), ([self.user], "party_changed", None)])
