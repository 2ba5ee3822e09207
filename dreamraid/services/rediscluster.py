"""
The Redis Cluster router: the one twisted Service through which every part of
dreamraid talks to Redis.

It keeps the slot table (from C{CLUSTER SLOTS}, replaced in one step), one
txredisapi connection per master, and rides through redirects, migrations
and failovers inside each call's deadline.  A call either gets its
own reply or fails with one of the errors below by its deadline; it never
hangs.  docs/architecture.md says why it is built this way.
"""

import collections
import hashlib
import math
from binascii import crc_hqx

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from dreamraid.services.deferreds import gather, pass_after
from dreamraid.services.rediscommands import READ_ONLY, command_keys, command_name

SLOTS = 16384

# Redirects one call may follow before the router gives up on it.
MAX_REDIRECTS = 16
# Deadlines and retry delays are kept to this many seconds, so one timer
# serves every call that ends in the same tick.
TICK = 0.01
# Idle dedicated connections (blocking commands, replicated writes) kept per
# master to be reused.
MAX_IDLE_DEDICATED = 4
# Refreshes of the slot table are at least this far apart.
MIN_REFRESH_GAP = 0.1
# WAIT gives up this long before its call's deadline (Redis checks WAIT
# timeouts about every 100 ms).
WAIT_MARGIN = 0.15
# Errors after which the same call may be sent again (after a refresh and a
# pause): the command did not run.
_RETRY_LATER = frozenset({"TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY", "UNBLOCKED"})


def key_slot(key):
    """
    The cluster slot of C{key} (str or bytes), exactly as C{CLUSTER KEYSLOT}:
    CRC16/XMODEM of the key, or of its hash tag (the text between the first
    C{{} and the next C{}}, when that is not empty), modulo 16384.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key, 0) % SLOTS


class RedisClusterError(Exception):
    """A call through the router failed for a reason of the router's own."""


class CrossSlotError(RedisClusterError, ValueError):
    """The keys of one command (or transaction) live in different slots."""


class ClusterUnavailable(RedisClusterError):
    """No node answered the call correctly within its deadline."""


class DeadlineExceeded(ClusterUnavailable):
    """The call's deadline passed before it got a reply."""


class OutcomeUnknown(ClusterUnavailable):
    """
    A write was sent but its reply was lost (connection lost, deadline
    passed): it may or may not have been applied.  It is never sent again by
    the router; callers make such writes idempotent.
    """


class ClusterBusy(RedisClusterError):
    """The node's calls in flight and its waiting line are both full."""


class TransactionAborted(RedisClusterError):
    """A MULTI/EXEC was refused as a whole (EXECABORT, or a redirect while queueing)."""


class _Node:
    """
    One master: its address, its connection and its calls in flight.

    All ordinary calls to a master share one pipelined connection, so two
    commands sent in order run in that order (C{SET} then C{GET} of one key
    without waiting in between); Redis runs them one at a time anyway.
    Blocking commands and subscriptions get connections of their own.
    """

    __slots__ = ("address", "connection", "connecting", "in_flight", "waiting", "retired")

    def __init__(self, address):
        self.address = address
        self.connection = None
        self.connecting = None
        self.in_flight = 0
        self.waiting = collections.deque()
        self.retired = False

    def __repr__(self):
        return f"<node {self.address[0]}:{self.address[1]}>"


class _Call:
    """One command's journey: where it goes, how often it was redirected, its deadline."""

    __slots__ = (
        "args", "slot", "write", "deadline", "result", "done", "attempts", "redirects",
        "ask_node", "pipelined", "dedicated", "connection", "sent_at", "last_error",
        "payload", "expiry", "replicas",
    )

    def __init__(self, args, slot, write, deadline, pipelined=False, dedicated=False):
        self.args = args
        self.slot = slot
        self.write = write
        self.deadline = deadline
        self.result = defer.Deferred(self._cancelled)
        self.done = False
        self.attempts = 0
        self.redirects = 0
        self.ask_node = None
        self.pipelined = pipelined
        self.dedicated = dedicated
        self.connection = None
        self.sent_at = None
        self.last_error = None
        self.payload = encode_command(args)
        self.expiry = None
        self.replicas = 0

    def finish(self):
        """Mark the call ended: its result is set and its deadline dropped."""
        self.done = True
        self.expiry.discard(self)

    def _cancelled(self, result):
        self.finish()


class _Shared:
    """The outcome of one piece of work (a refresh, a connection opening) that many calls wait on."""

    def __init__(self, work):
        self._waiters = []
        work.addBoth(self._finished)

    def wait(self):
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _finished(self, result):
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class _Ticks:
    """
    Coarse timers: everything due in the same L{TICK} shares one delayed call.
    A call's deadline costs a set insertion, removed again when the call
    ends, instead of a reactor timer of its own; finished calls are not kept.
    """

    def __init__(self, clock, expire):
        self.clock = clock
        self._expire = expire
        self._due = {}

    def _entry(self, when):
        tick = math.ceil(when / TICK)
        entry = self._due.get(tick)
        if entry is None:
            delay = max(0.0, tick * TICK - self.clock.seconds())
            entry = self._due[tick] = (set(), [], self.clock.callLater(delay, self._run, tick))
        return entry

    def at(self, when, function, *args):
        """Run C{function(*args)} at the first tick at or after C{when}."""
        self._entry(when)[1].append((function, args))

    def expire_at(self, call):
        """Expire C{call} at its deadline unless it ends first."""
        calls = self._entry(call.deadline)[0]
        calls.add(call)
        call.expiry = calls

    def _run(self, tick):
        calls, functions, _ = self._due.pop(tick)
        for call in list(calls):
            self._expire(call)
        for function, args in functions:
            function(*args)

    def stop(self):
        """Drop every timer; return the calls that were still waiting for their deadline."""
        due, self._due = self._due, {}
        for _, _, timer in due.values():
            timer.cancel()
        return [call for calls, _, _ in due.values() for call in calls]


_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def encode_command(args):
    """The RESP bytes of the command C{args} (str, bytes, int or float items)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode("utf-8")
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            arg = _encode_other(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def _encode_other(arg):
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, bool) or not isinstance(arg, (int, float, bytes, bytearray, memoryview)):
        raise TypeError(f"a Redis argument must be str, bytes, int or float, not {type(arg).__name__}")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode("ascii")
    return bytes(arg)


class _Connection(txredisapi.HiredisProtocol):
    """
    A txredisapi connection that queues hiredis's replies as they come
    (bytes, ints, lists, error instances): with C{charset=None} and no number
    conversion, txredisapi's walk over every element of every reply changes
    nothing and costs a call per element.
    """

    def connectionMade(self):
        # Commands go out as they are made: with Nagle's algorithm a small
        # write waits for the previous one's ACK, which Redis may delay 40 ms.
        self.transport.setTcpNoDelay(True)
        return super().connectionMade()

    def dataReceived(self, data):
        reader = self._reader
        reader.feed(data)
        put = self.replyQueue.put
        reply = reader.gets()
        while reply is not False:
            put(reply)
            reply = reader.gets()


class _OneConnection(Factory):
    """C{connectProtocol}'s factory, without its two log lines per connection."""

    noisy = False

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def _protocol():
    return _Connection(charset=None, convertNumbers=False)


def _redirect_target(message):
    """C{(slot, (host, port))} from the text of a MOVED or ASK error."""
    _, slot, address = message.split(" ", 2)
    host, _, port = address.rpartition(":")
    return int(slot), (host, int(port))


def _error_kind(error):
    return str(error).split(" ", 1)[0]


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_cluster_slots(reply, asked):
    """
    C{{(start, end): master address}} from a C{CLUSTER SLOTS} reply, plus the
    set of replica addresses.  A node that names no host means the one asked.
    """
    ranges = {}
    replicas = set()
    for entry in reply:
        start, end, master, *others = entry
        ranges[int(start), int(end)] = _address(master, asked)
        replicas.update(_address(node, asked) for node in others)
    return ranges, replicas


def _address(node, asked):
    host = _text(node[0])
    if host in ("", "?"):
        host = asked[0]
    return host, int(node[1])


class RedisCluster(Service):
    """
    Routes each Redis command to the master that holds its slot.

    C{execute} for one command, C{pipeline} for many at once, C{transaction}
    for MULTI/EXEC in one slot, L{Script} for Lua, C{execute_blocking} for
    blocking reads (XREADGROUP ... BLOCK) on connections of their own, and
    C{subscribe} for pub/sub that follows failovers.  Replies are bytes.
    """

    _log = Logger()

    def __init__(
        self, clock, random, startup_nodes, *, connect_timeout, command_timeout,
        max_in_flight=1000, max_waiting=10000,
        refresh_interval=5.0, retry_backoff=0.02, retry_backoff_max=0.5,
    ):
        """
        @param clock: the reactor (connections are made through it).
        @param random: a C{random.Random}, for picking masters and jitter.
        """
        self.clock = clock
        self._random = random
        self._startup_nodes = [tuple(node) for node in startup_nodes]
        self._connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_in_flight = max_in_flight
        self._max_waiting = max_waiting
        self._refresh_interval = refresh_interval
        self._retry_backoff = retry_backoff
        self._retry_backoff_max = retry_backoff_max
        self._slots = [None] * SLOTS
        self._masters = []
        self._replicas = set()
        self._nodes = {}
        self._ticks = _Ticks(clock, self._expire)
        self._refreshing = None
        self._refresh_queued = False
        self._last_refresh = -math.inf
        self._periodic = None
        self._probes = set()
        self._dedicated = set()
        self._idle_dedicated = {}
        self._subscriptions = set()
        self.counters = collections.Counter()
        self.latency = None  # or a histogram to observe each reply's seconds on

    @classmethod
    def from_settings(cls, clock, random, settings):
        """A router configured by L{dreamraid.config.RedisSettings}."""
        return cls(
            clock, random, settings.startup_nodes,
            connect_timeout=settings.connect_timeout, command_timeout=settings.command_timeout,
            max_in_flight=settings.max_in_flight, max_waiting=settings.max_waiting,
            refresh_interval=settings.refresh_interval, retry_backoff=settings.retry_backoff,
            retry_backoff_max=settings.retry_backoff_max,
        )

    # -- the service ----------------------------------------------------------

    def startService(self):
        super().startService()
        self._periodic = self.clock.callLater(0, self._periodic_refresh)

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        if self._periodic is not None and self._periodic.active():
            self._periodic.cancel()
        for call in self._ticks.stop():
            self._fail(call, ClusterUnavailable("the router stopped"))
        for probe in list(self._probes):
            probe.cancel()
        for subscription in list(self._subscriptions):
            subscription.stop()
        closing = []
        for node in self._nodes.values():
            closing.append(self._close_node(node))
        for protocol in list(self._dedicated) + [p for idle in self._idle_dedicated.values() for p in idle]:
            closing.append(self.close_connection(protocol))
        self._idle_dedicated.clear()
        if self._refreshing is not None:
            closing.append(self._refreshing.wait())
        await defer.DeferredList(closing, consumeErrors=True)

    def _close_node(self, node):
        protocol, node.connection = node.connection, None
        return self.close_connection(protocol) if protocol is not None else defer.succeed(None)

    @staticmethod
    def close_connection(protocol):
        """Close C{protocol}'s connection; a Deferred that fires once it is closed."""
        if protocol.transport is None or not protocol.connected:
            return defer.succeed(None)
        closed = protocol.whenDisconnected()
        protocol.transport.loseConnection()
        return closed

    # -- one command -----------------------------------------------------------

    def execute(self, *args, timeout=None, route=None, replicas=0):
        """
        Send one command (C{"SET", key, value}) to the master of its keys'
        slot; a Deferred of the reply.

        @param timeout: the call's deadline in seconds from now (default:
            the configured command timeout).
        @param route: a key whose slot picks the node, for keyless commands
            that must reach a particular master (C{SCRIPT LOAD}).
        @param replicas: for a write that must survive the loss of its
            master: succeed only once this many replicas have it, else
            L{OutcomeUnknown}.  The write and a C{WAIT} behind it go on a
            dedicated connection, so a lagging or missing replica holds up
            no other call.
        @raise CrossSlotError: at once, when the keys span slots.
        """
        call = self._call(args, timeout, route, dedicated=replicas > 0)
        call.replicas = replicas
        return self._start(call)

    def execute_blocking(self, *args, block, timeout=None):
        """
        Send a blocking command (C{XREADGROUP ... BLOCK ms ...}, C{BLPOP}) on
        a connection of its own, so it holds up no other call.  It is sent
        again after a failover (C{UNBLOCKED}, a lost connection, a redirect):
        entries a lost reply delivered stay pending in the group, so nothing
        is lost.

        @param block: seconds the command itself may block; the deadline is
            that plus C{timeout}.
        """
        timeout = self.command_timeout if timeout is None else timeout
        call = self._call(args, block + timeout, None, dedicated=True)
        call.write = False
        return self._start(call)

    def _start(self, call):
        """Set the call's deadline and make its first attempt; its result Deferred."""
        if not self.running:
            return defer.fail(ClusterUnavailable(f"{_describe(call)}: the router is stopped"))
        self._ticks.expire_at(call)
        self._attempt(call)
        return call.result

    def _call(self, args, timeout, route, pipelined=False, dedicated=False):
        name = command_name(args)
        slot = _slot_of([route] if route is not None else command_keys(name, args), name)
        deadline = self.clock.seconds() + (self.command_timeout if timeout is None else timeout)
        return _Call(args, slot, name not in READ_ONLY, deadline, pipelined, dedicated)

    def _attempt(self, call):
        if call.done:
            return
        node = call.ask_node
        if node is None:
            node = self._route(call.slot)
            if node is None:
                self.request_refresh()
                self._retry(call, ClusterUnavailable(f"no master known for slot {call.slot}"))
                return
        if call.dedicated:
            self._send_dedicated(call, node)
            return
        if node.in_flight >= self.max_in_flight:
            if len(node.waiting) >= self._max_waiting:
                self._fail(call, ClusterBusy(f"{node.address[0]}:{node.address[1]}: "
                                             f"{node.in_flight} calls in flight, {len(node.waiting)} waiting"))
            else:
                node.waiting.append(call)
            return
        protocol = node.connection
        if protocol is None:
            self._connect(node).addCallbacks(
                lambda _: self._attempt(call), lambda f: self._failed(call, node, f.value, sent=False)
            )
            return
        self._send(call, node, protocol)

    def _route(self, slot):
        if slot is None:
            return self._random.choice(self._masters) if self._masters else None
        return self._slots[slot]

    def _send(self, call, node, protocol):
        """
        Write the call on the node's connection and queue for its reply.
        This goes under txredisapi's C{execute_command} to its reply queue:
        the router's encoder is faster, and the queue entry is never
        cancelled, so replies keep matching calls even when a caller gives
        up on one.
        """
        if not protocol.connected:
            self._drop(protocol, node)
            self._failed(call, node, txredisapi.ConnectionError("Not connected"), sent=False)
            return
        replies = protocol.replyQueue
        if call.ask_node is not None:
            call.ask_node = None
            protocol.transport.write(_ASKING + call.payload)
            replies.get()
        else:
            protocol.transport.write(call.payload)
        node.in_flight += 1
        call.connection = protocol
        call.sent_at = self.clock.seconds()
        replies.get().addCallback(self._replied, call, node)

    def _replied(self, reply, call, node):
        if self.latency is not None:
            self.latency.observe(self.clock.seconds() - call.sent_at)
        node.in_flight -= 1
        call.connection = None
        if node.waiting:
            self._admit_waiting(node)
        self._settle(call, node, reply)

    def _settle(self, call, node, reply):
        """Hand a sent call its reply, or decide what its error means (C{reply} is then an exception)."""
        if call.done:
            return
        if isinstance(reply, Exception):
            self._failed(call, node, reply, sent=True)
        else:
            call.finish()
            call.result.callback(reply)

    def _admit_waiting(self, node):
        waiting = node.waiting
        while waiting and node.in_flight < self.max_in_flight:
            call = waiting.popleft()
            if not call.done:
                self._attempt(call)

    def _failed(self, call, node, error, sent):
        """Decide what an attempt's error means: redirect, retry later, or fail."""
        if call.done:
            return
        call.last_error = error
        if isinstance(error, txredisapi.ResponseError):
            kind = _error_kind(error)
            if kind == "MOVED" or kind == "ASK":
                self._redirect(call, kind, str(error))
            elif kind in _RETRY_LATER and (kind == "TRYAGAIN" or not call.pipelined):
                self.counters[kind.lower()] += 1
                if kind != "TRYAGAIN":
                    self.request_refresh()
                self._retry(call, error)
            else:
                self._fail(call, error)
            return
        self.counters["connection_errors"] += 1
        self.request_refresh()
        if sent and call.write:
            self._fail(call, OutcomeUnknown(f"{_describe(call)} to {_where(node)}: {error}"))
        elif sent and call.pipelined:
            self._fail(call, ClusterUnavailable(f"{_describe(call)} to {_where(node)}: {error}"))
        else:
            self._retry(call, error)

    def _redirect(self, call, kind, message):
        if kind == "MOVED":
            self._repoint(message)
        else:
            self.counters["ask"] += 1
            call.ask_node = self._node(_redirect_target(message)[1])
        call.redirects += 1
        if call.redirects > MAX_REDIRECTS:
            self._fail(call, ClusterUnavailable(f"{_describe(call)}: more than {MAX_REDIRECTS} redirects"))
            return
        self._attempt(call)

    def _retry(self, call, error):
        """Send C{call} again after a growing, jittered pause, if its deadline allows."""
        call.last_error = error
        call.attempts += 1
        pause = self._backoff(call.attempts - 1) * (0.5 + self._random.random() / 2)
        if self.clock.seconds() + pause >= call.deadline:
            self._fail(call, ClusterUnavailable(f"{_describe(call)}: {error}"))
            return
        self.counters["retries"] += 1
        self._ticks.at(self.clock.seconds() + pause, self._attempt, call)

    def _expire(self, call):
        if call.done:
            return
        self.counters["deadlines"] += 1
        protocol = call.connection
        error = call.last_error
        if protocol is not None:
            # A node that has not answered for a whole command timeout is
            # taken to be hung: its connection is dropped so later calls open
            # a fresh one, and the table is refreshed in case it failed over.
            if self.clock.seconds() - call.sent_at >= self.command_timeout and protocol.transport:
                protocol.transport.abortConnection()
                self.request_refresh()
            if call.write:
                self._fail(call, OutcomeUnknown(f"{_describe(call)}: no reply by the deadline"))
                return
        detail = f" (last error: {error})" if error is not None else ""
        self._fail(call, DeadlineExceeded(f"{_describe(call)}: no reply by the deadline{detail}"))

    def _fail(self, call, error):
        if call.done:
            return
        call.finish()
        self.counters["errors"] += 1
        call.result.errback(error)

    # -- connections -----------------------------------------------------------

    def _node(self, address):
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(address)
        node.retired = False
        return node

    def _connect(self, node):
        """A Deferred that fires once the node has a connection (one attempt shared by all callers)."""
        if node.connecting is None:
            opening = self._open(node.address)
            opening.addCallbacks(self._connected, self._not_connected, (node,), None, (node,))
            node.connecting = _Shared(opening)
        return node.connecting.wait()

    def _connected(self, protocol, node):
        node.connecting = None
        if node.retired or not self.running:
            self.close_connection(protocol)
            raise ClusterUnavailable(f"{_where(node)} is no longer in use")
        node.connection = protocol
        protocol.whenDisconnected().addCallback(self._drop, node)

    @staticmethod
    def _not_connected(failure, node):
        node.connecting = None
        return failure

    @staticmethod
    def _drop(protocol, node):
        if node.connection is protocol:
            node.connection = None

    def _open(self, address, protocol=None):
        """A Deferred of a new connection to C{address} (a plain one unless C{protocol} is given)."""
        endpoint = TCP4ClientEndpoint(self.clock, address[0], address[1], timeout=self._connect_timeout)
        return endpoint.connect(_OneConnection(protocol or _protocol()))

    # -- blocking commands on dedicated connections ---------------------------

    def _send_dedicated(self, call, node):
        idle = self._idle_dedicated.get(node.address)
        while idle:
            protocol = idle.pop()
            if protocol.connected:
                self._send_on_dedicated(call, node, protocol)
                return
        opening = self._open(node.address)
        opening.addCallbacks(
            lambda protocol: self._send_on_dedicated(call, node, protocol),
            lambda f: self._failed(call, node, f.value, sent=False),
        )

    def _send_on_dedicated(self, call, node, protocol):
        self._dedicated.add(protocol)
        if call.done or not self.running:
            self._dedicated.discard(protocol)
            self.close_connection(protocol)
            return
        asking = call.ask_node is not None
        call.ask_node = None
        if asking:
            protocol.execute_command("ASKING").addErrback(lambda _: None)
        call.connection = protocol
        call.sent_at = self.clock.seconds()

        def replied(result):
            call.connection = None
            self._dedicated.discard(protocol)
            if isinstance(result, Failure):
                result = result.value
            if call.done or not protocol.connected:
                # A connection whose call ended early may still be blocked in
                # Redis: it is closed, never reused.
                self.close_connection(protocol)
            else:
                self._keep_idle(node.address, protocol)
            self._settle(call, node, result)
            return None

        sent = protocol.execute_command(*call.args)
        if call.replicas:
            sent = self._replicated(call, protocol, sent)
        sent.addBoth(replied)

    def _replicated(self, call, protocol, written):
        """
        Send C{WAIT} behind the write C{written}; a Deferred of the write's
        reply if enough replicas have it, else of the exception to report.
        C{WAIT} gives up a little before the call's deadline, so its answer
        arrives while the caller still listens.
        """
        remaining = call.deadline - self.clock.seconds()
        wait = remaining - min(WAIT_MARGIN, remaining / 2)
        waited = protocol.execute_command("WAIT", call.replicas, max(1, int(wait * 1000)))
        both = defer.gatherResults([written.addErrback(_value), waited.addErrback(_value)])

        def judge(pair):
            reply, confirmed = pair
            if isinstance(reply, Exception):
                return reply
            if isinstance(confirmed, Exception) or confirmed < call.replicas:
                self.counters["unreplicated"] += 1
                how = confirmed if isinstance(confirmed, Exception) else f"{confirmed} of {call.replicas} replicas have it"
                return txredisapi.ConnectionError(f"applied by the master, but {how}")
            return reply

        return both.addCallback(judge)

    def _keep_idle(self, address, protocol):
        """Keep a dedicated connection for the next blocking call to C{address} (a few per node)."""
        idle = self._idle_dedicated.setdefault(address, [])
        if self.running and len(idle) < MAX_IDLE_DEDICATED:
            idle.append(protocol)
        else:
            self.close_connection(protocol)

    # -- many commands ---------------------------------------------------------

    def pipeline(self, commands, timeout=None):
        """
        Send many commands at once, grouped by node on the wire; a Deferred
        of their results in the caller's order.  A result is the reply, or
        the exception for that command: only MOVED, ASK and TRYAGAIN are
        followed; a write whose connection failed is an L{OutcomeUnknown}.

        @raise CrossSlotError: at once, when one command's keys span slots.
        """
        calls = [self._call(tuple(command), timeout, None, pipelined=True) for command in commands]
        results = defer.DeferredList([self._start(call) for call in calls], consumeErrors=True)
        return results.addCallback(lambda pairs: [value if ok else value.value for ok, value in pairs])

    async def transaction(self, commands, timeout=None):
        """
        Run C{commands} as one MULTI/EXEC on one connection to the master of
        their single slot; the list of their replies.

        @raise CrossSlotError: at once, when the keys span slots.
        @raise TransactionAborted: when Redis refused the transaction (a
            redirect while queueing repoints the slot first; nothing ran).
        """
        keys = [key for command in commands for key in command_keys(command_name(command), command)]
        slot = _slot_of(keys, "MULTI/EXEC")
        if slot is None:
            raise CrossSlotError("MULTI/EXEC: a transaction must touch a key, to know its slot")
        deadline = self.clock.seconds() + (self.command_timeout if timeout is None else timeout)
        while True:
            node = self._slots[slot]
            if node is not None:
                break
            self.request_refresh()
            if self.clock.seconds() + MIN_REFRESH_GAP >= deadline:
                raise ClusterUnavailable(f"no master known for slot {slot}")
            await self._sleep(MIN_REFRESH_GAP)
        protocol = node.connection
        if protocol is None:
            await self._connect(node)
            protocol = node.connection
        replies = [protocol.execute_command("MULTI")]
        replies.extend(protocol.execute_command(*command) for command in commands)
        replies.append(protocol.execute_command("EXEC"))
        node.in_flight += 1
        self._ticks.at(deadline, _cancel_all, replies)
        try:
            outcomes = await defer.DeferredList(replies, consumeErrors=True)
        finally:
            node.in_flight -= 1
        executed, reply = outcomes[-1]
        if executed:
            return reply
        error = reply.value
        if not isinstance(error, txredisapi.ResponseError):
            raise OutcomeUnknown(f"MULTI/EXEC on {_where(node)}: {error or 'no reply by the deadline'}")
        queued = [value.value for ok, value in outcomes[1:-1] if not ok]
        for refusal in queued:
            if _error_kind(refusal) in ("MOVED", "ASK"):
                self._repoint(str(refusal))
        raise TransactionAborted("; ".join(str(e) for e in queued + [error]))

    def _repoint(self, moved):
        """Point the slot of a MOVED error at its new master and refresh soon."""
        slot, address = _redirect_target(moved)
        self._slots[slot] = self._node(address)
        self.counters["moved"] += 1
        self.request_refresh()

    def _sleep(self, seconds):
        slept = defer.Deferred()
        self._ticks.at(self.clock.seconds() + seconds, _fire_unless_called, slept)
        return slept

    # -- pub/sub ---------------------------------------------------------------

    def subscribe(self, channels, on_message):
        """
        Subscribe to C{channels}; C{on_message(channel, message)} for each
        message.  The subscription reconnects and subscribes again after its
        node fails; messages published while it was away are lost, as with
        any Redis pub/sub.  Returns a L{Subscription}.
        """
        subscription = Subscription(self, list(channels), on_message)
        self._subscriptions.add(subscription)
        subscription.start()
        return subscription

    def subscription_node(self, channel):
        """Where a subscription to C{channel} connects: its slot's master, or any known node."""
        node = self._slots[key_slot(channel)]
        if node is not None:
            return node.address
        return self._random.choice([node.address for node in self._masters] or self._startup_nodes)

    def open_subscriber(self, address, on_message):
        """A Deferred of a new subscriber connection to C{address}."""
        return self._open(address, _Subscriber(on_message))

    def forget_subscription(self, subscription):
        self._subscriptions.discard(subscription)

    def call_after_backoff(self, failures, function, *args):
        """Run C{function(*args)} after the pause due after C{failures} failures in a row."""
        self._ticks.at(self.clock.seconds() + self._backoff(failures), function, *args)

    def _backoff(self, doublings):
        """The pause before a retry: C{retry_backoff} doubled C{doublings} times, at most C{retry_backoff_max}."""
        return min(self._retry_backoff_max, self._retry_backoff * 2 ** doublings)

    def publish(self, channel, message, timeout=None):
        """Publish C{message} on C{channel}; a Deferred of how many subscribers got it."""
        return self.execute("PUBLISH", channel, message, timeout=timeout, route=channel)

    async def check(self):
        """
        For C{/health}: read the slot table afresh, then fail unless every
        slot has a master and every master answers C{PING} in time.
        """
        await self.refresh()
        uncovered = self._slots.count(None)
        if uncovered:
            raise ClusterUnavailable(f"{uncovered} slots have no master")
        pings = []
        for node in self._masters:
            call = self._call(("PING",), None, None)
            call.slot = self._slots.index(node)
            pings.append(self._start(call))
        await gather(pings)

    # -- the slot table --------------------------------------------------------

    def node_for(self, key):
        """C{(host, port)} of the master the router would send C{key} to, or C{None}."""
        node = self._slots[key_slot(key)]
        return None if node is None else node.address

    def masters(self):
        """The addresses of the masters in the current slot table."""
        return [node.address for node in self._masters]

    def request_refresh(self):
        """Ask for a fresh slot table: one shared refresh, at most every L{MIN_REFRESH_GAP}."""
        if self._refreshing is not None or self._refresh_queued or not self.running:
            return
        wait = self._last_refresh + MIN_REFRESH_GAP - self.clock.seconds()
        if wait > 0:
            self._refresh_queued = True
            self._ticks.at(self.clock.seconds() + wait, self._queued_refresh)
            return
        self._start_refresh()

    def _queued_refresh(self):
        self._refresh_queued = False
        self.request_refresh()

    def refresh(self):
        """Read the slot table now (joining a refresh under way); a Deferred."""
        self._start_refresh()
        return self._refreshing.wait()

    def _start_refresh(self):
        if self._refreshing is None:
            self.counters["refreshes"] += 1
            reading = defer.ensureDeferred(self._read_topology())
            reading.addBoth(self._refreshed)
            self._refreshing = _Shared(reading)

    def _refreshed(self, result):
        self._refreshing = None
        self._last_refresh = self.clock.seconds()
        if isinstance(result, Failure):
            self.counters["refresh_failures"] += 1
            self._log.warn("redis cluster: cannot read the slot table: {reason}", reason=result.value)
        return result

    def _periodic_refresh(self):
        self._periodic = self.clock.callLater(self._refresh_interval, self._periodic_refresh)
        self.request_refresh()

    async def _read_topology(self):
        candidates = []
        for address in [node.address for node in self._masters] + sorted(self._replicas) + self._startup_nodes:
            if address not in candidates:
                candidates.append(address)
        answer = defer.Deferred()
        failures = []

        def answered(reply, address):
            ranges, replicas = parse_cluster_slots(reply, address)
            if ranges and not answer.called:
                answer.callback((ranges, replicas, address))
            elif not ranges:
                failed(ClusterUnavailable("it serves no slots"), address)

        def failed(error, address):
            failures.append(f"{address[0]}:{address[1]}: {error}")
            if len(failures) == len(candidates) and not answer.called:
                answer.errback(ClusterUnavailable("no node gave the slot table: " + "; ".join(failures)))

        for address in candidates:
            asked = self._ask(address, "CLUSTER", "SLOTS")
            asked.addCallbacks(answered, lambda f, a=address: failed(f.value, a), callbackArgs=(address,))
        ranges, replicas, source = await answer
        self._install(ranges, replicas, source)

    def _ask(self, address, *command):
        """One command on a short-lived connection of its own, bounded by the timeouts."""

        async def ask():
            protocol = await self._open(address)
            try:
                return await protocol.execute_command(*command)
            finally:
                await self.close_connection(protocol)

        asked = defer.ensureDeferred(ask())
        self._probes.add(asked)
        asked.addTimeout(self._connect_timeout + self.command_timeout, self.clock)
        asked.addBoth(pass_after, self._probes.discard, asked)
        return asked

    def _install(self, ranges, replicas, source):
        """Replace the slot table in one step and log what moved."""
        table = [None] * SLOTS
        for (start, end), address in ranges.items():
            node = self._node(address)
            table[start:end + 1] = [node] * (end - start + 1)
        changes = _describe_changes(self._slots, table)
        masters = []
        for node in table:
            if node is not None and node not in masters:
                masters.append(node)
        self._slots = table
        self._masters = masters
        self._replicas = replicas
        if changes:
            self.counters["topology_changes"] += 1
            self._log.info("redis cluster: slot table from {source}: {changes}",
                           source=f"{source[0]}:{source[1]}", changes="; ".join(changes))
        for address, node in list(self._nodes.items()):
            if node not in masters and not node.in_flight and not node.waiting:
                node.retired = True
                del self._nodes[address]
                self._close_node(node)


# Lua for scripts that keep lists as space-separated text: split(text) -> words.
LUA_SPLIT = """
local function split(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do out[#out + 1] = word end
  return out
end
"""


class Script:
    """
    A Lua script called by SHA.  The first call (and any call that meets
    C{NOSCRIPT}, as a promoted replica does: script caches are not
    replicated) loads it on that master and calls again.
    """

    def __init__(self, router, source):
        self._router = router
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, keys=(), args=(), timeout=None):
        """Run the script with C{keys} (all in one slot) and C{args}; a Deferred of its reply."""
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        return self._router.execute(*command, timeout=timeout).addErrback(self._load_and_retry, command, timeout)

    def _load_and_retry(self, failure, command, timeout):
        failure.trap(txredisapi.ResponseError)
        if _error_kind(failure.value) != "NOSCRIPT":
            return failure
        router = self._router
        router.counters["noscript"] += 1
        route = command[3] if command[2] else None
        loading = router.execute("SCRIPT", "LOAD", self.source, timeout=timeout, route=route)
        return loading.addCallback(lambda _: router.execute(*command, timeout=timeout))


class Subscription:
    """A pub/sub subscription on a connection of its own that comes back after failures."""

    _log = Logger()

    def __init__(self, router, channels, on_message):
        self._router = router
        self.channels = channels
        self._on_message = on_message
        self._protocol = None
        self._stopped = False
        self._failures = 0
        self._subscribed = []
        self.reconnects = 0

    def start(self):
        """Connect and subscribe; again after every lost connection, until L{stop}."""
        defer.ensureDeferred(self._connect())

    @property
    def subscribed(self):
        """Whether the subscription is in place right now."""
        return self._protocol is not None

    def when_subscribed(self):
        """A Deferred that fires with the node's address the next time the subscription is in place."""
        waiter = defer.Deferred()
        self._subscribed.append(waiter)
        return waiter

    async def _connect(self):
        router = self._router
        if self._stopped:
            return
        address = router.subscription_node(self.channels[0])
        protocol = None
        try:
            protocol = await router.open_subscriber(address, self._on_message)
            await protocol.subscribe(self.channels).addTimeout(router.command_timeout, router.clock)
        except Exception as e:
            if protocol is not None:
                router.close_connection(protocol)
            self._failures += 1
            self._log.warn("redis pub/sub: cannot subscribe at {address}: {error}",
                           address=f"{address[0]}:{address[1]}", error=e)
            router.request_refresh()
            router.call_after_backoff(self._failures, self.start)
            return
        if self._stopped:
            router.close_connection(protocol)
            return
        self._failures = 0
        self._protocol = protocol
        protocol.whenDisconnected().addCallback(self._lost)
        self._log.info("redis pub/sub: subscribed at {address} to {count} channels",
                       address=f"{address[0]}:{address[1]}", count=len(self.channels))
        waiting, self._subscribed = self._subscribed, []
        for waiter in waiting:
            waiter.callback(address)

    def _lost(self, protocol):
        self._protocol = None
        if not self._stopped:
            self.reconnects += 1
            self._log.info("redis pub/sub: connection lost, subscribing again")
            self._router.request_refresh()
            self.start()

    def stop(self):
        """Unsubscribe by closing the connection; no more messages arrive."""
        self._stopped = True
        self._router.forget_subscription(self)
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            return self._router.close_connection(protocol)
        return defer.succeed(None)


class _Subscriber(txredisapi.SubscriberProtocol):
    def __init__(self, on_message):
        super().__init__(charset=None, convertNumbers=False)
        self._on_message = on_message

    def messageReceived(self, pattern, channel, message):
        self._on_message(channel, message)


def _slot_of(keys, what):
    """The one slot all C{keys} share (C{None} for no keys); L{CrossSlotError} if they span more."""
    slot = None
    for key in keys:
        this = key_slot(key)
        if slot is None:
            slot = this
        elif this != slot:
            raise CrossSlotError(f"{what}: keys {keys!r} are in more than one slot")
    return slot


def _describe(call):
    name = call.args[0]
    return name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)


def _where(node):
    return f"{node.address[0]}:{node.address[1]}"


def _describe_changes(old, new):
    """Lines like C{slots 0-5460: 127.0.0.1:7000 -> 127.0.0.1:7003}."""
    changes = []
    run_start, run = 0, None
    for slot in range(SLOTS + 1):
        pair = None if slot == SLOTS else (_name(old[slot]), _name(new[slot]))
        if pair != run:
            if run is not None and run[0] != run[1]:
                changes.append(f"slots {run_start}-{slot - 1}: {run[0]} -> {run[1]}")
            run_start, run = slot, pair
    return changes


def _name(node):
    return "nobody" if node is None else _where(node)


def _value(failure):
    return failure.value


def _cancel_all(deferreds):
    for deferred in deferreds:
        if not deferred.called:
            deferred.cancel()


def _fire_unless_called(deferred):
    if not deferred.called:
        deferred.callback(None)
