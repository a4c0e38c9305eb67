#!/usr/bin/env bash
# Two (or three) federated domains on one machine: starts a kalandra-server
# process per domain on loopback (a.test, b.test and with --domains 3
# c.test, each with its own temporary data directory and configuration;
# a.test names the others as its peers, each of them a.test), waits for
# their links, then with the `kalandra` command: alice of a.test creates a
# room and invites bob of b.test (and carol of c.test), each joins through
# its own server; bob invites dave, another user of b.test, who joins
# through b.test; each sends a message, and each reads everyone's in the
# room's history, in one order. With two domains, a.test is then killed
# (kill -9): bob reads the room from b.test's replica and his message waits
# in his outbox until a.test, started again on the same ports and data,
# takes it; alice and bob then read the same messages; last, alice kicks
# dave, whose device then holds nothing written after his removal. Exits 0
# when all of it worked; otherwise 1 with what failed. Stops exactly the
# servers it started and removes its temporary directory on every exit.
#
# Usage: deploy/federation-demo.sh [--domains 2|3]
#   KALANDRA_BIN_DIR=DIR  use kalandra-server and kalandra from DIR (no build)
#   CARGO_TARGET_DIR      where cargo builds them otherwise (default: target)
#   KALANDRA_DEMO_KEEP=1  keep the temporary directory (servers' logs, devices)
#
# Every listener is on 127.0.0.1 with port 0: the kernel picks free ports
# and the script reads them from each server's start-up lines (a.test's
# restart reuses its first ports). b.test (and
# c.test) dial a.test's federation listener; a.test, started first, accepts
# their links (its peer entries have no address), and both ends use the one
# link.
set -euo pipefail
cd "$(dirname "$0")/.."

domains=2
if [ "${1:-}" = "--domains" ]; then
    domains=${2:-}
fi
case "$domains" in
    2 | 3) ;;
    *) echo "usage: $0 [--domains 2|3]" >&2; exit 2 ;;
esac

# Seconds to wait for a server to start, and for the link to come up.
START_TIMEOUT_SECS=60
LINK_TIMEOUT_SECS=60

fail() {
    echo "federation-demo: FAILED: $*" >&2
    exit 1
}
step() { echo "federation-demo: $*"; }

bin_dir_given=${KALANDRA_BIN_DIR:-}
keep=${KALANDRA_DEMO_KEEP:-}
# The servers' and the command's environment variables outrank the files the
# script writes: none of the caller's may leak in.
while read -r name; do
    unset "$name"
done < <(compgen -e | grep '^KALANDRA_' || true)

if [ -n "$bin_dir_given" ]; then
    bin_dir=$bin_dir_given
else
    step "building kalandra-server and kalandra (cargo build)"
    cargo build --quiet --locked -p kalandra-server -p kalandra-cli --bins \
        || fail "cargo build failed"
    bin_dir=${CARGO_TARGET_DIR:-target}/debug
fi
server_bin=$bin_dir/kalandra-server
cli_bin=$bin_dir/kalandra
[ -x "$server_bin" ] || fail "no executable $server_bin"
[ -x "$cli_bin" ] || fail "no executable $cli_bin"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kalandra-federation-demo.XXXXXX")
pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$keep" = 1 ]; then
        echo "federation-demo: kept $scratch" >&2
    else
        rm -rf "$scratch"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

token=demo-operator-token-0001
printf '%s\n' "$token" > "$scratch/admin-token"

# The federation public key of the server whose data directory is $1
# (created there if there is none).
federation_key() {
    "$server_bin" --data-dir "$1" federation key 2>/dev/null \
        | sed -n 's/^federation key: \([0-9a-f]\{64\}\)$/\1/p'
}

# Writes the configuration of domain $1 in $scratch/$1, then its peers:
# each as three words, domain, key and address ("-": the peer dials this
# server).
write_config() {
    local domain=$1
    shift
    {
        echo "domain = \"$domain\""
        echo "data_dir = \"$scratch/$domain\""
        echo "listen = \"${quic_listen:-127.0.0.1:0}\""
        echo "admin_listen = \"${admin_listen:-127.0.0.1:0}\""
        echo "admin_token = \"$token\""
        echo 'log_filter = "warn"'
        echo
        echo '[federation]'
        echo "listen = \"${federation_listen:-127.0.0.1:0}\""
        while [ "$#" -ge 3 ]; do
            echo
            echo '[[federation.peers]]'
            echo "domain = \"$1\""
            if [ "$3" != - ]; then
                echo "address = \"$3\""
            fi
            echo "keys = [{ key = \"$2\" }]"
            shift 3
        done
    } > "$scratch/$domain.toml"
}

# Starts the server of domain $1 and waits for its start-up lines; sets
# quic_address, admin_address and federation_address.
start_server() {
    local domain=$1 log=$scratch/$1.log
    # Emptied here, not by the child's redirection, which may come after
    # the first look at the log (a restart would read the last run's lines).
    : > "$log"
    "$server_bin" --config "$scratch/$domain.toml" >> "$log" 2>&1 &
    pids+=($!)
    local deadline=$((SECONDS + START_TIMEOUT_SECS))
    # The whole line (a line being written may be read half).
    until grep -qs '^listening on quic://.*)$' "$log"; do
        if ! kill -0 "${pids[-1]}" 2>/dev/null; then
            cat "$log" >&2
            fail "the server of $domain exited at start"
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "the server of $domain did not start in ${START_TIMEOUT_SECS}s"
        sleep 0.1
    done
    quic_address=$(sed -n 's|^listening on quic://\([^ ]*\) (admin http://\([^)]*\))$|\1|p' "$log")
    admin_address=$(sed -n 's|^listening on quic://\([^ ]*\) (admin http://\([^)]*\))$|\2|p' "$log")
    federation_address=$(sed -n 's|^federation links on quic://\([^ ]*\) .*$|\1|p' "$log")
    [ -n "$quic_address" ] && [ -n "$admin_address" ] && [ -n "$federation_address" ] \
        || fail "cannot read the addresses of $domain from $log"
    step "$domain: pid ${pids[-1]}, clients quic://$quic_address, federation quic://$federation_address, admin http://$admin_address"
}

mkdir -p "$scratch/a.test" "$scratch/b.test" "$scratch/c.test"
key_a=$(federation_key "$scratch/a.test")
key_b=$(federation_key "$scratch/b.test")
key_c=$(federation_key "$scratch/c.test")
[ -n "$key_a" ] && [ -n "$key_b" ] && [ -n "$key_c" ] || fail "kalandra-server federation key printed no key"
if [ "$domains" = 3 ]; then
    step "federation keys: a.test $key_a, b.test $key_b, c.test $key_c"
    write_config a.test b.test "$key_b" - c.test "$key_c" -
else
    step "federation keys: a.test $key_a, b.test $key_b"
    write_config a.test b.test "$key_b" -
fi
start_server a.test
a_quic=$quic_address a_admin=$admin_address a_federation=$federation_address
write_config b.test a.test "$key_a" "$a_federation"
start_server b.test
b_quic=$quic_address b_admin=$admin_address
if [ "$domains" = 3 ]; then
    write_config c.test a.test "$key_a" "$a_federation"
    start_server c.test
    c_quic=$quic_address c_admin=$admin_address
fi

admin() { # admin API $1, command $2...
    local url=$1
    shift
    "$cli_bin" admin --url "http://$url" --token-file "$scratch/admin-token" "$@"
}
connected() { # admin API $1: how many peers it is linked with
    admin "$1" federation 2>/dev/null | grep -c '"connected": *true' || true
}
wait_for_links() { # until a.test is linked with each peer, and each peer with a.test
    local deadline=$((SECONDS + LINK_TIMEOUT_SECS))
    until [ "$(connected "$a_admin")" -eq $((domains - 1)) ] && [ "$(connected "$b_admin")" -eq 1 ] \
        && { [ "$domains" = 2 ] || [ "$(connected "$c_admin")" -eq 1 ]; }; do
        [ "$SECONDS" -lt "$deadline" ] || fail "the domains did not link in ${LINK_TIMEOUT_SECS}s (see $scratch/*.log)"
        sleep 0.2
    done
}
wait_for_links
step "a.test is linked with its $((domains - 1)) peer(s) (kalandra admin federation: connected)"

kalandra() { # device $1, command $2...
    local device=$1
    shift
    "$cli_bin" --dir "$scratch/$device" "$@"
}
alice=$(kalandra alice init --server "$a_quic" --server-cert "$scratch/a.test/tls/cert.pem") \
    || fail "alice's init on a.test"
bob=$(kalandra bob init --server "$b_quic" --server-cert "$scratch/b.test/tls/cert.pem") \
    || fail "bob's init on b.test"
step "alice is $alice on a.test, bob is $bob on b.test"
if [ "$domains" = 3 ]; then
    carol=$(kalandra carol init --server "$c_quic" --server-cert "$scratch/c.test/tls/cert.pem") \
        || fail "carol's init on c.test"
    step "carol is $carol on c.test"
fi

room=$(kalandra alice room create) || fail "alice's room create"
step "alice created room $room"
invited=$(kalandra alice invite --room "$room" --domain b.test "$bob") || fail "alice's invite of bob of b.test"
step "alice invited bob of b.test: $invited"
joined=$(kalandra bob join --room "$room" --wait-ms 30000) || fail "bob's join through b.test"
step "bob: $joined"
# bob, a member through b.test, invites another user of b.test: a.test
# learns dave's home from b.test's relay of the commit and sends the
# Welcome there.
dave=$(kalandra dave init --server "$b_quic" --server-cert "$scratch/b.test/tls/cert.pem") \
    || fail "dave's init on b.test"
invited=$(kalandra bob invite --room "$room" "$dave") || fail "bob's invite of dave of b.test"
step "bob invited dave of b.test: $invited"
joined=$(kalandra dave join --room "$room" --wait-ms 30000) || fail "dave's join through b.test"
step "dave: $joined"
if [ "$domains" = 3 ]; then
    invited=$(kalandra alice invite --room "$room" --domain c.test "$carol") \
        || fail "alice's invite of carol of c.test"
    step "alice invited carol of c.test: $invited"
    joined=$(kalandra carol join --room "$room" --wait-ms 30000) || fail "carol's join through c.test"
    step "carol: $joined"
fi
kalandra alice send --room "$room" "hello bob, from a.test" > /dev/null || fail "alice's send"
kalandra bob send --room "$room" "hello alice, from b.test" > /dev/null || fail "bob's send"
if [ "$domains" = 3 ]; then
    kalandra carol send --room "$room" "hello both, from c.test" > /dev/null || fail "carol's send"
fi

alice_history=$(kalandra alice history --room "$room") || fail "alice's history"
bob_history=$(kalandra bob history --room "$room") || fail "bob's history"
step "alice's history:"
printf '%s\n' "$alice_history" | sed 's/^/    /'
step "bob's history:"
printf '%s\n' "$bob_history" | sed 's/^/    /'
holds() { # history $1 has a line by sender $2 with exactly the text $3
    printf '%s\n' "$1" | awk -F '\t' -v s="$2" -v t="$3" '$2 == s && $3 == t { found = 1 } END { exit !found }'
}
holds "$alice_history" "$bob" "hello alice, from b.test" || fail "alice does not read bob's message"
holds "$bob_history" "$alice" "hello bob, from a.test" || fail "bob does not read alice's message"
dave_history=$(kalandra dave history --room "$room") || fail "dave's history"
holds "$dave_history" "$bob" "hello alice, from b.test" || fail "dave does not read bob's message"
# The messages (membership lines, `* …`, left out: bob joined at the commit
# that added him) are the same, in the same order, for both.
messages() { printf '%s\n' "$1" | grep -v '	\* ' || true; }

# alice, the room's admin on a.test, kicks dave of b.test: a.test proposes
# his removal, alice's next commit applies it, and dave's device keeps what
# he read before and reads nothing sent after.
remote_kick() {
    kalandra alice kick --room "$room" --reason demo "$dave" > /dev/null || fail "alice's kick of dave"
    kalandra alice update --room "$room" > /dev/null || fail "alice's commit of dave's removal"
    kalandra alice send --room "$room" "after dave's removal" > /dev/null || fail "alice's send after the kick"
    # dave's device catches up to his removal; the server refuses him after it.
    kalandra dave history --room "$room" > /dev/null 2>&1 || true
    local kept
    kept=$(kalandra dave history --room "$room" --offline) || fail "dave's history on his device"
    holds "$kept" "$bob" "hello alice, from b.test" || fail "dave's device lost what he read before the kick"
    if printf '%s\n' "$kept" | grep -q "after dave's removal"; then
        fail "dave reads a message sent after his removal"
    fi
    step "alice kicked dave of b.test: his device keeps what he read before and reads nothing after"
}

# a.test, the room's authority, is killed (kill -9): bob reads the room
# from b.test's replica, and his message waits in his outbox; a.test
# starts again on the same ports and data, the link comes back, and the
# message goes through: alice and bob then read the same messages.
authority_outage() {
    local a_pid=${pids[0]} status
    kill -9 "$a_pid" || fail "a.test (pid $a_pid) is already gone"
    wait "$a_pid" 2>/dev/null || true
    pids=("${pids[@]:1}")
    step "a.test killed (kill -9 $a_pid)"
    local offline
    offline=$(kalandra bob history --room "$room") || fail "bob's history while a.test is down"
    [ "$(messages "$offline")" = "$(messages "$bob_history")" ] \
        || fail "bob reads another history from b.test's replica while a.test is down"
    step "bob reads the room's history from b.test's replica while a.test is down"
    status=0
    kalandra bob send --room "$room" "while a.test was down" > /dev/null 2> "$scratch/bob-send.err" \
        || status=$?
    [ "$status" -ne 0 ] || fail "bob's send went through with a.test down"
    step "bob's send while a.test is down: exit $status, $(cat "$scratch/bob-send.err")"
    quic_listen=$a_quic admin_listen=$a_admin federation_listen=$a_federation \
        write_config a.test b.test "$key_b" -
    start_server a.test
    wait_for_links
    step "a.test is back and linked with b.test"
    kalandra bob send --room "$room" "after a.test came back" > /dev/null || fail "bob's send after a.test came back"
    alice_history=$(kalandra alice history --room "$room") || fail "alice's history after a.test came back"
    bob_history=$(kalandra bob history --room "$room") || fail "bob's history after a.test came back"
    step "alice's history:"
    printf '%s\n' "$alice_history" | sed 's/^/    /'
    holds "$alice_history" "$bob" "while a.test was down" || fail "bob's message sent while a.test was down is lost"
    holds "$alice_history" "$bob" "after a.test came back" || fail "bob's message sent after a.test came back is lost"
    [ "$(messages "$alice_history")" = "$(messages "$bob_history")" ] \
        || fail "alice and bob read different messages or orders after a.test came back"
}
[ "$(messages "$alice_history")" = "$(messages "$bob_history")" ] \
    || fail "alice and bob read different messages or orders"
if [ "$domains" = 2 ]; then
    authority_outage
    remote_kick
    step "OK: alice (a.test) and bob (b.test) read each other's messages, each through its own server; dave, invited by bob, reads bob's; nothing bob sent while a.test was down was lost; dave, kicked, reads nothing after"
    exit 0
fi
carol_history=$(kalandra carol history --room "$room") || fail "carol's history"
step "carol's history:"
printf '%s\n' "$carol_history" | sed 's/^/    /'
holds "$alice_history" "$carol" "hello both, from c.test" || fail "alice does not read carol's message"
holds "$carol_history" "$bob" "hello alice, from b.test" || fail "carol does not read bob's message"
# carol joined before anyone wrote: all three read the same messages in
# the same order.
[ "$(messages "$alice_history")" = "$(messages "$carol_history")" ] \
    || fail "alice and carol read different messages or orders"
step "OK: alice (a.test), bob (b.test) and carol (c.test) read each other's messages in one order, each through its own server"
