# Sourced by .ci/run: a throwaway PostgreSQL cluster on 127.0.0.1 for the APDB tests.
# Installs Debian's server when missing, runs initdb/pg_ctl as the `postgres` user (the server
# refuses root), exports DIALAB_TEST_POSTGRES_URL, and stops the cluster when the shell exits.
# TCP connections need a password (scram-sha-256), as on a real server: the URL carries a random one,
# so the tests can check that no file or log of a run ever holds it.

pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$found" ] && command -v apt-get >/dev/null; then
    echo "installing PostgreSQL from Debian's packages" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  echo "$found"
}

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

start_test_postgres() {
  local bin port dir
  bin=$(pg_bin)
  if [ -z "$bin" ]; then
    echo "no PostgreSQL server could be installed; the PostgreSQL tests will fail" >&2
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  dir=$(mktemp -d /tmp/dialab-pg.XXXXXX)
  chmod 755 "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
  password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  echo "$password" > "$dir/pw"
  [ "$(id -u)" -eq 0 ] && chown postgres "$dir/pw"
  as_postgres "'$bin/initdb' -D '$dir/data' -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile='$dir/pw' --no-sync" >/dev/null
  rm -f "$dir/pw"
  as_postgres "'$bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w -o \"-h 127.0.0.1 -p $port -k '$dir' -F\" start" >/dev/null
  as_postgres "'$bin/createdb' -h '$dir' -p $port -U postgres dialab_test"
  export DIALAB_TEST_POSTGRES_URL="postgresql://postgres:$password@127.0.0.1:$port/dialab_test"
  export DIALAB_PG_DIR="$dir" DIALAB_PG_BIN="$bin"
  trap stop_test_postgres EXIT
  echo "PostgreSQL test server on 127.0.0.1:$port" >&2
}

stop_test_postgres() {
  if [ -n "${DIALAB_PG_DIR:-}" ]; then
    as_postgres "'$DIALAB_PG_BIN/pg_ctl' -D '$DIALAB_PG_DIR/data' -m fast stop" >/dev/null 2>&1 || true
    rm -rf "$DIALAB_PG_DIR"
  fi
}
