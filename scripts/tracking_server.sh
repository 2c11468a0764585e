#!/usr/bin/env bash
# A tracking server every node of a cluster can share: PostgreSQL (Debian's `postgresql`
# package) for runs and metrics, `mlflow server` in front of it, artifacts in a folder the
# server proxies (clients upload over HTTP, so nodes need no shared artifact path).
#
#   scripts/tracking_server.sh start     # initdb on first use, start both, print the URI
#   scripts/tracking_server.sh status    # running or not (exit 0 when both run)
#   scripts/tracking_server.sh stop      # stop both (the data stays for the next start)
#   scripts/tracking_server.sh check     # is PostgreSQL installed? (exit 1 if not)
#
# Settings (environment):
#   TRACKING_DIR   folder the script owns: pgdata/, artifacts/, logs, pids (.tracking_server)
#   PG_PORT        PostgreSQL's port (5433)         MLFLOW_PORT   the server's port (5000)
#   HOST           address both listen on (127.0.0.1; 0.0.0.0 to serve other machines)
#   MLFLOW_WORKERS server worker processes (2)      PG_BIN        PostgreSQL's bin folder
#   PG_OS_USER     the user PostgreSQL runs as when this script runs as root (postgres):
#                  initdb and postgres refuse to run as root
#
# The database user `mlflow` gets a random password, kept in $TRACKING_DIR/pgpass (mode 600).
# Exports for the runner: MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
set -euo pipefail

TRACKING_DIR=${TRACKING_DIR:-.tracking_server}
PG_PORT=${PG_PORT:-5433}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
HOST=${HOST:-127.0.0.1}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PG_OS_USER=${PG_OS_USER:-postgres}
DB=mlflow
DB_USER=mlflow

die() { echo "tracking_server: $*" >&2; exit 1; }

pg_bin() {
  if [[ -n ${PG_BIN:-} ]]; then echo "$PG_BIN"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -n $d ]]; then echo "$d"; return; fi
  d=$(command -v initdb 2>/dev/null || true)
  [[ -n $d ]] && dirname "$d"
}

mlflow_cmd() {
  local here
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [[ -x $here/.venv/bin/mlflow ]]; then echo "$here/.venv/bin/mlflow"
  elif command -v mlflow >/dev/null; then command -v mlflow
  else die "mlflow not found: make setup (or pip install mlflow)"; fi
}

# Runs a PostgreSQL program: as $PG_OS_USER when we are root, else as ourselves.
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    id "$PG_OS_USER" >/dev/null 2>&1 ||
      useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$PG_OS_USER"
    runuser -u "$PG_OS_USER" -- "$@"
  else
    "$@"
  fi
}

cmd_check() {
  local bin
  bin=$(pg_bin)
  [[ -n $bin && -x $bin/initdb && -x $bin/pg_ctl ]] ||
    die "PostgreSQL not found (initdb, pg_ctl): apt-get install postgresql, or set PG_BIN"
  echo "$bin"
}

pg_running() { [[ -d $PGDATA ]] && as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
mlflow_running() { [[ -f $DIR/mlflow.pid ]] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null; }
uri() { echo "http://$HOST:$MLFLOW_PORT"; }

wait_http() {  # waits for the server's /health, up to $1 seconds
  local deadline=$((SECONDS + $1))
  until python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$MLFLOW_PORT/health" 2>/dev/null; do
    mlflow_running || die "mlflow server exited; see $DIR/mlflow.log:
$(tail -n 20 "$DIR/mlflow.log")"
    ((SECONDS < deadline)) || die "mlflow server did not answer in $1 s; see $DIR/mlflow.log"
    sleep 0.5
  done
}

start_postgres() {
  if [[ ! -f $PGDATA/PG_VERSION ]]; then
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/pgpass"
    chmod 600 "$DIR/pgpass"
    if [[ $(id -u) -eq 0 ]]; then
      chown "$PG_OS_USER" "$PGDATA"
      install -m 600 -o "$PG_OS_USER" "$DIR/pgpass" "$DIR/.pwfile"
    else
      install -m 600 "$DIR/pgpass" "$DIR/.pwfile"
    fi
    as_pg test -w "$PGDATA" ||
      die "$PG_OS_USER cannot write $PGDATA: put TRACKING_DIR where that user can reach it"
    as_pg "$BIN/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$DIR/.pwfile" \
      --auth-host=scram-sha-256 --auth-local=peer -E UTF8 >"$DIR/initdb.log" 2>&1 ||
      die "initdb failed; see $DIR/initdb.log"
    rm -f "$DIR/.pwfile"
    if [[ $HOST != 127.0.0.1 ]]; then  # other machines: password over TCP, from anywhere
      echo "host all all 0.0.0.0/0 scram-sha-256" | as_pg tee -a "$PGDATA/pg_hba.conf" >/dev/null
    fi
  fi
  if ! pg_running; then
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w -t 60 \
      -o "-c listen_addresses=$HOST -p $PG_PORT -k $PGDATA" start >/dev/null ||
      die "PostgreSQL did not start; see $PGDATA/postgres.log"
  fi
  local pw
  pw=$(cat "$DIR/pgpass")
  if ! PGPASSWORD=$pw "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
    "select 1 from pg_database where datname='$DB'" | grep -q 1; then
    PGPASSWORD=$pw "$BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB"
  fi
}

start_mlflow() {
  mlflow_running && return
  local pw
  pw=$(cat "$DIR/pgpass")
  mkdir -p "$DIR/artifacts"
  # Its own session, so `stop` ends the server and its workers together; the database URI
  # (with its password) goes by environment, not on the command line that `ps` shows.
  MLFLOW_BACKEND_STORE_URI="postgresql://$DB_USER:$pw@127.0.0.1:$PG_PORT/$DB" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_TRACKING_URI='' setsid "$(mlflow_cmd)" server \
    --artifacts-destination "$DIR/artifacts" \
    --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
    >>"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
  wait_http 120
}

cmd_start() {
  BIN=$(cmd_check)
  start_postgres
  start_mlflow
  echo "MLFLOW_TRACKING_URI=$(uri)"
}

cmd_stop() {
  BIN=$(pg_bin)
  if mlflow_running; then
    local pid
    pid=$(cat "$DIR/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/mlflow.pid"
  if [[ -n $BIN ]] && pg_running; then
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  echo "stopped"
}

cmd_status() {
  BIN=$(pg_bin)
  local ok=0
  if [[ -n $BIN ]] && pg_running; then echo "postgres: running on $HOST:$PG_PORT"
  else echo "postgres: stopped"; ok=3; fi
  if mlflow_running; then echo "mlflow: running at $(uri)"
  else echo "mlflow: stopped"; ok=3; fi
  return $ok
}

[[ ${1:-} == start ]] && mkdir -p "$TRACKING_DIR"
DIR=$(cd "$TRACKING_DIR" 2>/dev/null && pwd || echo "$TRACKING_DIR")
PGDATA=$DIR/pgdata
case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  check) cmd_check >/dev/null && echo "PostgreSQL: $(pg_bin)" ;;
  *) echo "usage: $0 start|stop|status|check" >&2; exit 2 ;;
esac
