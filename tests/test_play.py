"""dreamraid-play: its terminal driven line by line against a real session server and game server, and its console script run as a player would."""

import os
import random
import re
import sys

import pyte
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from dreamraid.client import GameClient, Raid
from dreamraid.client.game import RESULT_AFTER_RESUME
from dreamraid.client.reconnect import BACKOFF_CAP
from dreamraid.client.results import Player
from dreamraid.config import load_settings
from dreamraid.errors import ErrorCode
from dreamraid.client.session import listen_address
from dreamraid.play import Options, Screen, Terminal, hp_bar
from dreamraid.protocols import packets
from dreamraid.tables import load_tables
from tests.support import CONFIG, eventually, spawn
from tests.test_client_library import ServersCase
from tests.test_client_reconnect import FIGHT, FOUND, HEARTBEAT, RESULT, USER, FakeServer, resumed_body

TABLES = load_tables(load_settings(CONFIG).tables.path)


class Transcript:
    """What a plain (not a terminal) screen showed; L{shows} waits for a text to appear."""

    def __init__(self):
        self.text = ""
        self._waiting = []

    def write(self, text):
        self.text += text
        waiting, self._waiting = self._waiting, []
        for needle, start, d in waiting:
            if needle in self.text[start:]:
                d.callback(None)
            else:
                self._waiting.append((needle, start, d))

    def mark(self):
        """Where the text ends now, for L{shows}' C{since}."""
        return len(self.text)

    def since(self, mark):
        return self.text[mark:]

    def shows(self, needle, since=0, timeout=30.0):
        """A Deferred that fires once C{needle} is in the text after C{since}."""
        if needle in self.text[since:]:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((needle, since, d))

        def missing(failure):
            failure.trap(defer.TimeoutError)
            raise AssertionError(f"{needle!r} never shown; the screen showed:\n{self.text}")
        return d.addTimeout(timeout, reactor).addErrback(missing)


class ScreenTests(TestCase):
    """How the screen draws, without any server."""

    def test_plain_screen_prints_lines_and_each_new_status_once(self):
        """Not a terminal: no ANSI codes, and a status line is printed only when it changes."""
        written = []
        screen = Screen(written.append, tty=False)
        screen.say("hello")
        screen.status("Boss [##..] 2/4")
        screen.status("Boss [##..] 2/4")
        screen.status(None)
        self.assertEqual(written, ["hello\n", "Boss [##..] 2/4\n"])

    def test_hp_bar(self):
        """The bar fills with the boss's share of its HP, and shows a sliver while it lives."""
        self.assertEqual(hp_bar(18, 30, 10), "[######....]")
        self.assertEqual(hp_bar(1, 1000, 10), "[#.........]")
        self.assertEqual(hp_bar(0, 30, 10), "[..........]")

    def test_session_address_from_the_listen_endpoint(self):
        """Without --session, the address comes from the session server's listen endpoint."""
        self.assertEqual(listen_address("tcp:9091:interface=127.0.0.1"), ("127.0.0.1", 9091))
        self.assertEqual(listen_address("tcp:port=9091"), ("127.0.0.1", 9091))
        self.assertRaises(ValueError, listen_address, "unix:/tmp/socket")


class CookedTerminal:
    """
    A VT100 terminal (pyte) in cooked mode: the program's output, its
    newlines made CR LF (as the tty's ONLCR does), and what the player
    types, echoed as they type it (Enter echoes CR LF).
    """

    def __init__(self, columns=60, rows=8):
        self.screen = pyte.Screen(columns, rows)
        self.stream = pyte.Stream(self.screen)
        self.written = []

    def write(self, text):
        self.written.append(text)
        self.stream.feed(text.replace("\n", "\r\n"))

    def type(self, text):
        self.stream.feed(text)

    def enter(self):
        self.stream.feed("\r\n")

    def rows(self):
        """The screen's rows down to the cursor's, trailing blanks off."""
        return [row.rstrip() for row in self.screen.display[:self.screen.cursor.y + 1]]

    def input_line(self):
        """The row the cursor is on, up to the cursor."""
        return self.screen.display[self.screen.cursor.y][:self.screen.cursor.x]


class TerminalScreenTests(TestCase):
    """A terminal screen drawn on an emulated cooked terminal while the player types."""

    def setUp(self):
        self.terminal = CookedTerminal()
        self.screen = Screen(self.terminal.write, tty=True, columns=lambda: 60)
        self.screen.say("Welcome, alice!")

    def test_typed_text_stays_visible_while_the_hp_bar_redraws(self):
        """
        Each HP redraw, and a line said meanwhile, leave the half-typed
        line and the cursor after it as they were; the status stays the
        row above it.
        """
        terminal, screen = self.terminal, self.screen
        screen.status("Boss [####] 4/4")
        terminal.type("fight au")
        for hp in (3, 2, 1):
            screen.status(f"Boss [{'#' * hp}{'.' * (4 - hp)}] {hp}/4")
            self.assertEqual(terminal.rows()[-2:], [f"Boss [{'#' * hp}{'.' * (4 - hp)}] {hp}/4", "> fight au"])
            self.assertEqual(terminal.input_line(), "> fight au")
        screen.say("bob joined the party", "cyan")
        self.assertEqual(terminal.rows(), ["Welcome, alice!", "bob joined the party", "Boss [#...] 1/4", "> fight au"])
        self.assertEqual(terminal.input_line(), "> fight au")
        terminal.type("to")
        terminal.enter()
        screen.typed("fight auto")
        self.assertEqual(terminal.rows(), ["Welcome, alice!", "bob joined the party", "> fight auto",
                                           "Boss [#...] 1/4", ">"])
        self.assertEqual(terminal.input_line(), "> ")
        screen.say("Hitting the boss for you.")
        screen.status(None)
        self.assertEqual(terminal.rows()[2:], ["> fight auto", "Hitting the boss for you.", ">"])
        self.assertEqual(terminal.input_line(), "> ")

    def test_a_redraw_never_erases_the_input_line(self):
        """The bytes of an HP redraw: the cursor saved, up to the status row, that row erased, the cursor restored."""
        self.screen.status("Boss 4/4")
        self.screen.status("Boss 3/4")
        self.assertEqual(self.terminal.written[-1], "\x1b7\x1b[1A\r\x1b[2KBoss 3/4\x1b8")

    def test_an_empty_enter_in_a_fight_leaves_no_history(self):
        """Enter alone hits: the status and prompt are drawn again where they were, no "> " line piles up."""
        terminal, screen = self.terminal, self.screen
        screen.status("Boss 4/4")
        for _ in range(3):
            terminal.enter()
            screen.typed("")
        self.assertEqual(terminal.rows(), ["Welcome, alice!", "Boss 4/4", ">"])

    def test_lines_said_scroll_the_screen_and_keep_the_input_line(self):
        """More lines than the screen has rows: the older ones scroll away, the status and the typed text stay."""
        terminal, screen = self.terminal, self.screen
        screen.status("Boss 9/9")
        terminal.type("hel")
        for n in range(12):
            screen.say(f"line {n}")
        self.assertEqual(terminal.rows(), [f"line {n}" for n in range(6, 12)] + ["Boss 9/9", "> hel"])
        self.assertEqual(terminal.input_line(), "> hel")

    def test_long_lines_wrap_above_and_the_status_is_cut_to_one_row(self):
        terminal = CookedTerminal(columns=20, rows=8)
        screen = Screen(terminal.write, tty=True, columns=lambda: 20)
        screen.say("hi")
        screen.status(screen.paint("Boss [##########] 10/10  97s left", "green"))
        terminal.type("inv")
        screen.say("a line long enough to wrap twice over")
        self.assertEqual(terminal.rows(), ["hi", "a line long enough t", "o wrap twice over", "Boss [##########] 1",
                                           "> inv"])
        self.assertEqual(terminal.input_line(), "> inv")

    def test_leaving_takes_the_status_and_prompt_away(self):
        self.screen.status("Boss 4/4")
        self.screen.say("Bye!")
        self.screen.leave()
        self.assertEqual(self.terminal.rows(), ["Welcome, alice!", "Bye!", ""])


class LostRaidTests(TestCase):
    """
    A raid that ended while the link was down, on a real game client over
    an in-memory server and a task.Clock: the fight on screen (HP bar,
    ticker, auto-hitter) ends when the client finds the raid lost, not
    before and not never.
    """

    def setUp(self):
        self.clock = Clock()
        self.server = FakeServer(self.clock)
        self.client = GameClient(self.clock, self.server.client, ("127.0.0.1", 9090), USER, rng=random.Random(3),
                                 heartbeat=HEARTBEAT, give_up_after=30)
        self.client.token = "the-token"
        self.client.player = Player(USER, "alice", 3, 9)
        self.servers = []
        self.client._connect = lambda host, port: (defer.fail(self.servers.pop(0)) if isinstance(self.servers[0], Exception)
                                                   else defer.succeed(self.servers.pop(0).client))
        self.delays = []
        self.client.on("reconnecting", lambda attempt, delay: self.delays.append(delay))
        self.transcript = Transcript()
        self.terminal = Terminal(self.clock, Screen(self.transcript.write), ("127.0.0.1", 1), TABLES)
        self.terminal.client = self.client
        self.terminal._follow(self.client)
        raid = Raid(self.client, FOUND)
        self.client._in_raid["r1"] = raid
        self.client._remember("r1", "found")
        self.terminal._raid_found(raid)
        self.terminal._fight_began(FIGHT)
        self.battle = self.terminal.battle
        self.battle.keep_hitting(True)
        self.assertTrue(self.battle.fighting)

    def hits(self, server):
        return len([r for r in server.requests() if r[0] == "raid_hit"])

    def back_on(self, answer):
        """Drop the link; the next attempt reaches a new server, which C{answer(server, request)} answers."""
        self.server.drop()
        again = FakeServer(self.clock)
        self.servers.append(again)
        self.clock.advance(self.delays[-1])
        answer(again)
        return again

    def test_a_raid_lost_after_a_resume_ends_the_fight_once_its_result_wait_is_over(self):
        """
        Resumed in no raid: the fight stays on for RESULT_AFTER_RESUME (its
        result may still come), then ends: the HP bar goes, the ticker and
        the auto-hitter stop, and the player is told why.
        """
        def resumed(server):
            _, request_id, _ = server.last("resume")
            server.reply(packets.RESUMED, request_id, resumed_body(""))
        again = self.back_on(resumed)
        self.clock.advance(RESULT_AFTER_RESUME - 0.01)
        self.assertIs(self.terminal.battle, self.battle)
        self.assertNotIn("Your raid ended while you were away", self.transcript.text)
        self.clock.advance(0.01)
        self.assertIsNone(self.terminal.battle)
        self.assertFalse(self.battle.fighting)
        self.assertIsNone(self.battle._hitter)
        self.assertIn("Your raid ended while you were away", self.transcript.text)
        hits = self.hits(again)
        self.clock.advance(10)
        self.assertEqual(self.hits(again), hits)  # no hitting a raid that is over

    def test_a_result_told_after_the_resume_ends_the_fight_with_the_result(self):
        """Resumed in no raid, the result the server kept follows: the fight ends with it, not as lost."""
        def resumed(server):
            _, request_id, _ = server.last("resume")
            server.reply(packets.RESUMED, request_id, resumed_body(""))
        again = self.back_on(resumed)
        again.client.dataReceived(packets.RAID_RESULT.encode(0, RESULT))
        self.assertIsNone(self.terminal.battle)
        self.assertIn("VICTORY", self.transcript.text)
        self.clock.advance(RESULT_AFTER_RESUME)
        self.assertNotIn("Your raid ended while you were away", self.transcript.text)

    def test_a_raid_lost_by_entering_again_ends_the_fight_at_once(self):
        """The session was gone and the client entered again (a new session, kept nothing): the fight ends at once."""
        async def relogin():
            return "127.0.0.1", 9191, "new-token"
        self.client._relogin = relogin
        fresh = FakeServer(self.clock)

        def expired(server):
            self.servers.append(fresh)  # where the client enters again
            _, request_id, _ = server.last("resume")
            server.error(request_id, ErrorCode.RESUME_EXPIRED)
            _, request_id, _ = fresh.last("authenticate")
            fresh.reply(packets.AUTHENTICATED, request_id, {"user_id": USER, "name": "alice", "level": 3, "exp": 9})
        self.back_on(expired)
        self.assertIsNone(self.terminal.battle)
        self.assertFalse(self.battle.fighting)
        text = self.transcript.text
        self.assertLess(text.index("Reconnected: playing on."), text.index("Your raid ended while you were away"))

    def test_giving_up_ends_the_fight_and_the_session(self):
        """The client gives up: the player is told they are disconnected, the fight is over, nothing spins on."""
        self.server.drop()
        self.servers += [error.ConnectionRefusedError()] * 20
        for _ in range(10):
            self.clock.advance(BACKOFF_CAP)
        self.assertIn("Disconnected", self.transcript.text)
        self.assertIsNone(self.terminal.client)
        self.assertIsNone(self.terminal.battle)
        self.assertFalse(self.battle.fighting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OptionsTests(TestCase):
    """dreamraid-play's command line, checked as it is parsed."""

    def test_options(self):
        """Every option parsed: the session address split, the tables loaded from the configuration."""
        options = Options()
        options.parseOptions(["--config", str(CONFIG), "--session", "10.0.0.2:9999", "--name", "alice",
                              "--password", "correct horse", "--register"])
        self.assertEqual({k: v for k, v in options.items() if k != "tables"}, {
            "config": str(CONFIG), "session": ("10.0.0.2", 9999), "name": "alice", "password": "correct horse",
            "register": 1})
        self.assertEqual(options["tables"], TABLES)

    def test_session_defaults_to_the_configuration(self):
        """Without --session, the shipped configuration's session server (127.0.0.1:9091)."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["session"], ("127.0.0.1", 9091))

    def test_bad_options(self):
        """A session that is not HOST:PORT, and --register without --name, stop at parse time."""
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--session", "127.0.0.1:x"])
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--register"])


class PlayTests(ServersCase):
    """A player types commands into the terminal; the real servers answer."""

    def terminal(self):
        """A terminal on a plain screen whose L{Transcript} is C{terminal.transcript}."""
        transcript = Transcript()
        terminal = Terminal(reactor, Screen(transcript.write), ("127.0.0.1", self.session.port), TABLES)
        terminal.transcript = transcript
        self.addCleanup(lambda: terminal.command("quit"))
        return terminal

    async def type(self, terminal, line):
        """What typing C{line} showed."""
        mark = terminal.transcript.mark()
        await terminal.command(line)
        return terminal.transcript.since(mark)

    async def registered(self, terminal):
        name = f"p_{random.getrandbits(40):x}"
        self.assertIn(f"Welcome, {name}!", await self.type(terminal, f"register {name} correct horse"))
        return name

    async def test_account_progression_and_inventory(self):
        """Register and log in, see the profile, hunt, get an item, see it in the inventory, enhance and use items."""
        terminal = self.terminal()
        self.assertIn("Log in first", await self.type(terminal, "hunt"))
        name = await self.registered(terminal)
        profile = await self.type(terminal, "profile")
        self.assertIn(f"{name}: level 1, exp 0/1", profile)
        self.assertIn("rank: not ranked yet", profile)
        self.assertIn("+1 exp (exp 1/2). Level up! You are level 2.", await self.type(terminal, "hunt"))
        self.assertIn("Granted: Bronze sword x1 (equipment slot 0)", await self.type(terminal, "grant 101"))
        self.assertIn("Granted: Small potion x3 (consumables slot 0)", await self.type(terminal, "grant 201 3"))
        inventory = await self.type(terminal, "inventory")
        self.assertRegex(inventory, r"equipment\s+0\s+Bronze sword\s+\+0\s+1  \(weapon\)")
        self.assertRegex(inventory, r"consumables\s+0\s+Small potion\s+3")
        self.assertIn("Success! Bronze sword is now +1. Next try: 90% chance.", await self.type(terminal, "enhance 0"))
        self.assertIn("You used Small potion; 2 left in slot 0.", await self.type(terminal, "use 0"))
        self.assertIn("Moved consumables slot 0 to slot 4.", await self.type(terminal, "move cons 0 4"))
        inventory = await self.type(terminal, "inventory")
        self.assertRegex(inventory, r"Bronze sword\s+\+1")
        self.assertRegex(inventory, r"consumables\s+4\s+Small potion\s+2")
        self.assertIn("weapon (equipment slot 0): Bronze sword +1", await self.type(terminal, "profile"))
        self.assertIn(f"Logged out. See you, {name}!", await self.type(terminal, "logout"))

    async def test_mistakes_and_refusals_are_friendly_lines(self):
        """An unknown command, wrong words and the server's refusals each print one line naming the problem."""
        terminal = self.terminal()
        self.assertIn("Unknown command 'dance': `help` lists them.", await self.type(terminal, "dance"))
        self.assertIn("Usage: login NAME PASSWORD", await self.type(terminal, "login alice"))
        self.assertIn("WRONG_CREDENTIALS: no such user, or the wrong password",
                      await self.type(terminal, "login nobody_here wrong password"))
        await self.registered(terminal)
        self.assertIn("Usage: enhance SLOT", await self.type(terminal, "enhance sword"))
        self.assertIn("UNKNOWN_MONSTER: no monster of that kind", await self.type(terminal, "hunt 9"))
        self.assertIn("EMPTY_SLOT: that slot is empty", await self.type(terminal, "enhance 3"))
        self.assertIn("NOT_IN_PARTY", await self.type(terminal, "party leave"))
        self.assertIn("NOT_QUEUED", await self.type(terminal, "cancel"))
        self.assertIn("You are in no raid", await self.type(terminal, "fight"))
        self.assertNotIn("Traceback", terminal.transcript.text)

    async def test_party_raid_and_ranking(self):
        """Two players party up by code and queue; both see the fight live and the result; the board ranks them."""
        leader, friend = self.terminal(), self.terminal()
        leader_name, friend_name = await self.registered(leader), await self.registered(friend)
        created = await self.type(leader, "party create")
        code = re.search(r"Invite code: (\w+)", created).group(1)
        self.assertIn(f"You joined party {code}: {leader_name} (leader), {friend_name} (you)",
                      await self.type(friend, f"party join {code.lower()}"))
        await leader.transcript.shows(f"{friend_name} joined the party: {code}: {leader_name} (leader, you), "
                                      f"{friend_name}.")
        self.assertIn("Queued for a raid (level group 1)", await self.type(leader, "queue"))
        await friend.transcript.shows("Your party's leader queued the party for a raid (level group 1).")
        for terminal, other in ((leader, friend_name), (friend, leader_name)):
            await terminal.transcript.shows(f"Raid found! You go with {other}.")
            await terminal.transcript.shows("FIGHT! The boss has 4 HP")
            await terminal.transcript.shows("Boss [####################] 4/4")
        await self.type(leader, "")  # Enter hits
        self.assertIn("Hitting the boss for you", await self.type(leader, "fight auto"))
        for terminal in (leader, friend):
            await terminal.transcript.shows("VICTORY! The boss is down.")
        await leader.transcript.shows("Your score 4 (team 4), +4 exp")
        await leader.transcript.shows("on the board with a best score of 4.")
        self.assertIn("you dealt 4", leader.transcript.text)
        place = int(re.search(r"You are #(\d+) on the board", leader.transcript.text).group(1))
        # The test database holds other players' scores, ties among them: look from the leader's place on.
        for first in range(place, place + 100, 10):
            page = await self.type(friend, f"ranking {first}")
            if leader_name in page:
                break
        self.assertRegex(page, rf"{place}  {leader_name}\s+4\n")
        self.assertRegex(await self.type(leader, f"ranking {first}"), rf"{place}  {leader_name}\s+4  <- you")
        self.assertIn("There is nothing to hit", await self.type(leader, "hit"))

    async def test_logging_in_elsewhere_is_told(self):
        """The same account logging in on another terminal: the first one says why it was disconnected."""
        first, second = self.terminal(), self.terminal()
        name = await self.registered(first)
        await self.type(second, f"login {name} correct horse")
        await first.transcript.shows("Disconnected (LOGGED_IN_ELSEWHERE")
        self.assertIn("Log in first", await self.type(first, "hunt"))


class PlayReconnectTests(ServersCase):
    """dreamraid-play rides over a dropped link: it says it is reconnecting and plays on (a resume grace on)."""

    game_options = ("--game-resume-grace", "30")
    terminal, type, registered = PlayTests.terminal, PlayTests.type, PlayTests.registered

    async def test_a_dropped_link_is_reconnected_and_play_goes_on(self):
        terminal = self.terminal()
        await self.registered(terminal)
        terminal.client.connection.transport.abortConnection()
        await terminal.transcript.shows("reconnecting...")
        await terminal.transcript.shows("Reconnected: playing on.")
        self.assertNotIn("Disconnected", terminal.transcript.since(0))
        shown = await self.type(terminal, "hunt")
        self.assertNotIn("Log in first", shown)
        self.assertNotIn("Disconnected", shown)


class PlaySessionGoneTests(ServersCase):
    """A game server that keeps no away player (resume grace 0): dreamraid-play comes back with the refresh token."""

    terminal, type, registered = PlayTests.terminal, PlayTests.type, PlayTests.registered

    async def test_a_drop_past_resuming_comes_back_without_the_password(self):
        """No "Disconnected", no "Bye!": the client logs in again with its refresh token and play goes on."""
        terminal = self.terminal()
        name = await self.registered(terminal)
        terminal.client.connection.transport.abortConnection()
        await terminal.transcript.shows("reconnecting...")
        await terminal.transcript.shows("Reconnected: playing on.")
        self.assertFalse(terminal.finished.called)
        self.assertIn(f"{name}: level 1", await self.type(terminal, "profile"))
        self.assertIn("You hunted", await self.type(terminal, "hunt"))
        self.assertNotIn("Disconnected", terminal.transcript.text)
        self.assertNotIn("Bye!", terminal.transcript.text)


class ConsoleScriptTests(ServersCase):
    """The installed dreamraid-play, run as a process with its standard input and output piped."""

    async def test_console_script_plays_from_standard_input(self):
        """Lines written to its standard input are played; the end of input logs out and exits cleanly."""
        script = os.path.join(os.path.dirname(sys.executable), "dreamraid-play")
        if not os.path.exists(script):
            self.fail(f"{script} is missing: install the project (make venv)")
        child = spawn(self, script, "--session", f"127.0.0.1:{self.session.port}")
        name = f"s_{random.getrandbits(40):x}"

        def showing(text):
            async def probe():
                return text in "\n".join(child.lines())
            return eventually(probe)
        child.transport.write(f"register {name} correct horse\n".encode())
        await showing(f"Welcome, {name}!")
        child.transport.write(b"hunt\ninventory\nparty create\n")
        await showing("Invite code:")
        child.transport.closeStdin()
        reason = await child.ended
        output = "\n".join(child.lines())
        self.assertIsInstance(reason, error.ProcessDone, output)
        self.assertIn("You hunted a kind 1 monster: +1 exp", output)
        self.assertIn(f"Logged out. See you, {name}!\nBye!", output)
        self.assertNotIn("\x1b[", output)
