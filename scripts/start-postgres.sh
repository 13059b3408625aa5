#!/usr/bin/env bash
# Starts a throw-away PostgreSQL for the test suites: Debian's server binaries, run as the
# `postgres` user (PostgreSQL refuses to run as root), in a fresh data directory, listening
# on 127.0.0.1 and a Unix socket only, with trust authentication for local connections.
#
#   scripts/start-postgres.sh [PORT]        # prints the URL the tests read from OPTOUT_TEST_PG
#   scripts/start-postgres.sh PORT --tls    # TLS on, for OPTOUT_TEST_PG_TLS (see below)
#
# Installs the `postgresql` package first when its binaries are missing (CI runs as root on
# Debian). The server keeps running after the script exits; its data directory is under
# the system's temporary directory.
set -euo pipefail
port="${1:-55432}"
with_tls="${2:-}"

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2
    bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
fi

as_postgres() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

data="$(mktemp -d -t optout-pg.XXXXXX)"
chmod 755 "$data"
[[ "$(id -u)" == 0 ]] && chown postgres: "$data"
as_postgres "$bindir/initdb" -D "$data/db" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >&2

# With --tls: TLS with a throw-away CA, so that a test can check a connection that verifies
# the server's certificate (`tls_ca_file`): the CA's certificate is `ca.crt` beside the
# server's (`SHOW ssl_cert_file` tells where). A server of its own, because with TLS on a
# client's default (`sslmode=prefer`) verifies the certificate and the other tests would
# need the CA too.
ssl_opts=""
if [[ "$with_tls" == --tls ]]; then
tls="$data/tls"
mkdir -p "$tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 3 -subj "/CN=optout-sync test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tls/ext"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 3 -extfile "$tls/ext" -out "$tls/server.crt" 2>/dev/null
chmod 600 "$tls/server.key"
[[ "$(id -u)" == 0 ]] && chown -R postgres: "$tls"
ssl_opts="-c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key"
fi

as_postgres "$bindir/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=400 -c shared_buffers=256MB -c fsync=on $ssl_opts" >&2
echo "postgresql://postgres@127.0.0.1:$port/postgres"
