#!/usr/bin/env bash
# A second "host" on this machine, for tests with real link failures: a
# network namespace joined to this host by one veth pair, each end with an
# address on a private /30 of 10.213.0.0/16.  A client run inside the
# namespace (ip netns exec) reaches servers listening on the host's end, and
# `cut` pulls the client's cable: its end of the veth goes down, so nothing
# crosses until `restore`.  (This kernel has no tc netem: ip link is the cut.)
#
#   scripts/netns.sh up        make the namespace, the veth and the addresses (or reuse them), link up
#   scripts/netns.sh down      remove everything `up` made
#   scripts/netns.sh status    print the names and addresses; exit 0 when it is up, 1 when not
#   scripts/netns.sh cut       ip link set <namespace's end> down
#   scripts/netns.sh restore   ip link set <namespace's end> up
#
# `up` and `status` print shell assignments (NETNS=... NETNS_HOST_ADDR=...).
#
# What it never does: give an address to anything but the two veth ends it
# made, route anywhere else, add a default route or NAT.  The namespace
# knows only its /30; on the host, the /30 gets an `unreachable` route of a
# low priority (metric 4242) so that traffic for it never falls through to
# the default route while the host's end is down.  `down` removes that too.
#
# Names come from the checkout's path (two checkouts never collide):
# namespace dr-<8 hex>, veth ends dr-<8 hex>-h (host) and dr-<8 hex>-n;
# DREAMRAID_NETNS=NAME (at most 12 of [a-z0-9-]) picks another.
# Needs root; installs iproute2 from Debian's packages if `ip` is missing.
# Exit codes: 0 done, 1 failed, 3 this machine cannot make network namespaces or
# veth pairs (no ip and no way to install it, or the kernel or container
# refuses), or routes all of 10.213.0.0/16 already (nothing is made then).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUARD_METRIC=4242

say() { printf 'netns: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

HASH=$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)
NS=${DREAMRAID_NETNS:-dr-$HASH}
[[ $NS =~ ^[a-z0-9-]{1,12}$ ]] || die "DREAMRAID_NETNS must be 1 to 12 of [a-z0-9-], not '$NS'"
HOST_VETH=$NS-h
NS_VETH=$NS-n

# -- prerequisites --------------------------------------------------------------

need_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces and veth pairs are made with ip as root)"
}

# Without ip (and no way to install it) this machine cannot make the
# namespace: exit 3, as for a kernel that cannot, so tests skip with the reason.
ensure_ip() {
    command -v ip >/dev/null && return 0
    if ! command -v apt-get >/dev/null; then
        say "ip is missing and there is no apt-get to install it: install iproute2"
        exit 3
    fi
    say "installing iproute2 from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || { say "ip is missing and apt-get update failed: install iproute2 by hand"; exit 3; }
    apt-get install -y -qq iproute2 >&2 || { say "ip is missing and apt-get install failed: install iproute2 by hand"; exit 3; }
    command -v ip >/dev/null || { say "iproute2 is installed but ip is not on PATH ($PATH)"; exit 3; }
}

# -- state (read back from the kernel: the veth ends and their addresses) -----

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$NS"; }

# The /30 (a.b.c.d/30) of the host's end, or nothing.
host_cidr() { { ip -4 -o addr show dev "$HOST_VETH" 2>/dev/null || true; } | awk '{print $4; exit}'; }

network_of() {  # 10.213.7.9/30 -> 10.213.7.8/30
    local ip=${1%/*} a b c d
    IFS=. read -r a b c d <<<"$ip"
    printf '%s.%s.%s.%s/30\n' "$a" "$b" "$c" "$((d & 252))"
}

print_state() {
    local cidr ns_cidr
    cidr=$(host_cidr)
    ns_cidr=$({ ip -n "$NS" -4 -o addr show dev "$NS_VETH" 2>/dev/null || true; } | awk '{print $4; exit}')
    printf 'NETNS=%s\nNETNS_HOST_VETH=%s\nNETNS_CLIENT_VETH=%s\n' "$NS" "$HOST_VETH" "$NS_VETH"
    printf 'NETNS_HOST_ADDR=%s\nNETNS_CLIENT_ADDR=%s\n' "${cidr%/*}" "${ns_cidr%/*}"
}

# A /30 of 10.213.0.0/16 that nothing on this host uses or routes to yet (the
# default route aside): the first of 64 candidates drawn from the hash.
pick_network() {
    local i h third fourth net
    for i in $(seq 0 63); do
        h=$(printf '%s:%s' "$ROOT" "$i" | sha256sum | cut -c1-4)
        third=$((16#${h:0:2})) fourth=$(((16#${h:2:2}) & 252))
        net=10.213.$third.$fourth
        if [ -z "$(ip -4 route show table all match "$net" | grep -v -e '^default' -e "^unreachable $net/30 .*metric $GUARD_METRIC" || true)" ] &&
            [ -z "$(ip -4 -o addr show to "$net/30")" ]; then
            printf '%s\n' "$net"
            return 0
        fi
    done
    say "no free /30 in 10.213.0.0/16 among 64 tries (something on this host routes it): nothing made"
    exit 3
}

# -- commands -------------------------------------------------------------------

up() {
    need_root
    ensure_ip
    local cidr net
    cidr=$(host_cidr)
    if [ -z "$cidr" ]; then
        net=$(pick_network) || exit $?  # a.b.c.d: the host's end gets .d+1, the namespace's .d+2
    fi
    if ! ns_exists; then
        if ! ip netns add "$NS" 2>/dev/null; then
            say "this machine cannot make network namespaces (ip netns add $NS failed)"
            exit 3
        fi
    fi
    if ! ip link show dev "$HOST_VETH" >/dev/null 2>&1; then
        if ! ip link add "$HOST_VETH" type veth peer name "$NS_VETH" netns "$NS"; then
            down_quietly
            say "this machine cannot make veth pairs (ip link add $HOST_VETH type veth failed)"
            exit 3
        fi
    fi
    if [ -z "$cidr" ]; then
        ip addr add "${net%.*}.$((${net##*.} + 1))/30" dev "$HOST_VETH"
        ip -n "$NS" addr add "${net%.*}.$((${net##*.} + 2))/30" dev "$NS_VETH"
        cidr=$(host_cidr)
    fi
    net=$(network_of "$cidr")
    # No IPv6 link-local addresses on the pair: only the two IPv4 ones.
    ip link set dev "$HOST_VETH" addrgenmode none 2>/dev/null || true
    ip -n "$NS" link set dev "$NS_VETH" addrgenmode none 2>/dev/null || true
    ip route replace unreachable "$net" metric "$GUARD_METRIC"
    ip link set "$HOST_VETH" up
    ip -n "$NS" link set lo up
    ip -n "$NS" link set "$NS_VETH" up
    print_state
}

down_quietly() {
    # The pair first (deleting one end deletes both, at once; the namespace's
    # own clean-up would do it too, but later), then the namespace.
    if ip link show dev "$HOST_VETH" >/dev/null 2>&1; then ip link del "$HOST_VETH" || true; fi
    if ns_exists; then ip netns del "$NS" || true; fi
    # Then the guards whose /30 no veth holds any more (ours, or one a killed
    # run left): unreachable routes of our metric in 10.213.0.0/16 with no
    # address on this host in them.  Another checkout's, while up, keeps its own.
    local net
    for net in $(ip -4 route show table main |
                 awk -v m="$GUARD_METRIC" '$1 == "unreachable" && $2 ~ /^10\.213\./ && $0 ~ ("metric " m) {print $2}'); do
        if [ -z "$(ip -4 -o addr show to "$net")" ]; then
            ip route del unreachable "$net" metric "$GUARD_METRIC" || true
        fi
    done
}

down() {
    need_root
    command -v ip >/dev/null || return 0  # nothing can have been made without it
    down_quietly
    if ns_exists || ip link show dev "$HOST_VETH" >/dev/null 2>&1; then
        die "could not remove $NS / $HOST_VETH"
    fi
}

status() {
    command -v ip >/dev/null || die "ip is missing; install iproute2"
    ns_exists && [ -n "$(host_cidr)" ] || { say "$NS is not up"; return 1; }
    print_state
    local state
    state=$(ip -n "$NS" -o link show dev "$NS_VETH" | grep -q '[<,]UP[,>]' && echo up || echo cut)
    printf 'NETNS_LINK=%s\n' "$state"
}

set_link() {
    need_root
    command -v ip >/dev/null && ns_exists || die "$NS is not up: run scripts/netns.sh up first"
    ip -n "$NS" link set "$NS_VETH" "$1"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    cut) set_link down ;;
    restore) set_link up ;;
    *) die "usage: scripts/netns.sh up|down|status|cut|restore" ;;
esac
