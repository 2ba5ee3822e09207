"""
A player on the game servers: every game request as a method with a typed
result, a connection that follows raid handoffs by itself, and the raid's
UDP channel.

When a raid is formed on another game server process, the player is told
to move there with a handoff ticket; L{GameClient} connects to the host,
authenticates with the ticket and carries on there, so the application
sees one stream of pushes and requests.  A refused request raises
L{dreamraid.client.RemoteError}, whose C{code} is the
L{dreamraid.errors.ErrorCode}.
"""

import collections

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dreamraid.client import results
from dreamraid.client.connection import HEARTBEAT_ANSWER, HEARTBEAT_IDLE, ConnectionClosed, OutcomeUnknown, RemoteError, connect
from dreamraid.client.reconnect import Backoff
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets


class RaidNotStarted(Exception):
    """
    The raid this player was matched into ended (failed) before they could
    join it: its host could not set it up, or died.  C{result} is its
    L{results.RaidResult}; the player is free to queue again.
    """

    def __init__(self, result):
        super().__init__(f"raid {result.raid_id} ended before this player could join it")
        self.result = result


class RaidEndedAway(Exception):
    """
    The client came back after a drop, and this raid was no longer the
    player's: it ended while the player was away (its result, pushed then,
    was missed), or the session could not be resumed and the client entered
    the world afresh.  What the raid paid, if anything, shows in the
    player's state (inventory, rank) as it is now.
    """

    def __init__(self, raid_id):
        super().__init__(f"raid {raid_id} ended for this player while the client was reconnecting")
        self.raid_id = raid_id


# Raids a client remembers as found or ended, to drop their late pushes.
RAIDS_REMEMBERED = 64
# The pushes about one raid, each naming it.
_RAID_PUSHES = (packets.RAID_FOUND, packets.RAID_FIGHT, packets.RAID_RESULT)
_RAID_PUSH_NAMES = {message.name for message in _RAID_PUSHES}
# The requests that only read: after a drop they are sent again once resumed; any
# other request in flight fails with OutcomeUnknown instead.
READS = frozenset({packets.LIST_INVENTORY, packets.MY_PARTY, packets.MY_RANK, packets.RANKING_PAGE,
                   packets.GAME_TABLES, packets.PING})
# The reasons a server may give for closing that still call for a resume.
_RESUMABLE_CLOSES = frozenset({ErrorCode.IDLE_TIMEOUT, ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE})
# What a resume can answer that means it will never succeed with this session.
_SESSION_GONE = frozenset({ErrorCode.RESUME_EXPIRED, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_MALFORMED,
                           ErrorCode.TOKEN_SIGNATURE, ErrorCode.TOKEN_NOT_YET_VALID, ErrorCode.TOKEN_AUDIENCE,
                           ErrorCode.TOKEN_ISSUER, ErrorCode.HANDOFF_REFUSED})
# How long a client keeps trying to get back before it gives up (the server keeps an away player far less).
GIVE_UP_AFTER = 120.0
# After a resume that kept the player in no raid, how long (seconds) a raid
# still open here waits for its result before it counts as lost away: the
# server pushes a result told while the player was away right after the
# resumed reply, or forwards it from the process the player was away on.
RESULT_AFTER_RESUME = 5.0


async def _first_of(*waiters):
    """
    C{(index, result)} of the first of C{waiters} (Deferreds, or None to
    leave out) to fire; the others are cancelled.  The first failure is
    raised.
    """
    present = [w for w in waiters if w is not None]
    try:
        result, first = await defer.DeferredList(present, fireOnOneCallback=True, fireOnOneErrback=True,
                                                 consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
    finally:
        for waiter in present:
            if not waiter.called:
                waiter.cancel()
    return waiters.index(present[first]), result


def _address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def as_advertised(kind, address):
    """The default route: reach every server at the address it advertises."""
    return address


class GameClient:
    """
    An authenticated player; L{request} and L{next_push} go to whichever
    server holds them now.

    C{route(kind, (host, port))} gives the address to reach an address the
    servers advertise at: a raid's host (C{kind} C{"tcp"}) and its UDP
    channel (C{"udp"}).  The default, L{as_advertised}, takes them as they
    are; a client behind something that moves them (the tests' fault proxy,
    a NAT) maps them, and C{address} is then the routed address.

    A connection that drops without a logout (or that the heartbeat finds
    silent) is reconnected by itself, with L{Backoff} between attempts, and
    the player resumed; see L{on} for the events the application hears.  A
    request in flight then fails with L{OutcomeUnknown}, except the reads
    (L{READS}), sent again once resumed.  C{relogin}, if given, is an async
    callable giving a fresh C{(host, port, token)} (log in and enter the world
    again) for when the session could not be resumed; C{end_login}, if given,
    an async callable run at L{logout} after the server's (L{dreamraid.client.play}
    gives one of each: a refresh, and the refresh tokens' revocation).
    """

    _log = Logger()

    def __init__(self, reactor, connection, address, user_id, route=as_advertised, reconnect=True, rng=None,
                 relogin=None, heartbeat=(HEARTBEAT_IDLE, HEARTBEAT_ANSWER), give_up_after=GIVE_UP_AFTER,
                 end_login=None):
        self._reactor = reactor
        self._route = route
        self.reconnect = reconnect
        self._backoff = Backoff(rng)
        self._relogin = relogin
        self._end_login = end_login
        self._heartbeat = heartbeat
        self._give_up_after = give_up_after
        self._listeners = {}  # event name -> [callable]
        self._closing = False  # close or logout asked: no reconnecting
        self._moving = 0  # raid handoffs under way: the old connection may close meanwhile
        self._reconnecting = None  # the Deferred of the reconnect loop, while it runs
        self._looping = False  # the loop itself is running (telling its listeners)
        self._back_waiters = []  # Deferreds fired once resumed (or failed if that cannot be)
        self._in_raid = {}  # raid id -> Raid, while open: a raid_found again after a resume rejoins it
        self._result_waits = {}  # raid id -> the DelayedCall that counts it lost if no result came after a resume
        self._given_up = None  # the ConnectionClosed once the client gave up reconnecting: every wait raises it
        self.address = address
        self.user_id = user_id
        self.player = None  # a results.Player once authenticated
        self.connection = None
        self._pushes = []  # (name, body) of pushes nobody awaited yet
        self._waiters = {}  # name -> [(which bodies, Deferred)]
        self._raids = collections.OrderedDict()  # raid id -> "found" or "ended", the last RAIDS_REMEMBERED
        self.token = None  # the login token, the live session until a raid handoff
        self.ticket = None  # the last handoff ticket used: the live session after a move
        self._use(connection)

    @classmethod
    async def login(cls, reactor, host, port, token, **options):
        """
        Connect to a game server and authenticate with the login token (after
        enter_world); C{options} are L{GameClient}'s (C{route}, C{reconnect},
        C{rng}, C{relogin}, C{heartbeat}, C{give_up_after}, C{end_login}).
        """
        connection = await connect(reactor, host, port,
                                   heartbeat=options.get("heartbeat", (HEARTBEAT_IDLE, HEARTBEAT_ANSWER)))
        _, body = await connection.request(packets.AUTHENTICATE, {"token": token})
        client = cls(reactor, connection, (host, port), body["user_id"], **options)
        client.player = results.Player(**body)
        client.token = token
        return client

    async def resume(self, host=None, port=None):
        """
        After the connection dropped: connect again (to the server that held
        the player, or C{host}:C{port}) and resume the player with its live
        session (the login token, or the last handoff ticket); the resumed
        reply's body (what was kept).  A player in a raid then gets its
        raid_found push again (next_push), with a new ticket and UDP key.

        @raise dreamraid.client.RemoteError: RESUME_EXPIRED once the grace ran out (log in and enter the world again).
        """
        address = self.address if host is None else (host, port)
        connection = await self._connect(*address)
        body = {"token": "" if self.ticket else self.token, "user_id": self.user_id if self.ticket else 0,
                "ticket": self.ticket or ""}
        try:
            _, resumed = await connection.request(packets.RESUME, body)
        except Exception:
            if connection.connected:
                connection.close()
            raise
        old, self.address = self.connection, address
        self._use(connection)
        old.on_push = None
        self._given_up = None  # back by hand after giving up
        return resumed

    def request(self, message, body):
        """The raw request: a Deferred of the reply's C{(message, body)}."""
        return defer.ensureDeferred(self._request(message, body))

    async def _body(self, message, **body):
        return (await self._request(message, body))[1]

    async def _request(self, message, body):
        """
        Send on the connection now, or once back if reconnecting; a read cut
        by a drop is sent again once resumed, any other request raises
        L{OutcomeUnknown}.  After the client gave up reconnecting, it raises
        L{ConnectionClosed} at once.
        """
        while True:
            if self._given_up is not None:
                raise self._gave_up()
            if self._reconnecting is not None:
                await self._back()
                continue
            connection = self.connection
            sent = connection.connected
            try:
                return await connection.request(message, body)
            except OutcomeUnknown:
                raise
            except ConnectionClosed as e:
                if not self._will_reconnect(connection):
                    raise
                if sent and message not in READS:
                    raise OutcomeUnknown(message.name, e.code, e.detail) from e
                await self._back()

    # -- staying connected ------------------------------------------------------------

    def on(self, event, listener):
        """
        Call C{listener} on each C{event}: C{"reconnecting"} (attempt number
        from 1, the seconds waited before it) before each attempt,
        C{"resumed"} (a L{results.Resumed}) once back,
        C{"entered_again"} (a L{results.Player}) once back through
        C{relogin} after the session could not be resumed,
        C{"raid_lost"} (the raid id) when a raid open here turns out, once
        back, to have ended while the client was away (its waits raise
        L{RaidEndedAway}; after a resume, only once L{RESULT_AFTER_RESUME}
        passed without its result), and C{"reconnect_failed"} (the
        exception) when the client gives up: from then on every request,
        raid wait and L{next_push} raises L{ConnectionClosed}.
        """
        self._listeners.setdefault(event, []).append(listener)

    def _emit(self, event, *args):
        for listener in list(self._listeners.get(event, ())):
            try:
                listener(*args)
            except Exception:
                self._log.failure("a {event} listener failed", event=event)

    def _connect(self, host, port):
        return connect(self._reactor, host, port, heartbeat=self._heartbeat)

    def _will_reconnect(self, connection):
        """Whether the drop of C{connection} starts (or started) a reconnect."""
        if not self.reconnect or self._closing or self._moving or connection is not self.connection:
            return False
        return connection.close_reason is None or connection.close_reason[0] in _RESUMABLE_CLOSES

    def _back(self):
        """A Deferred fired once resumed, failed if the client gave up."""
        waiter = defer.Deferred()
        self._back_waiters.append(waiter)
        return waiter

    def _lost(self, _, connection):
        if self._reconnecting is None and self._will_reconnect(connection):
            self._reconnecting = defer.ensureDeferred(self._stay_connected())

    async def _stay_connected(self):
        """Reconnect with backoff and resume (or enter again through relogin); tell the listeners."""
        started, attempt, event, gone = self._reactor.seconds(), 0, None, False
        try:
            while True:
                delay = self._backoff.delay(attempt)
                attempt += 1
                self._looping = True  # a listener's close() cannot cancel the loop while it runs: see below
                try:
                    self._emit("reconnecting", attempt, delay)
                finally:
                    self._looping = False
                if self._closing:
                    raise defer.CancelledError()
                await task.deferLater(self._reactor, delay, lambda: None)
                try:
                    if not gone:
                        try:
                            event = ("resumed", results.resumed(await self.resume()))
                            break
                        except RemoteError as e:
                            if e.code not in _SESSION_GONE or self._relogin is None:
                                raise
                            gone = True  # from now on, only entering again can bring the player back
                    event = ("entered_again", await self._enter_again())
                    break
                except RemoteError as e:
                    if e.code not in _RESUMABLE_CLOSES:
                        raise
                except (defer.CancelledError, OutcomeUnknown):
                    raise
                except Exception as e:  # refused, timed out, dropped again: try again
                    self._log.info("reconnect attempt {attempt} failed: {error}", attempt=attempt, error=e)
                if self._reactor.seconds() - started >= self._give_up_after:
                    raise ConnectionClosed(None, f"could not reconnect in {self._give_up_after:g} s")
        except BaseException as e:
            self._reconnecting = None
            failed = e if isinstance(e, ConnectionClosed) else ConnectionClosed(
                getattr(e, "code", None), getattr(e, "detail", str(e)))
            if isinstance(e, defer.CancelledError):  # closed: whatever waits for the return hears so
                self._fail_back_waiters(failed)
            else:
                self._give_up(e, failed)
            return
        self._reconnecting = None
        self.player = event[1] if event[0] == "entered_again" else event[1].player
        waiting, self._back_waiters = self._back_waiters, []
        self._emit(*event)
        if event[0] == "entered_again":
            self._raids_lost_away("", wait=0)
        else:
            self._raids_lost_away(event[1].raid_id, wait=RESULT_AFTER_RESUME)
        for waiter in waiting:
            waiter.callback(None)

    def _gave_up(self):
        """A fresh L{ConnectionClosed} saying why the client gave up (one exception raised many times grows its traceback)."""
        return ConnectionClosed(self._given_up.code, self._given_up.detail)

    def _give_up(self, error, failed):
        """
        No getting back (C{error} is why): the application hears
        reconnect_failed first (so a loop over pushes can stop), then every
        open raid's waits, every push awaited and every request waiting for
        the return raise L{ConnectionClosed} C{failed}, and so does every
        request and wait from now on.
        """
        self._given_up = failed
        for waiting in self._result_waits.values():
            waiting.cancel()
        self._result_waits.clear()
        self._emit("reconnect_failed", error)
        for raid in list(self._in_raid.values()):
            raid.gave_up(self._gave_up())
        waiting, self._waiters = self._waiters, {}
        for waiters in waiting.values():
            for _, waiter in waiters:
                waiter.errback(self._gave_up())
        self._fail_back_waiters(failed)

    def _fail_back_waiters(self, failed):
        waiting, self._back_waiters = self._back_waiters, []
        for waiter in waiting:
            waiter.errback(ConnectionClosed(failed.code, failed.detail))  # each its own: tracebacks grow on raising

    async def _enter_again(self):
        """The session is gone: log in again through the application's relogin and authenticate afresh."""
        host, port, token = await self._relogin()
        connection = await self._connect(host, port)
        try:
            _, body = await connection.request(packets.AUTHENTICATE, {"token": token})
        except Exception:
            if connection.connected:
                connection.close()
            raise
        self.token, self.ticket, self.address = token, None, (host, port)
        old = self.connection
        self._use(connection)
        old.on_push = None
        return results.Player(**body)

    def _raids_lost_away(self, kept, wait):
        """
        Back after a drop, in raid C{kept} only ('' for none): the other
        raids still open here ended (or let the player go) while it was
        away.  A result told then comes after the resume's reply: each of
        them waits C{wait} seconds for it (0: a new session, which was kept
        nothing), and counts as lost away (L{Raid.lost_away}) without it.
        """
        for raid_id in list(self._in_raid):
            if raid_id == kept or raid_id in self._result_waits:
                continue
            if wait:
                self._result_waits[raid_id] = self._reactor.callLater(wait, self._lost_unless_told, raid_id)
            else:
                self._lost_unless_told(raid_id)

    def _lost_unless_told(self, raid_id):
        self._result_waits.pop(raid_id, None)
        raid = self._in_raid.get(raid_id)
        if raid is None or raid.result_heard:
            return
        self._remember(raid_id, "ended")
        raid.lost_away()
        self._emit("raid_lost", raid_id)

    # -- progression and inventory ----------------------------------------------------

    async def game_tables(self):
        """The server's game tables (levels, enhancement, monsters, items); a L{results.GameTables}."""
        return results.game_tables(await self._body(packets.GAME_TABLES))

    async def hunt(self, monster):
        """Hunt a monster kind; a L{results.Hunted}."""
        body = await self._body(packets.HUNT, monster=monster)
        return results.Hunted(**{**body, "changed": results.slot_items(body["changed"])})

    async def inventory(self):
        """Every occupied slot, as L{results.SlotItem}s."""
        return results.slot_items((await self._body(packets.LIST_INVENTORY))["items"])

    async def delete_item(self, tab, slot):
        """The slots changed."""
        return results.slot_items((await self._body(packets.DELETE_ITEM, tab=tab, slot=slot))["items"])

    async def move_item(self, tab, from_slot, to_slot):
        """Swap or merge; the slots changed."""
        body = await self._body(packets.MOVE_ITEM, tab=tab, from_slot=from_slot, to_slot=to_slot)
        return results.slot_items(body["items"])

    async def use_item(self, slot):
        """Use one consumable; the slots changed."""
        return results.slot_items((await self._body(packets.USE_ITEM, slot=slot))["items"])

    async def enhance(self, slot):
        """Try to enhance the equipment in C{slot}; a L{results.Enhanced}."""
        return results.Enhanced(**await self._body(packets.ENHANCE, slot=slot))

    async def grant(self, item_code, count):
        """Development only (the server's dev_grant): the slots changed."""
        return results.slot_items((await self._body(packets.GRANT, item_code=item_code, count=count))["items"])

    async def logout(self):
        """End the session (the server writes the player back to MySQL) and close."""
        self._closing = True
        try:
            await self._body(packets.LOGOUT)
        finally:
            if self._end_login is not None:
                await self._end_login()
        self.close()

    # -- ranking ----------------------------------------------------------------------

    async def ranking(self, first=1, count=10):
        """C{count} L{results.RankEntry}s from place C{first}, best first."""
        body = await self._body(packets.RANKING_PAGE, first=first, count=count)
        names = body["names"].split(" ") if body["names"] else []
        return [results.RankEntry(e["rank"], e["user_id"], name, e["score"])
                for e, name in zip(body["entries"], names)]

    async def my_rank(self):
        return results.Rank(**await self._body(packets.MY_RANK))

    # -- parties and matchmaking ------------------------------------------------------

    async def create_party(self):
        """A new L{results.Party} led by this player, with its invite code."""
        return results.party(await self._body(packets.CREATE_PARTY))

    async def join_party(self, code):
        return results.party(await self._body(packets.JOIN_PARTY, code=code))

    async def leave_party(self):
        await self._body(packets.LEAVE_PARTY)

    async def kick(self, user_id):
        """The leader removes a member; the party now."""
        return results.party(await self._body(packets.KICK_MEMBER, user_id=user_id))

    async def my_party(self):
        """The player's L{results.Party}, or None."""
        return results.party(await self._body(packets.MY_PARTY))

    async def next_party_change(self):
        """The next L{results.PartyChange} pushed."""
        body = await self.next_push(packets.PARTY_CHANGED.name)
        return results.PartyChange(body["reason"], body["user_id"], results.party(body))

    async def queue_raid(self):
        """Queue this player, or their party (leader only); the level group."""
        return (await self._body(packets.QUEUE_RAID))["group"]

    async def cancel_queue(self):
        await self._body(packets.CANCEL_QUEUE)

    async def next_raid(self, interface="127.0.0.1"):
        """
        Once matched: the L{Raid}, its UDP channel open and greeted, this
        player ready (after moving to its host if it is elsewhere).

        @raise RaidNotStarted: the raid ended before this player could join
            it (its raid_result came before its raid_found, or before the
            host answered the greeting).
        """
        found = self.next_push(packets.RAID_FOUND.name)
        ended = None if found.called else self.next_push(  # a raid_found already here comes first
            packets.RAID_RESULT.name, lambda body: body["raid_id"] not in self._raids)
        first, body = await _first_of(found, ended)
        if first == 1:
            self._remember(body["raid_id"], "ended")
            raise RaidNotStarted(results.raid_result(body))
        raid = Raid(self, body)
        raid.fight_heard = any(name == packets.RAID_FIGHT.name and pushed["raid_id"] == raid.raid_id
                               for name, pushed in self._pushes)  # its fight came before the application asked
        self._remember(raid.raid_id, "found")
        self._in_raid[raid.raid_id] = raid
        over = self.next_push(packets.RAID_RESULT.name, lambda body: body["raid_id"] == raid.raid_id)
        greeted = None
        if not over.called:
            raid.port = self._reactor.listenUDP(0, raid.channel, interface=interface)
            greeted = raid.channel.greet(self._reactor)
        try:
            first, body = await _first_of(over, greeted)
            if first == 0:
                self._remember(raid.raid_id, "ended")
                raise RaidNotStarted(results.raid_result(body))
            await self._body(packets.RAID_READY, raid_id=raid.raid_id)
        except BaseException:
            raid.close()
            raise
        return raid

    def next_push(self, name, which=None):
        """
        A Deferred of the body of the next push named C{name} (one not yet
        read comes first), and only of one whose body C{which(body)} accepts
        if given; cancelling it stops the wait.  Once the client gave up
        reconnecting, it fails with L{ConnectionClosed} (after the pushes
        already here).
        """
        for i, (pushed, body) in enumerate(self._pushes):
            if pushed == name and (which is None or which(body)):
                del self._pushes[i]
                return defer.succeed(body)
        if self._given_up is not None:
            return defer.fail(self._gave_up())
        waiters = self._waiters.setdefault(name, [])
        waiter = defer.Deferred(lambda d: waiters.remove((which, d)))
        waiters.append((which, waiter))
        return waiter

    def close(self):
        """Close the connection; no reconnecting after (one under way stops)."""
        self._closing = True
        for waiting in self._result_waits.values():
            waiting.cancel()
        self._result_waits.clear()
        if self._reconnecting is not None and not self._looping:
            self._reconnecting.cancel()
        if self.connection.connected:
            self.connection.close()

    def _use(self, connection):
        """
        Play through C{connection} from now on.  Pushes it received before
        (while its authentication or resume was being answered: what the
        player was kept while away, a raid_found again) are handed on first.
        """
        self.connection = connection
        connection.on_push = self._pushed
        early = getattr(connection, "pushes", None)  # a stand-in connection may keep none
        if early:
            connection.pushes = []
            for name, body in early:
                self._pushed(packets.MESSAGES_BY_NAME[name], body)
        closed = getattr(connection, "closed", None)  # a stand-in connection may have none: never lost
        if closed is not None:
            closed.addCallback(self._lost, connection)

    def _remember(self, raid_id, state):
        """
        Note raid C{raid_id} as C{"found"} or C{"ended"}: an ended raid's
        unread pushes are dropped, and so are its later ones; so are those
        of a raid no longer remembered.
        """
        self._raids[raid_id] = state
        self._raids.move_to_end(raid_id)
        if state == "ended":
            self._drop_pushes(raid_id)
        while len(self._raids) > RAIDS_REMEMBERED:
            self._drop_pushes(self._raids.popitem(last=False)[0])

    def _drop_pushes(self, raid_id):
        """Drop the unread pushes about raid C{raid_id}."""
        self._pushes = [(name, body) for name, body in self._pushes
                        if name not in _RAID_PUSH_NAMES or body["raid_id"] != raid_id]

    def _pushed(self, message, body):
        if message in _RAID_PUSHES and self._raids.get(body["raid_id"]) == "ended":
            return  # a raid over for this player: a late raid_found, a repeated result
        if message is packets.RAID_FIGHT and body["raid_id"] in self._in_raid:
            raid = self._in_raid[body["raid_id"]]
            if raid.fight_heard:
                return  # told again after a resume, in case it came while away: this one did not
            raid.fight_heard = True
        if message is packets.RAID_RESULT and body["raid_id"] in self._in_raid:
            self._in_raid[body["raid_id"]].result_heard = True
            waiting = self._result_waits.pop(body["raid_id"], None)
            if waiting is not None:
                waiting.cancel()
        host = self._route("tcp", _address(body["host"])) if message is packets.RAID_FOUND else None
        if message is packets.RAID_FOUND and body["raid_id"] in self._in_raid and host == self.address:
            self._in_raid[body["raid_id"]].rejoin(body)  # after a resume: new key, greet again
        elif message is packets.RAID_FOUND and host != self.address:
            defer.ensureDeferred(self._move(body)).addErrback(self._move_failed, body)
        else:
            self._deliver(message.name, body)

    def _deliver(self, name, body):
        waiters = self._waiters.get(name, [])
        for i, (which, waiter) in enumerate(waiters):
            if which is None or which(body):
                del waiters[i]
                waiter.callback(body)
                return
        self._pushes.append((name, body))

    def _move_failed(self, failure, found):
        """The raid's host could not be reached: whoever awaits the raid hears why."""
        waiters = self._waiters.pop(packets.RAID_FOUND.name, [])
        for _, waiter in waiters:
            waiter.errback(failure)
        if not waiters:
            self._log.failure("cannot move to raid {raid_id}'s host {host}", failure,
                              raid_id=found["raid_id"], host=found["host"])

    async def _move(self, found):
        """Reconnect to the raid's host with the handoff ticket, then hand on the raid_found push."""
        host, port = self._route("tcp", _address(found["host"]))
        self._moving += 1
        try:
            connection = await self._connect(host, port)
            await connection.request(packets.AUTHENTICATE_HANDOFF,
                                     {"user_id": self.user_id, "ticket": found["ticket"]})
        finally:
            self._moving -= 1
        self.ticket = found["ticket"]
        old, self.address = self.connection, (host, port)
        self._use(connection)
        old.on_push = None
        if found["raid_id"] in self._in_raid:  # a raid rejoined after a resume: new key, greet again
            self._in_raid[found["raid_id"]].rejoin(found)
        elif self._raids.get(found["raid_id"]) != "ended":  # its result may have come during the move
            self._deliver(packets.RAID_FOUND.name, found)


class Raid:
    """
    A raid this player is in: hit the boss, move, and await the fight and
    the result.  The boss's HP (C{hp}, from the UDP channel) is the newest
    heard; C{deadline} is set once the fight begins.
    """

    def __init__(self, client, found):
        self.client = client
        self.raid_id = found["raid_id"]
        self.members = [m["user_id"] for m in found["members"]]
        self.channel = RaidChannel(found, client._route("udp", _address(found["udp"])))
        self.port = None
        self.deadline = None
        self._greeting = None  # the greeting again after a resume, until the host answers it
        self.lost = False  # it ended for the player while the client was away (RaidEndedAway)
        self.failed = None  # the ConnectionClosed once the client gave up reconnecting: its waits raise it
        self._lost_waiters = []
        self.fight_heard = False  # its raid_fight came (a resume's repeat of it is dropped)
        self.result_heard = False  # its raid_result came (after a resume, it is not lost away)

    @property
    def hp(self):
        return self.channel.hp

    async def fight(self):
        """
        Wait for the fight to begin; a L{results.Fight}.  A raid whose host
        stops before the fight sends only its result: await L{result} too.
        """
        body = await self._unless_lost(packets.RAID_FIGHT)
        self.deadline = body["deadline_ms"] / 1000
        return results.Fight(body["hp"], self.deadline)

    async def hit(self):
        """Hit the boss; a L{results.Hit}."""
        return results.Hit(**await self.client._body(packets.RAID_HIT, raid_id=self.raid_id))

    def move(self, x, y, state=0):
        """Send this player's position (at most 10 a second); nothing once the raid is over."""
        if self.port is not None:
            self.channel.position(x, y, state)

    async def result(self):
        """
        Wait for the raid's end; a L{results.RaidResult}.  The UDP channel closes.

        @raise RaidEndedAway: the raid ended while the client was away, its result missed.
        @raise ConnectionClosed: the client gave up reconnecting (so does L{fight}).
        """
        body = await self._unless_lost(packets.RAID_RESULT)
        self.client._remember(self.raid_id, "ended")
        self.close()
        return results.raid_result(body)

    async def _unless_lost(self, message):
        """
        The body of this raid's next C{message} push; L{RaidEndedAway} once
        the raid is lost (L{lost_away}), L{ConnectionClosed} once the client
        gave up (L{gave_up}).
        """
        if self.lost:
            raise RaidEndedAway(self.raid_id)
        if self.failed is not None:
            raise ConnectionClosed(self.failed.code, self.failed.detail)
        pushed = self.client.next_push(message.name, lambda body: body["raid_id"] == self.raid_id)
        lost = defer.Deferred()
        self._lost_waiters.append(lost)
        try:
            return (await _first_of(pushed, lost))[1]
        finally:
            if lost in self._lost_waiters:
                self._lost_waiters.remove(lost)

    def lost_away(self):
        """The client came back and the raid was not the player's any more: its waits raise L{RaidEndedAway}."""
        self.lost = True
        self.close()
        waiting, self._lost_waiters = self._lost_waiters, []
        for waiter in waiting:
            waiter.errback(RaidEndedAway(self.raid_id))

    def gave_up(self, failed):
        """The client gave up reconnecting: its waits raise L{ConnectionClosed} C{failed}."""
        self.failed = failed
        self.close()
        waiting, self._lost_waiters = self._lost_waiters, []
        for waiter in waiting:
            waiter.errback(ConnectionClosed(failed.code, failed.detail))

    def rejoin(self, found):
        """After a resume: the raid's raid_found again, with a new key: greet the host again."""
        self.channel.rejoin(found, self.client._route("udp", _address(found["udp"])))
        if self.port is not None:
            self._stop_greeting()  # one under way, under the old key
            self._greeting = self.channel.greet(self.client._reactor, fresh=True).addErrback(self._not_greeted)

    def _not_greeted(self, failure):
        if not failure.check(defer.CancelledError):  # cancelled: the raid is over, or greeted anew
            self.client._log.failure("raid {raid_id}'s host did not answer the greeting again", failure,
                                     raid_id=self.raid_id)

    def _stop_greeting(self):
        if self._greeting is not None and not self._greeting.called:
            self._greeting.cancel()
        self._greeting = None

    def close(self):
        self.client._in_raid.pop(self.raid_id, None)
        self._stop_greeting()  # no hello on a closed port
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class RaidChannel(DatagramProtocol):
    """
    A player's UDP channel to a raid (from its C{raid_found} push): sends
    the hello and positions with rising sequence numbers, keeps the boss's
    HP by the highest HP sequence heard, and the others' latest positions.
    Every datagram either way is signed with this player's own key.  A
    datagram from the host that does not verify is dropped (counted in
    C{dropped}); one whose sequence is not above the highest heard for its
    message, a replay or one overtaken on the way, is dropped too (counted
    in C{replayed}).
    """

    def __init__(self, found, server=None):
        self.server = _address(found["udp"]) if server is None else server  # where datagrams go
        self.key = bytes.fromhex(found["key"])
        self.number, self.member = found["raid_number"], found["member"]
        self.sequence = 0
        self.hp = self.hp_sequence = None
        self.positions = {}
        self.dropped = self.replayed = 0
        self._heard = {}  # message -> highest datagram sequence heard of it
        self._hp_waiters = []
        self.on_hp = None  # or a callable(hp, hp_sequence), for each newer HP heard

    def send(self, message, body):
        self.sequence += 1
        self.transport.write(packets.seal_datagram(self.key, message, self.number, self.member, self.sequence, body),
                             self.server)

    def hello(self):
        self.send(packets.UDP_HELLO, {})

    def greet(self, clock, interval=0.5, timeout=10.0, fresh=False):
        """
        Send the hello every C{interval} seconds until the host answers (a
        hello or its answer may be lost); a Deferred of the boss's HP, which
        fails with C{defer.TimeoutError} if no answer comes in C{timeout}.
        C{fresh}: wait for an HP heard from now on, not the last one kept.
        """
        resend = task.LoopingCall(self.hello)
        resend.clock = clock
        resend.start(interval)

        def answered(result):
            resend.stop()
            return result
        if fresh:
            heard = defer.Deferred()
            self._hp_waiters.append((lambda hp: True, heard))
        else:
            heard = self.when_hp(lambda hp: True)
        return heard.addTimeout(timeout, clock).addBoth(answered)

    def rejoin(self, found, server=None):
        """
        The raid's raid_found again (after a resume): its host's address (or
        C{server}, where the client reaches it) and this player's new key.
        """
        self.server = server or _address(found["udp"])
        self.key = bytes.fromhex(found["key"])
        self.number, self.member = found["raid_number"], found["member"]

    def position(self, x, y, state):
        self.send(packets.POSITION, {"x": x, "y": y, "state": state})

    def when_hp(self, predicate):
        """A Deferred that fires with the HP once C{predicate(hp)} holds."""
        if self.hp is not None and predicate(self.hp):
            return defer.succeed(self.hp)
        waiter = defer.Deferred()
        self._hp_waiters.append((predicate, waiter))
        return waiter

    def datagramReceived(self, data, address):
        try:
            datagram = packets.open_datagram(self.key, data)
        except packets.CodecError:
            self.dropped += 1
            return
        if datagram.sequence <= self._heard.get(datagram.message, 0):
            self.replayed += 1
            return
        self._heard[datagram.message] = datagram.sequence
        if datagram.message is packets.BOSS_HP:
            if self.hp_sequence is not None and datagram.body["hp_sequence"] < self.hp_sequence:
                return
            self.hp, self.hp_sequence = datagram.body["hp"], datagram.body["hp_sequence"]
            if self.on_hp is not None:
                self.on_hp(self.hp, self.hp_sequence)
            waiting, self._hp_waiters = self._hp_waiters, []
            for predicate, waiter in waiting:
                if predicate(self.hp):
                    waiter.callback(self.hp)
                else:
                    self._hp_waiters.append((predicate, waiter))
        elif datagram.message is packets.POSITIONS:
            for entry in datagram.body["players"]:
                self.positions[entry["member"]] = (entry["x"], entry["y"], entry["state"])
