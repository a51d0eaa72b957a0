#!/usr/bin/env bash
# bench-node.sh TANDEM STORE LOAD_ARGS...: starts a fresh node from the `tandem` binary TANDEM
# (STORE `sqlite`: a new data dir; `pg`: a new schema in the `test` database of the PostgreSQL
# at 127.0.0.1:5432), runs `tandem load … LOAD_ARGS` against it with the load generator from
# $LOAD_BIN (default: TANDEM), prints the report's last lines and, for `pg`, the CPU time all
# PostgreSQL processes spent per acknowledged commit. Then stops the node and drops the store.
# Environment: SERVE_ARGS (more `tandem serve` options), PRE_SQL (run in the schema before the
# load), KEEP=1 (keep the schema), TAILN (report lines shown, 30). docs/BENCHMARKS.md uses it
# as `bench.sh KIND STORE ARGS`, KIND naming the build.
set -u
BIN=$1; STORE=$2; shift 2
LOAD_BIN=${LOAD_BIN:-$BIN}
SECRET=benchsecretbenchsecretbenchsecret0123
PORT=${PORT:-7420}
DIR=$(mktemp -d /var/tmp/bench-XXXX)

# CPU ticks of every PostgreSQL process, with the children the postmaster reaped.
pg_ticks() {
  local pm t=0 p f
  pm=$(pgrep -o -x postgres)
  for p in $(pgrep -x postgres); do
    read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    t=$((t + f[11] + f[12]))
    if [ "$p" = "$pm" ]; then t=$((t + f[13] + f[14])); fi
  done
  echo "$t"
}

STOREARGS=()
if [ "$STORE" = pg ]; then
  SCHEMA=bench_$(date +%s%N | tail -c 9)
  STOREARGS=(--store "postgres://root@127.0.0.1:5432/test" --postgres-schema "$SCHEMA")
fi
# shellcheck disable=SC2086
"$BIN" serve --listen 127.0.0.1:$PORT --data-dir "$DIR" "${STOREARGS[@]}" --jwt-secret $SECRET \
  ${SERVE_ARGS:-} >"$DIR/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.1; done
if [ -n "${PRE_SQL:-}" ] && [ "$STORE" = pg ]; then
  psql -q -h 127.0.0.1 -U root test -c "SET search_path=$SCHEMA; $PRE_SQL"
fi
PG0=$(pg_ticks)
"$LOAD_BIN" load --secret $SECRET --url ws://127.0.0.1:$PORT/v1/sync --server-pid $PID "$@" \
  >"$DIR/load.out" 2>&1
PG1=$(pg_ticks)
tail -"${TAILN:-30}" "$DIR/load.out"
if [ "$STORE" = pg ]; then
  ACK=$(grep -E "^  writes" "$DIR/load.out" | awk '{print $4}')
  SCPU=$(grep -E "server cpu per" "$DIR/load.out" | awk '{print $5}')
  HZ=$(getconf CLK_TCK)
  awk -v a="${ACK:-0}" -v d=$((PG1 - PG0)) -v s="${SCPU:-0}" -v hz="$HZ" 'BEGIN {
    if (a > 0) printf "  pg cpu per commit     %.1f us; node+pg %.1f us\n", d * 1e6 / hz / a, d * 1e6 / hz / a + s }'
fi
kill $PID
wait $PID 2>/dev/null
if [ "$STORE" = pg ] && [ -z "${KEEP:-}" ]; then
  psql -q -h 127.0.0.1 -U root test -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null 2>&1
fi
rm -rf "$DIR"
