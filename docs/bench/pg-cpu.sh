#!/usr/bin/env bash
# PostgreSQL CPU per commit while a command runs (docs/BENCHMARKS.md, "PostgreSQL under
# contended rooms").
#
# Usage:
#   docs/bench/pg-cpu.sh [-a APP] [-c COMMITS] -- COMMAND [ARGS...]
#
#   -a APP      also report the backends whose application_name is APP on their own (a
#               Tandem node's is `tandem-<schema>`), so a shared server's other users do not
#               count; without -a only the server-wide figure is printed
#   -c COMMITS  the commits the run made; default: read from the load test's report (the
#               `N acked` of `tandem-loadtest --quiet`'s writes line, or the `"acked"`
#               field of its `--json` report)
#   PGCPU_PSQL  how to reach the server for -a (default: psql -h 127.0.0.1 -U postgres test)
#
# Runs COMMAND (its output passes through unchanged) and prints, at the end, the CPU the
# PostgreSQL processes used meanwhile: utime + stime from /proc/PID/stat, in clock ticks,
# summed over every child of the postmaster (backends, WAL writer, checkpointer, ...) plus
# the postmaster's own time and the time of children that exited during the run (the
# postmaster's cutime + cstime), so a backend that disconnects mid-run still counts. Divided
# by the commits, that is µs of PostgreSQL CPU per commit. Needs read access to /proc of the
# postgres processes (the same host), not to the server's configuration.
#
# Example (two nodes on 7520/7521 with schema S, see BENCHMARKS.md):
#   docs/bench/pg-cpu.sh -a tandem-S -- tandem-loadtest --secret "$SECRET" \
#     --url ws://127.0.0.1:7520 --url ws://127.0.0.1:7521 --quiet \
#     rooms --groups 250 --group-size 4 --rate 1 --duration 20s
set -euo pipefail

app="" commits=""
while getopts "a:c:h" opt; do
    case $opt in
        a) app=$OPTARG ;;
        c) commits=$OPTARG ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
[[ $# -gt 0 ]] || { echo "pg-cpu: no command (see $0 -h)" >&2; exit 2; }

psql_cmd=${PGCPU_PSQL:-psql -h 127.0.0.1 -U postgres test}
postmaster=$(pgrep -u postgres -o -x postgres || pgrep -o -x postgres) || {
    echo "pg-cpu: no postmaster found" >&2
    exit 1
}

# "pid ticks" for the postmaster (own + reaped children) and each of its live children.
ticks() {
    local pid rest
    for pid in "$postmaster" $(pgrep -P "$postmaster"); do
        # Fields after "pid (comm) ": state ppid ... utime(12) stime(13) cutime(14) cstime(15).
        rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${rest##*) }
        # shellcheck disable=SC2086
        set -- $rest
        if [[ $pid == "$postmaster" ]]; then
            echo "$pid $((${12} + ${13} + ${14} + ${15}))"
        else
            echo "$pid $((${12} + ${13}))"
        fi
    done
}

# The pids of the backends named APP, one a line.
app_pids() {
    [[ -n $app ]] || return 0
    $psql_cmd -XAtqc "SELECT pid FROM pg_stat_activity WHERE application_name = '$app'"
}

# Transactions committed in the database (all of its users), for transactions per commit.
xacts() {
    [[ -n $app ]] || return 0
    $psql_cmd -XAtqc "SELECT pg_stat_clear_snapshot(); SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()" | tail -1
}

before=$(ticks)
pids_before=$(app_pids)
xacts_before=$(xacts)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
"$@" | tee "$out" || status=$?
pids_after=$(app_pids)
after=$(ticks)
sleep 1 # the server publishes its transaction counts up to a second late
xacts_after=$(xacts)

# A process missing before counts from zero; one gone after is in the postmaster's cutime.
read -r all mine < <(awk -v pids="$pids_before $pids_after" '
    BEGIN { n = split(pids, p, /[ \n]+/); for (i = 1; i <= n; i++) if (p[i] != "") app[p[i]] = 1 }
    NR == FNR { before[$1] = $2; next }
    { d = $2 - before[$1]; all += d; if ($1 in app) mine += d }
    END { print all + 0, mine + 0 }' <(echo "$before") <(echo "$after"))

if [[ -z $commits ]]; then
    commits=$(grep -oE '"acked": ?[0-9]+' "$out" | grep -oE '[0-9]+$' | head -1 || true)
fi
if [[ -z $commits ]]; then
    commits=$(grep -oE '[0-9]+ acked' "$out" | head -1 | grep -oE '^[0-9]+' || true)
fi

hz=$(getconf CLK_TCK)
per_commit() {
    if [[ -n $commits && $commits -gt 0 ]]; then
        awk -v t="$1" -v hz="$hz" -v c="$commits" 'BEGIN { printf "%.0f µs/commit", t * 1e6 / hz / c }'
    else
        echo "commits unknown (use -c)"
    fi
}
echo "pg-cpu: commits ${commits:-?}; postgres (all) $all ticks = $(per_commit "$all")"
if [[ -n $app ]]; then
    echo "pg-cpu: backends of $app $mine ticks = $(per_commit "$mine"); others $((all - mine)) ticks"
    echo "pg-cpu: transactions committed in the database (all its users): $((xacts_after - xacts_before))"
fi
echo "pg-cpu: (clock ticks of 1/$hz s)"
exit "$status"
