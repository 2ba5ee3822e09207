"""
dreamraid-play: the game in a terminal.  Log in or register, hunt, look
after the inventory, party up by invite code, queue for a raid and fight
its boss with a live HP bar fed by the raid's UDP channel.

L{Terminal} runs the commands a player types and shows what they and the
servers' pushes did on a L{Screen}; L{StdioLines} feeds it the lines read
from standard input.  Nothing here blocks the reactor.
"""

import fcntl
import getpass
import inspect
import math
import os
import re
import shutil
import sys

from twisted.internet import defer, interfaces, stdio, task
from twisted.internet.error import ConnectError
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from zope.interface import implementer

from dreamraid.client import ConnectionClosed, OutcomeUnknown, RemoteError, play
from dreamraid.client.results import raid_result
from dreamraid.client.session import host_port, listen_address
from dreamraid.config import DEFAULT_PATH, ConfigError, load_settings
from dreamraid.errors import ERROR_TEXT, ErrorCode
from dreamraid.protocols import packets
from dreamraid.tables import TABS, load_tables

TAB_NAMES = {number: name for name, number in TABS.items()}
WEAPON_SLOT = 0  # the equipment slot whose enhancement adds to each hit
AUTO_HIT_INTERVAL = 0.25  # seconds between automatic hits (the default hit_interval is 0.2)
BAR_WIDTH = 20

_COLORS = {"red": 31, "green": 32, "yellow": 33, "cyan": 36, "bold": 1, "dim": 2}


# The ANSI (VT100) controls the terminal screen uses.
SAVE_CURSOR, RESTORE_CURSOR = "\x1b7", "\x1b8"  # the position, column included
INDEX = "\x1bD"  # down a row, the column kept; at the bottom the screen scrolls up
ERASE_LINE, ERASE_BELOW = "\x1b[2K", "\x1b[J"
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b.")


def _up(rows):
    return f"\x1b[{rows}A" if rows else ""


def _down(rows):
    return f"\x1b[{rows}B" if rows else ""


def visible_length(text):
    """How many columns C{text} takes on a terminal: its ANSI codes take none."""
    return len(_ESCAPE.sub("", text))


def fit(text, columns):
    """C{text} cut to at most C{columns - 1} visible columns (its ANSI codes kept whole), so it never wraps."""
    if columns is None or visible_length(text) < columns:
        return text
    kept, shown, at = [], 0, 0
    while at < len(text) and shown < columns - 1:
        code = _ESCAPE.match(text, at)
        if code:
            kept.append(code.group())
            at = code.end()
        else:
            kept.append(text[at])
            shown += 1
            at += 1
    return "".join(kept) + "\x1b[0m"


class Screen:
    """
    Where the game's output goes: lines, and below them the status line
    (the boss's HP bar in a fight) and the input line the player types on.

    On a terminal, which in cooked mode echoes what the player types itself
    and hands the line over only at Enter, the input line is never written
    over while the player types on it: the status is a line of its own just
    above it, redrawn from the input line with the cursor saved and restored
    (column included); a line said is inserted above the status (made room
    for below, then I{insert line}), the status and the input line moving
    down with the text typed so far; and once Enter moved the cursor down,
    L{typed} draws the line entered (as history, unless empty), the status
    and a fresh prompt.  C{columns}, a callable giving the terminal's width,
    lets it count the rows a long line wraps to and cut the status to one
    row.  Not on a terminal, each new status is a plain line of its own.
    """

    PROMPT = "> "

    def __init__(self, write, tty=False, columns=None):
        self._write = write
        self.tty = tty
        self._columns = columns or (lambda: None)
        self._status = None  # the status text, or None for none
        self._shown = False  # whether the status and input lines are on the terminal

    def say(self, text, color=None):
        """Show C{text} (one or more lines)."""
        if not self.tty:
            self._write(text + "\n")
            return
        painted = self.paint(text, color)
        if not self._shown:
            self._write(painted + "\n" + self._bottom())
            return
        rows = self._rows(text)
        # Make room below the input line (scrolling if it is the last row), back to the column typed to,
        # then insert the text's rows above the status: the status and input lines move down with it.
        self._write(INDEX * rows + _up(rows) + SAVE_CURSOR + _up(self._status_rows()) + "\r" + f"\x1b[{rows}L" +
                    painted + RESTORE_CURSOR + _down(rows))

    def status(self, text):
        """Show C{text} as the status; None takes it away."""
        if text == self._status:
            return
        before, self._status = self._status, text
        if not self.tty:
            if text is not None:
                self._write(text + "\n")
            return
        if not self._shown:
            self._write(self._bottom())
        elif before is not None and text is not None:  # redrawn in place, the input line untouched
            self._write(SAVE_CURSOR + _up(1) + "\r" + ERASE_LINE + self._fitted(text) + RESTORE_CURSOR)
        elif text is not None:  # a status row inserted above the input line
            self._write(INDEX + _up(1) + SAVE_CURSOR + "\r\x1b[1L" + self._fitted(text) + RESTORE_CURSOR + _down(1))
        else:  # the status row deleted: the input line moves up into it
            self._write(SAVE_CURSOR + _up(1) + "\x1b[1M" + RESTORE_CURSOR + _up(1))

    def typed(self, line=""):
        """
        The player pressed Enter after typing C{line}: on a terminal the
        cursor is on the row below the input line; draw the line entered
        (kept as history unless empty), the status and a new prompt.
        """
        if not (self.tty and self._shown):
            return
        entered = self._rows(self.PROMPT + line)
        history = self.PROMPT + line + "\n" if line.strip() else ""
        self._write(_up(entered + self._status_rows()) + "\r" + ERASE_BELOW + history + self._bottom())

    def prompt(self):
        """Make sure the status and the prompt are shown (after a command that showed nothing)."""
        if self.tty and not self._shown:
            self._write(self._bottom())

    def leave(self):
        """The player is leaving: take the status and input lines away."""
        if self.tty and self._shown:
            self._write("\r" + _up(self._status_rows()) + ERASE_BELOW)
            self._shown = False

    def paint(self, text, color):
        """C{text} in C{color} (a name of L{_COLORS}) on a terminal; as it is otherwise."""
        if not self.tty or color is None:
            return text
        return f"\x1b[{_COLORS[color]}m{text}\x1b[0m"

    def _bottom(self):
        """The status line (if any) and the prompt, drawn from the start of a free row."""
        self._shown = True
        return ("" if self._status is None else self._fitted(self._status) + "\n") + self.PROMPT

    def _status_rows(self):
        return 0 if self._status is None else 1

    def _fitted(self, text):
        return fit(text, self._columns())

    def _rows(self, text):
        """The terminal rows C{text} takes, its long lines wrapped at the terminal's width (if known)."""
        columns = self._columns()
        return sum(max(1, -(-visible_length(line) // columns)) if columns else 1 for line in text.split("\n"))


class Usage(Exception):
    """A command was given words it cannot use; its usage line is shown."""


_COMMANDS = {}


def verb(*forms, needs_login=True, rest=False):
    """
    Make the method the command named by the first word of its C{forms},
    C{(usage, summary)} pairs for help; with C{rest}, the method's last
    parameter takes the rest of the line as typed (a password may hold
    spaces).
    """
    def add(method):
        _COMMANDS[forms[0][0].split()[0]] = _Command(method, forms, needs_login, rest)
        return method
    return add


class _Command:
    def __init__(self, method, forms, needs_login, rest):
        self.method, self.forms, self.needs_login = method, forms, needs_login
        self.usage = " | ".join(usage for usage, _ in forms)
        self.signature = inspect.signature(method)
        self.words = len(self.signature.parameters) - 1 if rest else -1  # split this many times

    def arguments(self, line):
        """The words after the command name, or L{Usage}."""
        words = line.split(maxsplit=self.words)[1:] if self.words >= 0 else line.split()[1:]
        try:
            self.signature.bind(None, *words)
        except TypeError:
            raise Usage() from None
        return words


def _number(text):
    try:
        return int(text)
    except ValueError:
        raise Usage() from None


def _tab(text):
    """A tab by number or by (the start of) its name."""
    if text.isdigit() and int(text) in TAB_NAMES:
        return int(text)
    matches = [number for name, number in TABS.items() if name.startswith(text.lower())]
    if len(matches) != 1:
        raise Usage()
    return matches[0]


def hp_bar(hp, full, width=BAR_WIDTH):
    """C{[#####.....]}: the share of C{full} that C{hp} is, never empty while the boss lives."""
    filled = 0 if hp <= 0 else max(1, round(width * hp / full))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Battle:
    """
    A raid this player is in: its boss's HP as the UDP channel last heard
    it, the time left, the damage dealt, and the timers of its fight: one
    redraws the time left every second, the other keeps hitting while the
    player chose to (C{auto}).
    """

    def __init__(self, raid, clock):
        self.raid = raid
        self._clock = clock
        self.full_hp = None  # once the fight begins
        self.dealt = 0
        self.note = ""  # shown after the status until the next hit lands, e.g. "too fast!"
        self.auto = False
        self._ticker = self._hitter = None
        self._hit = None

    @property
    def fighting(self):
        return self._ticker is not None

    def begin(self, body, redraw, hit):
        """
        The fight began (C{body} is its raid_fight push): C{redraw()} every
        second, and C{hit()} (a Deferred) every L{AUTO_HIT_INTERVAL} while C{auto}.
        """
        self.raid.deadline = body["deadline_ms"] / 1000
        self.full_hp = body["hp"]
        self._ticker = self._every(1.0, redraw, now=False)
        self._hit = hit
        self.keep_hitting(self.auto)

    def keep_hitting(self, auto):
        """Hit for the player, or stop; once the fight begins if it has not yet."""
        self.auto = auto
        if auto and self.fighting and self._hitter is None:
            self._hitter = self._every(AUTO_HIT_INTERVAL, self._hit)
        elif not auto and self._hitter is not None:
            self._hitter.stop()
            self._hitter = None

    def end(self):
        """The raid is over: stop its timers and close its UDP channel."""
        for loop in (self._ticker, self._hitter):
            if loop is not None and loop.running:
                loop.stop()
        self._ticker = self._hitter = None
        self.raid.close()

    def _every(self, interval, call, now=True):
        loop = task.LoopingCall(call)
        loop.clock = self._clock
        loop.start(interval, now=now)
        return loop

    def seconds_left(self):
        return max(0, math.ceil(self.raid.deadline - self._clock.seconds()))

    def status(self, paint, tty):
        """The status line: C{Boss [#####.....] 18/30  97s left  you dealt 4}."""
        hp = self.full_hp if self.raid.hp is None else self.raid.hp
        share = hp / self.full_hp
        color = "green" if share > 0.5 else "yellow" if share > 0.2 else "red"
        text = (f"Boss {paint(hp_bar(hp, self.full_hp), color)} {hp}/{self.full_hp}  "
                f"{self.seconds_left()}s left  you dealt {self.dealt}")
        if self.note:
            text += "  " + paint(self.note, "yellow")
        if tty:
            text += paint("  (Enter: hit, fight auto: keep hitting)", "dim")
        return text


class Terminal:
    """
    The game as one player at a terminal plays it: L{command} runs a typed
    line, one at a time; what it does, and what the servers push, is shown
    on the L{Screen}.
    """

    def __init__(self, reactor, screen, session, tables):
        """
        @param session: C{(host, port)} of the session server.
        @param tables: the L{dreamraid.tables.GameTables}, for item names and levels.
        """
        self._reactor = reactor
        self.screen = screen
        self._session = session
        self._tables = tables
        self._one_at_a_time = defer.DeferredLock()
        self.client = None  # a GameClient while logged in
        self.level = self.exp = 0
        self.items = {}  # (tab, slot) -> SlotItem, as the servers last said
        self.party = None
        self.battle = None
        self._early_fights = {}  # raid id -> raid_fight body that came before its raid_found was done
        self.finished = defer.Deferred()  # fires once the player quits

    # -- running commands -----------------------------------------------------------

    def command(self, line):
        """Run the typed C{line} once the commands before it are done; a Deferred."""
        return self._in_turn(self._run, line)

    def enter(self, name, password, register=False):
        """Log in (registering first if C{register}) once the commands before are done; a Deferred."""
        return self._in_turn(self._reporting, self._enter(name, password, register))

    def _in_turn(self, run, *args):
        return self._one_at_a_time.run(lambda: defer.ensureDeferred(run(*args)))

    async def _run(self, line):
        if self.finished.called:
            return
        if not line.strip():
            if self.battle is not None and self.battle.fighting:
                await self._reporting(self._hit())
            return
        verb = line.split()[0].lower()
        entry = _COMMANDS.get(verb)
        if entry is None:
            self.screen.say(f"Unknown command {verb!r}: `help` lists them.", "red")
            return
        if entry.needs_login and self.client is None:
            self.screen.say("Log in first: `login NAME PASSWORD`, or `register NAME PASSWORD` for a new account.")
            return
        try:
            await entry.method(self, *entry.arguments(line))
        except Usage:
            self.screen.say(f"Usage: {entry.usage}", "red")
        except Exception as e:
            self._report(e)

    async def _reporting(self, coroutine):
        try:
            await coroutine
        except Exception as e:
            self._report(e)

    def _report(self, error):
        """One friendly line for what went wrong: never a traceback."""
        say = self.screen.say
        if isinstance(error, RemoteError):
            say(f"{_code_name(error.code)}: {error.detail}", "red")
        elif isinstance(error, OutcomeUnknown):
            say(f"{error} (look before trying again)", "red")
        elif isinstance(error, ConnectionClosed):
            if self.client is not None:
                self._disconnected(error.code, error.detail)
            else:
                say(f"The server closed the connection{_reason_text(error.code, error.detail)}.", "red")
        elif isinstance(error, ConnectError):
            host, port = self._session
            why = os.strerror(error.osError) if isinstance(error.osError, int) else error
            say(f"Cannot reach the session server at {host}:{port} ({why}). "
                "Is it running (`make run`)?", "red")
        elif isinstance(error, defer.TimeoutError):
            say("The server did not answer in time; try again.", "red")
        else:
            say(f"Something went wrong: {type(error).__name__}: {error}", "red")

    def _background(self, coroutine):
        """Run C{coroutine} beside the commands, reporting what goes wrong."""
        defer.ensureDeferred(self._reporting(coroutine))

    # -- account ----------------------------------------------------------------------

    @verb(("register NAME PASSWORD", "create an account and log in"), needs_login=False, rest=True)
    async def _register(self, name, password):
        await self._enter(name, password, register=True)

    @verb(("login NAME PASSWORD", "log in"), needs_login=False, rest=True)
    async def _login(self, name, password):
        await self._enter(name, password)

    async def _enter(self, name, password, register=False):
        if self.client is not None:
            self.screen.say(f"You are playing as {self.client.player.name}: `logout` first.")
            return
        host, port = self._session
        client = await play(self._reactor, host, port, name, password, register=register)
        self.client, self.level, self.exp = client, client.player.level, client.player.exp
        self._follow(client)
        self.items = {(i.tab, i.slot): i for i in await client.inventory()}
        self.party = await client.my_party()
        created = "Account created. " if register else ""
        self.screen.say(f"{created}Welcome, {client.player.name}! Level {self.level}, {self._exp_text()}. "
                        "`help` lists the commands.", "green")

    # -- progression and inventory ----------------------------------------------------

    @verb(("profile", "your level, exp, weapon, party and rank"))
    async def _profile(self):
        rank, party = await defer.gatherResults([defer.ensureDeferred(self.client.my_rank()),
                                                 defer.ensureDeferred(self.client.my_party())])
        self.party = party
        weapon = self.items.get((TABS["equipment"], WEAPON_SLOT))
        lines = [f"{self.client.player.name}: level {self.level}, {self._exp_text()}",
                 f"  weapon (equipment slot {WEAPON_SLOT}): {self._item_text(weapon) if weapon else 'none'}",
                 f"  party: {self._party_text(party) if party else 'none'}",
                 f"  rank: #{rank.rank}, best score {rank.score}" if rank.rank else "  rank: not ranked yet"]
        self.screen.say("\n".join(lines))

    @verb(("inventory", "what you carry, tab by tab"))
    async def _inventory(self):
        self.items = {(i.tab, i.slot): i for i in await self.client.inventory()}
        if not self.items:
            self.screen.say("Your bags are empty: `hunt` for loot.")
            return
        rows = [f"{'tab':<12}{'slot':>4}  {'item':<16}{'+':>3}{'count':>7}"]
        for (tab, slot), item in sorted(self.items.items()):
            plus = f"+{item.enhancement}" if tab == TABS["equipment"] else ""
            note = "  (weapon)" if (tab, slot) == (TABS["equipment"], WEAPON_SLOT) else ""
            rows.append(f"{TAB_NAMES.get(tab, tab):<12}{slot:>4}  {self._name(item.item_code):<16}{plus:>3}"
                        f"{item.count:>7}{note}")
        self.screen.say("\n".join(rows))

    @verb(("hunt [KIND]", "hunt a monster (kind 1 unless told): exp, levels, loot"))
    async def _hunt(self, kind="1"):
        hunted = await self.client.hunt(_number(kind))
        self.level, self.exp = hunted.level, hunted.exp
        text = f"You hunted a kind {kind} monster: +{hunted.exp_gained} exp ({self._exp_text()})."
        if hunted.levels_gained:
            text += f" Level up! You are level {hunted.level}."
        self.screen.say(text + self._loot_text(hunted.changed), "green" if hunted.levels_gained else None)

    @verb(("enhance SLOT", f"try to raise the equipment in SLOT by +1 (slot {WEAPON_SLOT}: your weapon)"))
    async def _enhance(self, slot):
        slot = _number(slot)
        before = self.items.get((TABS["equipment"], slot))
        enhanced = await self.client.enhance(slot)
        name = self._name(before.item_code) if before else f"The item in slot {slot}"
        if before is not None:
            self.items[TABS["equipment"], slot] = before._replace(enhancement=enhanced.enhancement)
        if enhanced.success:
            self.screen.say(f"Success! {name} is now +{enhanced.enhancement}.{self._chance_text(enhanced)}", "green")
        else:
            self.screen.say(f"The enhancement failed: {name} stays +{enhanced.enhancement}."
                            f"{self._chance_text(enhanced)}", "yellow")

    @verb(("use SLOT", "use one consumable from SLOT"))
    async def _use(self, slot):
        slot = _number(slot)
        before = self.items.get((TABS["consumables"], slot))
        changed = await self.client.use_item(slot)
        self._apply(changed)
        after = self.items.get((TABS["consumables"], slot))
        name = self._name(before.item_code) if before else "the item"
        self.screen.say(f"You used {name}; {after.count if after else 'none'} left in slot {slot}.")

    @verb(("move TAB FROM TO", "move, swap or stack within a tab (equipment, consumables, materials)"))
    async def _move(self, tab, from_slot, to_slot):
        tab, from_slot, to_slot = _tab(tab), _number(from_slot), _number(to_slot)
        self._apply(await self.client.move_item(tab, from_slot, to_slot))
        self.screen.say(f"Moved {TAB_NAMES[tab]} slot {from_slot} to slot {to_slot}.")

    @verb(("grant CODE [COUNT]", "items from nowhere by item code (development servers only)"))
    async def _grant(self, item, count="1"):
        changed = await self.client.grant(_number(item), _number(count))
        self.screen.say(f"Granted: {self._gained_text(changed)}.")

    # -- parties and raids ------------------------------------------------------------

    @verb(("party", "your party and its invite code"), ("party create", "make a party; friends join with its code"),
          ("party join CODE", "join a friend's party"), ("party leave", "leave your party"),
          ("party kick NAME", "the leader sends a member away"))
    async def _party(self, action="show", argument=None):
        action = action.lower()
        if action == "show" and argument is None:
            self.party = await self.client.my_party()
            self.screen.say(f"Party {self._party_text(self.party)}." if self.party else
                            "You are in no party: `party create`, or `party join CODE` with a friend's code.")
        elif action == "create" and argument is None:
            self.party = await self.client.create_party()
            self.screen.say(f"Party created. Invite code: {self.party.code} (friends type "
                            f"`party join {self.party.code}`). `queue` when you are all here.", "green")
        elif action == "join" and argument is not None:
            self.party = await self.client.join_party(argument)
            self.screen.say(f"You joined party {self._party_text(self.party)}. Its leader queues for raids.",
                            "green")
        elif action == "leave" and argument is None:
            await self.client.leave_party()
            self.party = None
            self.screen.say("You left the party.")
        elif action == "kick" and argument is not None:
            member = next((m for m in (self.party.members if self.party else ())
                           if m.name.lower() == argument.lower()), None)
            if member is None:
                self.screen.say(f"No member of your party is named {argument}.", "red")
                return
            self.party = await self.client.kick(member.user_id)
            self.screen.say(f"You kicked {member.name}. Party {self._party_text(self.party)}.")
        else:
            raise Usage()

    @verb(("queue", "wait for a raid (a party's leader queues the whole party)"))
    async def _queue(self):
        group = await self.client.queue_raid()
        self.screen.say(f"Queued for a raid (level group {group}). Waiting for players... (`cancel` leaves the queue)")

    @verb(("cancel", "leave the raid queue"))
    async def _cancel(self):
        await self.client.cancel_queue()
        self.screen.say("You left the raid queue.")

    @verb(("fight", "the raid's fight: the boss's HP and the time left"),
          ("fight auto", "keep hitting the boss for you"), ("fight stop", "stop that: Enter hits"))
    async def _fight(self, mode="show"):
        battle = self.battle
        if mode not in ("show", "auto", "stop"):
            raise Usage()
        if battle is None:
            self.screen.say("You are in no raid: `queue` to find one.")
            return
        if mode == "stop":
            battle.keep_hitting(False)
            self.screen.say("Automatic hitting stopped: Enter hits.")
            return
        if mode == "auto":
            battle.keep_hitting(True)
        if not battle.fighting:
            auto = " You will keep hitting as soon as it begins." if battle.auto else ""
            self.screen.say(f"The fight begins once everyone is ready.{auto}")
        elif battle.auto:
            self.screen.say("Hitting the boss for you (`fight stop` to stop).")
        else:
            self.screen.say("Press Enter (or `hit`) to hit the boss, `fight auto` to keep hitting.")
        self._show_battle()

    @verb(("hit", "hit the boss once (in a fight, Enter does too)"))
    async def _hit_command(self):
        await self._hit()

    async def _hit(self):
        battle = self.battle
        if battle is None or not battle.fighting:
            self.screen.say("There is nothing to hit: no fight is on.")
            return
        if battle.raid.hp == 0:
            self.screen.say("The boss is down! The result is on its way.")
            return
        try:
            hit = await battle.raid.hit()
        except RemoteError as e:
            if e.code is not ErrorCode.HIT_TOO_SOON:
                raise
            battle.note = "too fast!"
        else:
            battle.dealt, battle.note = battle.dealt + hit.damage, ""
        self._show_battle()

    async def _auto_hit(self, battle):
        """One of the hits C{fight auto} makes: those the host refuses as too soon or too late are let go."""
        if battle.raid.hp == 0:
            return
        try:
            hit = await battle.raid.hit()
        except RemoteError as e:
            if e.code not in (ErrorCode.HIT_TOO_SOON, ErrorCode.RAID_NOT_FIGHTING, ErrorCode.NOT_IN_RAID):
                raise
        else:
            battle.dealt, battle.note = battle.dealt + hit.damage, ""
            self._show_battle()

    @verb(("ranking [FIRST]", "the ranking board: 10 places from FIRST (1 unless told)"))
    async def _ranking(self, first="1"):
        entries = await self.client.ranking(_number(first), 10)
        if not entries:
            self.screen.say("Nobody is on the board there yet: clear a raid to get on it.")
            return
        rows = [f"{'rank':>4}  {'name':<20}{'score':>7}"]
        for e in entries:
            you = "  <- you" if e.user_id == self.client.user_id else ""
            rows.append(f"{e.rank:>4}  {e.name:<20}{e.score:>7}{you}")
        if all(e.user_id != self.client.user_id for e in entries):
            rank = await self.client.my_rank()
            rows.append(f"You: #{rank.rank}, best score {rank.score}." if rank.rank else "You: not on the board yet.")
        self.screen.say("\n".join(rows))

    @verb(("rank", "your place on the ranking board"))
    async def _rank(self):
        rank = await self.client.my_rank()
        self.screen.say(f"You are #{rank.rank} on the board with a best score of {rank.score}." if rank.rank else
                        "You are not on the board yet: clear a raid to get on it.")

    @verb(("logout", "end the session (you stay in the program)"))
    async def _logout(self):
        client = self._forget_client()
        try:
            await client.logout()
        except ConnectionClosed:
            client.close()
        self.screen.say(f"Logged out. See you, {client.player.name}!")

    @verb(("quit", "log out and leave (Ctrl-D too)"), needs_login=False)
    async def _quit(self):
        if self.client is not None:
            await self._logout()
        self.screen.say("Bye!")
        self.screen.leave()
        self.finished.callback(None)

    @verb(("help", "this list"), needs_login=False)
    async def _help(self):
        forms = [form for c in _COMMANDS.values() for form in c.forms]
        width = max(len(usage) for usage, _ in forms)
        kinds = ", ".join(map(str, sorted(self._tables.monster_exp)))
        self.screen.say("Commands:\n" + "\n".join(f"  {usage:<{width}}  {summary}" for usage, summary in forms) +
                        f"\nMonster kinds: {kinds}. Items in equipment slot {WEAPON_SLOT} add their +N to your hits.")

    # -- what the servers push --------------------------------------------------------

    def _follow(self, client):
        """Show the pushes of C{client}'s session as they come, while it is the one played."""
        self._background(self._each(client, client.next_party_change, self._party_changed))
        for message, show in ((packets.MATCHMAKING, self._matchmaking), (packets.RAID_FIGHT, self._fight_began),
                              (packets.RAID_RESULT, self._raid_ended)):
            self._background(self._each(client, lambda name=message.name: client.next_push(name), show))
        self._background(self._each(client, client.next_raid, self._raid_found))
        client.connection.closed.addCallback(self._connection_closed, client, client.connection)
        if hasattr(client, "on"):
            client.on("resumed", lambda _: self._resumed(client))
            client.on("entered_again", lambda _: self._resumed(client))
            client.on("raid_lost", lambda raid_id: self._raid_lost(client, raid_id))
            client.on("reconnect_failed", lambda error: self._reconnect_failed(client, error))

    async def _each(self, client, next_one, show):
        while client is self.client:
            try:
                pushed = await next_one()
            except Exception as e:  # next_raid readies the player: a request that may fail
                if client is self.client:
                    self._report(e)
                continue
            if client is self.client:
                show(pushed)

    def _party_changed(self, change):
        before, self.party = self.party, change.party
        known = {m.user_id: m.name for p in (before, change.party) if p for m in p.members}
        who = known.get(change.user_id, f"player {change.user_id}")
        if change.party is None:
            self.screen.say("You were kicked from the party.", "cyan")
        else:
            self.screen.say(f"{who} {change.reason} the party: {self._party_text(change.party)}.", "cyan")

    def _matchmaking(self, body):
        if body["state"] == "queued":
            self.screen.say(f"Your party's leader queued the party for a raid (level group {body['group']}).", "cyan")
        else:
            self.screen.say("Your party left the raid queue.", "cyan")

    def _raid_found(self, raid):
        if self.battle is not None:  # the last raid's result never came
            self._end_battle()
        self.battle = Battle(raid, self._reactor)
        raid.channel.on_hp = lambda hp, sequence: self._show_battle()
        names = {m.user_id: m.name for m in (self.party.members if self.party else ())}
        others = [names.get(u, f"player {u}") for u in raid.members if u != self.client.user_id]
        with_whom = f" with {', '.join(others)}" if others else " alone"
        self.screen.say(f"Raid found! You go{with_whom}. The fight begins once everyone is ready.", "cyan")
        early = self._early_fights.pop(raid.raid_id, None)
        if early is not None:
            self._fight_began(early)

    def _fight_began(self, body):
        battle = self.battle
        if battle is None or battle.raid.raid_id != body["raid_id"]:
            self._early_fights[body["raid_id"]] = body
            return
        how = "hitting for you" if battle.auto else "Enter (or `hit`) hits, `fight auto` keeps hitting"
        battle.begin(body, self._show_battle,
                     lambda: defer.ensureDeferred(self._reporting(self._auto_hit(battle))))
        self.screen.say(f"FIGHT! The boss has {battle.full_hp} HP and you have {battle.seconds_left()} s: {how}.",
                        "bold")
        self._show_battle()

    def _raid_ended(self, body):
        result = raid_result(body)
        battle = self.battle
        if battle is not None and battle.raid.raid_id == result.raid_id:
            self._end_battle()
        self._early_fights.pop(result.raid_id, None)
        if not result.cleared:
            self.screen.say("The raid failed: the boss survived. No score this time.", "red")
            return
        if result.level:
            self.level = result.level
        self.exp += result.exp_gained
        self.screen.say(f"VICTORY! The boss is down. Your score {result.score} (team {result.team_score}), "
                        f"+{result.exp_gained} exp: level {self.level}, {self._exp_text()}. "
                        f"Best score {result.best}.{self._loot_text(result.changed)}", "green")
        self._background(self._rank())

    def _end_battle(self):
        battle, self.battle = self.battle, None
        battle.end()
        self.screen.status(None)

    def _show_battle(self):
        battle = self.battle
        if battle is not None and battle.fighting:
            self.screen.status(battle.status(self.screen.paint, self.screen.tty))

    def _connection_closed(self, _, client, connection):
        if client is not self.client:
            return
        if client.connection is not connection:  # moved to a raid's host
            client.connection.closed.addCallback(self._connection_closed, client, client.connection)
            return
        if client._will_reconnect(connection):  # the library reconnects by itself: say so and go on
            self.screen.say("Connection lost: reconnecting...", "yellow")
            return
        self._disconnected(*(connection.close_reason or (None, None)))

    def _resumed(self, client):
        if client is not self.client:
            return
        self.screen.say("Reconnected: playing on.", "green")
        client.connection.closed.addCallback(self._connection_closed, client, client.connection)

    def _raid_lost(self, client, raid_id):
        """
        Back after a drop, the client found the raid ended while the player
        was away, its result missed (after a resume, only once it waited a
        while for that result): the fight on screen ends.
        """
        if client is not self.client or self.battle is None or self.battle.raid.raid_id != raid_id:
            return
        self._end_battle()
        self.screen.say("Your raid ended while you were away: `profile` and `inventory` show what it paid.", "yellow")

    def _reconnect_failed(self, client, error):
        if client is self.client:
            self._disconnected(getattr(error, "code", None), getattr(error, "detail", None))

    def _disconnected(self, code, detail):
        self._forget_client().close()
        self.screen.say(f"Disconnected{_reason_text(code, detail)}. `login NAME PASSWORD` to play again.", "red")

    def _forget_client(self):
        """Stop playing the session (its pushes are no longer shown); its client."""
        if self.battle is not None:
            self._end_battle()
        client, self.client, self.party = self.client, None, None
        return client

    # -- text -------------------------------------------------------------------------

    def _name(self, item_code):
        kind = self._tables.items.get(item_code)
        return kind.name if kind else f"item #{item_code}"

    def _item_text(self, item):
        plus = f" +{item.enhancement}" if item.tab == TABS["equipment"] else ""
        return f"{self._name(item.item_code)}{plus}"

    def _exp_text(self):
        needed = self._tables.exp_to_advance.get(self.level)
        return f"exp {self.exp} (max level)" if needed is None else f"exp {self.exp}/{needed}"

    def _chance_text(self, enhanced):
        chance = self._tables.enhance_success_percent.get(enhanced.enhancement)
        return "" if chance is None else f" Next try: {chance}% chance."

    def _party_text(self, party):
        you = self.client.user_id if self.client else None
        names = []
        for m in party.members:
            tags = [tag for tag, holds in (("leader", m.user_id == party.leader), ("you", m.user_id == you)) if holds]
            names.append(f"{m.name} ({', '.join(tags)})" if tags else m.name)
        return f"{party.code}: {', '.join(names)}"

    def _apply(self, changed):
        """Note the changed slots; those that gained, as C{(SlotItem, count gained)}s."""
        gained = []
        for item in changed:
            before = self.items.get((item.tab, item.slot))
            had = before.count if before is not None and before.item_code == item.item_code else 0
            if item.item_code == 0:
                self.items.pop((item.tab, item.slot), None)
                continue
            self.items[item.tab, item.slot] = item
            if item.count > had:
                gained.append((item, item.count - had))
        return gained

    def _gained_text(self, changed):
        """C{"Iron ore x1 (materials slot 0)"}, for each slot that gained."""
        return ", ".join(f"{self._name(item.item_code)} x{count} ({TAB_NAMES.get(item.tab, item.tab)} slot {item.slot})"
                         for item, count in self._apply(changed))

    def _loot_text(self, changed):
        gained = self._gained_text(changed)
        return f" Loot: {gained}." if gained else ""


def _code_name(code):
    return getattr(code, "name", str(code))


def _reason_text(code, detail):
    """C{" (LOGGED_IN_ELSEWHERE: ...)"} for a server's reason, if it gave one."""
    return f" ({_code_name(code)}: {detail or ERROR_TEXT.get(code, '')})" if code else ""


@implementer(interfaces.IHalfCloseableProtocol)
class StdioLines(LineReceiver):
    """Lines read from standard input, run by the L{Terminal} in turn; the end of input quits."""

    delimiter = b"\n"

    def __init__(self, terminal):
        self.terminal = terminal
        self.closed = defer.Deferred()

    def lineReceived(self, line):
        terminal, screen = self.terminal, self.terminal.screen
        text = line.decode("utf-8", "replace").rstrip("\r")
        screen.typed(text)
        done = terminal.command(text)
        done.addCallback(lambda _: None if terminal.finished.called else screen.prompt())

    def readConnectionLost(self):
        self.terminal.command("quit")

    def writeConnectionLost(self):
        self.terminal.command("quit")

    def connectionLost(self, reason):
        self.closed.callback(None)


class Options(usage.Options):
    synopsis = "Usage: dreamraid-play [--session HOST:PORT] [--name NAME [--password PASSWORD] [--register]]"
    longdesc = "Play dreamraid in a terminal; `help` inside lists the commands."
    optParameters = [
        ["config", "c", str(DEFAULT_PATH), "configuration file (the session server's address, the game tables)"],
        ["session", None, None, "the session server as HOST:PORT (default: [session] listen in the configuration)"],
        ["name", None, None, "log in as NAME at start"],
        ["password", None, None, "the password for --name (asked for when left out)"],
    ]
    optFlags = [["register", None, "create the --name account first"]]

    def postOptions(self):
        try:
            settings = load_settings(self["config"])
            self["tables"] = load_tables(settings.tables.path)
            self["session"] = (host_port(self["session"]) if self["session"] else
                               listen_address(settings.session.listen))
        except (ConfigError, ValueError) as e:
            raise usage.UsageError(str(e)) from None
        if (self["register"] or self["password"]) and not self["name"]:
            raise usage.UsageError("--register and --password go with --name")


async def _play(reactor, options):
    screen = Screen(lambda text: lines.transport.write(text.encode("utf-8")), tty=sys.stdout.isatty(),
                    columns=lambda: shutil.get_terminal_size().columns)
    terminal = Terminal(reactor, screen, options["session"], options["tables"])
    lines = StdioLines(terminal)
    stdio.StandardIO(lines, reactor=reactor)
    host, port = options["session"]
    screen.say(f"dreamraid: session server {host}:{port}. `register NAME PASSWORD` or `login NAME PASSWORD` "
               "to play, `help` for every command.")
    if options["name"]:
        await terminal.enter(options["name"], options["password"], options["register"])
        screen.prompt()
    await terminal.finished
    lines.transport.loseConnection()
    await lines.closed


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.exit(f"{options}\ndreamraid-play: {e}")
    if options["name"] and options["password"] is None:
        if not sys.stdin.isatty():
            sys.exit("dreamraid-play: give --password with --name when standard input is not a terminal")
        options["password"] = getpass.getpass(f"Password for {options['name']}: ")
    # StandardIO makes standard input and output non-blocking; the shell gets them back as they were.
    flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (0, 1)}
    try:
        task.react(lambda reactor: defer.ensureDeferred(_play(reactor, options)))
    finally:
        for fd, flag in flags.items():
            fcntl.fcntl(fd, fcntl.F_SETFL, flag)
