"""
The game server's client protocol: authenticate with the token, then hunt
and change the inventory.  Each request is decoded here and handed to one
service call; its result is encoded, its refusal becomes an error frame.
"""

from zope.interface import implementer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.protocols.server import ServerFactory, ServerProtocol, handles
from dreamraid.services.players import IPlayerConnection


def _inventory(items):
    return packets.INVENTORY, {"items": [item._asdict() for item in items]}


def _hunted(hunted):
    reply = hunted._asdict()
    reply["changed"] = [item._asdict() for item in hunted.changed]
    return packets.HUNTED, reply


def _enhanced(enhanced):
    return packets.ENHANCED, enhanced._asdict()


def _party(party):
    """A L{dreamraid.services.parties.Party} (or None) as a party body."""
    if party is None:
        return {"code": "", "leader": 0, "members": [], "names": ""}
    return {"code": party.code, "leader": party.leader, "members": [{"user_id": u} for u, _ in party.members],
            "names": " ".join(name for _, name in party.members)}


def _party_changed(body):
    return {"reason": body["reason"], "user_id": body["user_id"], "code": body["code"], "leader": body["leader"],
            "members": [{"user_id": m["user_id"]} for m in body["members"]],
            "names": " ".join(m["name"] for m in body["members"])}


def _tables(tables):
    """The body of a tables reply: the L{dreamraid.tables.GameTables} as the wire carries them."""
    items = sorted(tables.items.items())
    return {
        "max_level": tables.max_level,
        "exp_to_advance": [{"level": level, "exp": exp} for level, exp in sorted(tables.exp_to_advance.items())],
        "max_enhancement": tables.max_enhancement,
        "enhance_chances": [{"enhancement": level, "percent": percent}
                            for level, percent in sorted(tables.enhance_success_percent.items())],
        "slots": tables.slots,
        "hunt_cooldown_ms": tables.hunt_cooldown_ms,
        "monsters": [{"monster": kind, "exp": exp} for kind, exp in sorted(tables.monster_exp.items())],
        "raid_exp_per_score": tables.raid_exp_per_score,
        "items": [{"item_code": code, "tab": kind.tab, "stack": kind.stack} for code, kind in items],
        "item_names": "\n".join(kind.name for _, kind in items),
    }


# Events services push to players (IPlayerConnection.push): message and body.
_PUSHES = {
    "party_changed": (packets.PARTY_CHANGED, _party_changed),
    "matchmaking": (packets.MATCHMAKING, dict),
    "raid_found": (packets.RAID_FOUND, lambda body: {**body, "members": [{"user_id": u} for u in body["members"]]}),
    "raid_fight": (packets.RAID_FIGHT, dict),
    "raid_result": (packets.RAID_RESULT, dict),
}


@implementer(IPlayerConnection)
class GameProtocol(ServerProtocol):
    """One player's connection to a game server."""

    player = None  # the services' Player this connection plays as, once authenticated
    _pushes_held = None  # pushes held while an authentication is answered: they follow its reply

    # The requests that make the connection a player: pushes that come while one is served (what the player
    # missed while away, a raid_found for the authentication) are written after its reply, which a client
    # waits for before it listens to pushes on a new connection.
    _ENTERING = (packets.AUTHENTICATE, packets.AUTHENTICATE_HANDOFF, packets.RESUME)

    @property
    def user_id(self):
        return None if self.player is None else self.player.user_id

    @property
    def name(self):
        return None if self.player is None else self.player.name

    def connectionLost(self, reason):
        super().connectionLost(reason)
        # After the ordered request running now, if any: an authenticate may yet make this connection a player.
        self.in_order(self._gone)

    def _gone(self):
        if self.player is not None:
            return self.factory.players.connection_lost(self)
        return None

    def kick(self, code):
        self.drop(code)

    def push(self, event, body):
        if self._pushes_held is not None:
            self._pushes_held.append((event, body))
            return
        message, encode = _PUSHES[event]
        if self.connected:
            self.write_frame(message.encode(0, encode(body)))
            if self.factory.metrics is not None:
                self.factory.metrics.replied(message)

    # Requests that change who the connection is or where its player belongs
    # are ordered: one at a time per connection, in arrival order.

    def _reply(self, result, request_id, request, started):
        super()._reply(result, request_id, request, started)
        if request in self._ENTERING:
            self._release_pushes()

    def _request_failed(self, failure, request_id, message, started):
        super()._request_failed(failure, request_id, message, started)
        if message in self._ENTERING:
            self._release_pushes()

    def _release_pushes(self):
        """The authentication was answered: the pushes held meanwhile follow, in order."""
        held, self._pushes_held = self._pushes_held or [], None
        for event, body in held:
            self.push(event, body)

    @handles(packets.AUTHENTICATE, needs_auth=False, ordered=True)
    async def authenticate(self, body):
        if self.user_id is not None:
            raise RequestRefused(ErrorCode.ALREADY_AUTHENTICATED)
        self._pushes_held = []
        return await self._entered(self.factory.players.authenticate(self, body["token"]))

    @handles(packets.AUTHENTICATE_HANDOFF, needs_auth=False, ordered=True)
    async def authenticate_handoff(self, body):
        if self.user_id is not None:
            raise RequestRefused(ErrorCode.ALREADY_AUTHENTICATED)
        self._pushes_held = []
        return await self._entered(self.factory.players.authenticate_handoff(self, body["user_id"], body["ticket"]))

    @handles(packets.RESUME, needs_auth=False, ordered=True)
    async def resume(self, body):
        if self.user_id is not None:
            raise RequestRefused(ErrorCode.ALREADY_AUTHENTICATED)
        self._pushes_held = []
        authenticated = await self._entered(self.factory.players.resume(self, body["token"], body["user_id"],
                                                                        body["ticket"]))
        if authenticated is None:
            return None
        user_id, holder = self.user_id, self.player.holder  # this resume's authentication, before any await
        reply = {**authenticated[1], "party_code": "", "queued_group": 0, "raid_id": "", "boss_hp": 0, "ms_left": 0,
                 "score": 0}
        party = await self.factory.parties.party_of(user_id)
        if party is not None:
            reply["party_code"] = party.code
        place = await self.factory.matchmaker.place_of(user_id)
        if place is not None and place[0] == "queued":
            reply["queued_group"] = place[1]
        elif place is not None:
            standing = await self.factory.raids.rejoin(user_id, place[1], place[2], holder)
            reply.update(raid_id=standing.raid_id, boss_hp=standing.hp, ms_left=standing.ms_left,
                         score=standing.score)
        return packets.RESUMED, reply

    async def _entered(self, entering):
        try:
            entered = await entering
        except RequestRefused as e:
            # Refused credentials close the connection once the error is written: no trying token after token.
            # Redis out of reach (UNAVAILABLE) says nothing of them: the client may try again.
            if e.code != ErrorCode.UNAVAILABLE:
                self.close_after_reply = True
            raise
        if not self.connected:
            # The connection went away while Redis answered: its leave, queued behind this, lets the user go.
            return None
        self.factory.liveness.authenticated(self.state)
        return packets.AUTHENTICATED, {"user_id": entered.user_id, "name": entered.name,
                                       "level": entered.level, "exp": entered.exp}

    @handles(packets.GAME_TABLES, needs_auth=False)
    def game_tables(self, body):
        if self.factory.tables is None:
            raise RequestRefused(ErrorCode.NOT_ACCEPTED, "this server has no game tables")
        return packets.TABLES, self.factory.tables

    @handles(packets.LOGOUT, ordered=True)
    async def logout(self, body):
        # Frames after this one (a pipelined hunt, say) are no longer this player's.
        self.state.authenticated = False
        try:
            await self.factory.players.leave(self, wait_for_handoff=False)
        finally:
            # Even if the leave failed (an error reply): the connection is nobody's now, and closes.
            self.player = None
            self.close_after_reply = True
        return packets.LOGGED_OUT, {}

    # Hunting and the inventory are the hot path: each handler returns the
    # service's Deferred with the reply's encoding chained on, no coroutine.

    @handles(packets.HUNT)
    def hunt(self, body):
        return self.factory.inventory.hunt(self.user_id, body["monster"]).addCallback(_hunted)

    @handles(packets.LIST_INVENTORY)
    def list_inventory(self, body):
        return self.factory.inventory.list(self.user_id).addCallback(_inventory)

    @handles(packets.DELETE_ITEM)
    def delete_item(self, body):
        return self.factory.inventory.delete(self.user_id, body["tab"], body["slot"]).addCallback(_inventory)

    @handles(packets.MOVE_ITEM)
    def move_item(self, body):
        moved = self.factory.inventory.move(self.user_id, body["tab"], body["from_slot"], body["to_slot"])
        return moved.addCallback(_inventory)

    @handles(packets.USE_ITEM)
    def use_item(self, body):
        return self.factory.inventory.use(self.user_id, body["slot"]).addCallback(_inventory)

    @handles(packets.ENHANCE)
    def enhance(self, body):
        return self.factory.inventory.enhance(self.user_id, body["slot"]).addCallback(_enhanced)

    @handles(packets.GRANT)
    def grant(self, body):
        if not self.factory.dev_grant:
            raise RequestRefused(ErrorCode.GRANT_DISABLED)
        return self.factory.inventory.grant(self.user_id, body["item_code"], body["count"]).addCallback(_inventory)


    @handles(packets.RANKING_PAGE)
    async def ranking_page(self, body):
        entries = await self.factory.ranking.page(body["first"], body["count"])
        return packets.RANKING, {"entries": [{"rank": e.rank, "user_id": e.user_id, "score": e.score}
                                             for e in entries],
                                 "names": " ".join(e.name for e in entries)}

    @handles(packets.MY_RANK)
    async def my_rank(self, body):
        return packets.RANK, (await self.factory.ranking.own(self.user_id))._asdict()


    @handles(packets.QUEUE_RAID, ordered=True)
    async def queue_raid(self, body):
        return packets.QUEUED, {"group": await self.factory.matchmaker.enqueue(self.user_id)}

    @handles(packets.CANCEL_QUEUE, ordered=True)
    async def cancel_queue(self, body):
        await self.factory.matchmaker.cancel(self.user_id)
        return packets.QUEUE_CANCELLED, {}

    @handles(packets.RAID_READY)
    def raid_ready(self, body):
        self.factory.raids.ready(self.user_id, body["raid_id"])
        return packets.RAID_READY_OK, {}

    @handles(packets.RAID_HIT)
    def raid_hit(self, body):
        return packets.HIT, self.factory.raids.hit(self.user_id, body["raid_id"])._asdict()

    # A party that changes while its ticket waits is taken out of the queue,
    # after the change (Matchmaker.withdraw says why), and every member hears it.

    @handles(packets.CREATE_PARTY, ordered=True)
    async def create_party(self, body):
        return packets.PARTY, _party(await self.factory.parties.create(self.user_id, self.name))

    @handles(packets.JOIN_PARTY, ordered=True)
    async def join_party(self, body):
        party = await self.factory.parties.join(self.user_id, self.name, body["code"])
        # The party's ticket, and any the joiner had alone.
        await self.factory.matchmaker.withdraw([u for u, _ in party.members], party)
        return packets.PARTY, _party(party)

    @handles(packets.LEAVE_PARTY, ordered=True)
    async def leave_party(self, body):
        user_id = self.user_id  # a logout while this runs sets it to None
        party = await self.factory.parties.leave(user_id)
        await self.factory.matchmaker.withdraw([user_id], party)
        return packets.PARTY_LEFT, {}

    @handles(packets.KICK_MEMBER, ordered=True)
    async def kick_member(self, body):
        user_id = self.user_id  # a logout while this runs sets it to None
        party = await self.factory.parties.kick(user_id, body["user_id"])
        await self.factory.matchmaker.withdraw([body["user_id"]], party)
        return packets.PARTY, _party(party)

    @handles(packets.MY_PARTY)
    async def my_party(self, body):
        return packets.PARTY, _party(await self.factory.parties.party_of(self.user_id))


class GameFactory(ServerFactory):
    """Builds L{GameProtocol}s over one game server's services."""

    protocol = GameProtocol

    def __init__(self, server_name, settings, liveness, players, inventory, ranking, parties, matchmaker, raids,
                 tables=None):
        """
        @param tables: the L{dreamraid.tables.GameTables} game_tables answers
            with (None: it is refused).
        @raise packets.CodecError: the tables do not fit the tables reply.
        """
        super().__init__(server_name, settings, liveness)
        self.tables = None if tables is None else _tables(tables)
        if self.tables is not None:
            packets.TABLES.encode(0, self.tables)  # a table the wire cannot carry stops start-up
        self.matchmaker = matchmaker
        self.raids = raids
        self.players = players
        self.inventory = inventory
        self.ranking = ranking
        self.parties = parties
        self.dev_grant = settings.dev_grant == "on"
