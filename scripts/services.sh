#!/usr/bin/env bash
# Makes sure the services the tests and the demo need are running:
#   PostgreSQL on ${PGHOST:-127.0.0.1}:${PGPORT:-5432}, user postgres, trust auth,
#              database test (postgres://postgres@127.0.0.1:5432/test?sslmode=disable)
#   RabbitMQ   on 127.0.0.1:${AMQP_PORT:-5672}, guest/guest
#
#   scripts/services.sh up      reach, else start, else (root on Debian/Ubuntu)
#                               install and start; prints one line per service
#   scripts/services.sh status  one line per service; exit 1 if one is down
#
# It never stops or restarts a running server. Progress and errors go to
# stderr, the one-line results to stdout.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
AMQP_HOST=127.0.0.1
AMQP_PORT=${AMQP_PORT:-5672}
WAIT_SECONDS=${WAIT_SECONDS:-60}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPOSE_FILE="$REPO_ROOT/docker-compose.yml"
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '%s\n' "$*" >&2; }
die() { say "services.sh: $*"; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
is_debian() { [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }

tcp_open() { # host port
	# shellcheck disable=SC2016 # expanded by the inner bash
	timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

wait_until() { # description command...: polls for up to WAIT_SECONDS
	local what=$1 deadline=$((SECONDS + WAIT_SECONDS))
	shift
	until "$@"; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			say "services.sh: timed out after ${WAIT_SECONDS}s waiting for $what"
			return 1
		fi
		sleep 0.5
	done
}

# apt_install [apt options] packages...: installs as root on Debian/Ubuntu;
# refreshes the package index once if the first attempt fails. apt's output
# is shown only on failure.
apt_install() {
	local log arg pkgs=()
	for arg in "$@"; do [[ $arg == -* ]] || pkgs+=("$arg"); done
	say "services.sh: installing ${pkgs[*]} (apt-get)"
	log=$(mktemp)
	export DEBIAN_FRONTEND=noninteractive
	if apt-get install -y -q "$@" >"$log" 2>&1 ||
		{ apt-get update -q >>"$log" 2>&1 && apt-get install -y -q "$@" >>"$log" 2>&1; }; then
		rm -f "$log"
		return 0
	fi
	tail -n 20 "$log" >&2
	rm -f "$log"
	return 1
}

instructions() { # service
	local svc=$1
	say ""
	say "services.sh: $svc is not reachable and could not be started from here."
	say "Do one of:"
	if [ "$svc" = PostgreSQL ]; then
		say "  - as root on Debian/Ubuntu: apt-get install -y postgresql && pg_ctlcluster \$(ls /etc/postgresql) main start"
		say "    (then allow trust for user postgres on 127.0.0.1 in pg_hba.conf)"
	else
		say "  - as root on Debian/Ubuntu: apt-get install -y rabbitmq-server && rabbitmq-server -detached"
	fi
	say "  - with Docker: docker compose -f $COMPOSE_FILE up -d --wait"
	say "then run: scripts/services.sh up"
}

# ---------------------------------------------------------------- PostgreSQL

pg_local() { case "$PGHOST" in 127.0.0.1 | localhost | ::1 | /*) return 0 ;; *) return 1 ;; esac; }

pg_reachable() {
	if command -v pg_isready >/dev/null; then
		pg_isready -q -h "$PGHOST" -p "$PGPORT" -t 2
	else
		tcp_open "$PGHOST" "$PGPORT"
	fi
}

pg_installed() {
	compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v pg_ctl >/dev/null
}

# pg_start starts every Debian cluster that is down, or $PGDATA with pg_ctl.
pg_start() {
	local conf ver name started=1
	if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
		for conf in /etc/postgresql/*/*/postgresql.conf; do
			[ -e "$conf" ] || continue
			ver=$(basename "$(dirname "$(dirname "$conf")")")
			name=$(basename "$(dirname "$conf")")
			if pg_ctlcluster "$ver" "$name" status >/dev/null 2>&1; then
				started=0
				continue
			fi
			say "services.sh: starting PostgreSQL cluster $ver/$name"
			if pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start; then
				started=0
			else
				say "services.sh: pg_ctlcluster $ver $name start failed"
			fi
		done
	elif command -v pg_ctl >/dev/null && [ -n "${PGDATA:-}" ]; then
		say "services.sh: starting PostgreSQL in $PGDATA"
		if is_root; then
			runuser -u postgres -- pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" -w start && started=0
		else
			pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" -w start && started=0
		fi
	fi
	return "$started"
}

# pg_trust_loopback lets user postgres in over 127.0.0.1 and ::1 without a
# password. Used only on clusters this script has just installed.
pg_trust_loopback() {
	local hba conf
	for hba in /etc/postgresql/*/*/pg_hba.conf; do
		[ -e "$hba" ] || continue
		grep -q '^host all postgres 127.0.0.1/32 trust' "$hba" && continue
		conf=$(dirname "$hba")
		{
			printf '# added by outbox-relay scripts/services.sh for the test suite\n'
			printf 'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n'
			cat "$hba"
		} >"$hba.new" && chown --reference="$hba" "$hba.new" && chmod --reference="$hba" "$hba.new" &&
			mv "$hba.new" "$hba"
		pg_ctlcluster "$(basename "$(dirname "$conf")")" "$(basename "$conf")" reload || true
	done
}

psql_q() { # sql: as user postgres over the configured host, never prompting
	psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -w -X -A -t -q -c "$1"
}

# pg_database checks the trust login and makes sure database test exists.
pg_database() {
	local out
	if ! command -v psql >/dev/null; then
		echo "postgres: ready at $PGHOST:$PGPORT (psql not installed: database test not checked)"
		return 0
	fi
	if ! out=$(psql_q "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>&1); then
		say "services.sh: PostgreSQL on $PGHOST:$PGPORT is up but user postgres cannot log in without a password:"
		say "  $out"
		say "  The tests use postgres://postgres@$PGHOST:$PGPORT/test?sslmode=disable (TEST_DATABASE_URL overrides it)."
		say "  Allow it with a line 'host all postgres 127.0.0.1/32 trust' at the top of pg_hba.conf"
		say "  (Debian: /etc/postgresql/*/main/pg_hba.conf) and reload: pg_ctlcluster <version> main reload"
		return 1
	fi
	if [ "$out" != 1 ]; then
		# A concurrent run may have created it: check again before failing.
		if ! psql_q "CREATE DATABASE test" >/dev/null 2>&1 &&
			[ "$(psql_q "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
			die "could not create database test on $PGHOST:$PGPORT"
		fi
		say "services.sh: created database test"
	fi
	echo "postgres: ready at $PGHOST:$PGPORT (user postgres, database test)"
}

postgres_up() {
	local installed_now=0
	if ! pg_reachable; then
		if ! pg_local; then
			say "services.sh: PGHOST=$PGHOST is not local; not starting anything"
			instructions PostgreSQL
			return 1
		fi
		if ! pg_installed; then
			if is_root && is_debian; then
				apt_install postgresql || die "apt-get install postgresql failed"
				installed_now=1
			else
				instructions PostgreSQL
				return 1
			fi
		fi
		pg_start || true
		if ! wait_until "PostgreSQL on $PGHOST:$PGPORT" pg_reachable; then
			say "services.sh: see the server log (Debian: /var/log/postgresql/)"
			instructions PostgreSQL
			return 1
		fi
		if [ "$installed_now" = 1 ]; then pg_trust_loopback; fi
	fi
	pg_database
}

# ------------------------------------------------------------------ RabbitMQ

rabbit_reachable() { tcp_open "$AMQP_HOST" "$AMQP_PORT"; }

rabbit_installed() { command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null; }

rabbitmq_up() {
	if ! rabbit_reachable; then
		if ! rabbit_installed; then
			if is_root && is_debian; then
				apt_install rabbitmq-server || die "apt-get install rabbitmq-server failed"
			else
				instructions RabbitMQ
				return 1
			fi
		fi
		# A second rabbitmq-server for a node that is still booting would
		# crash and delete the node's pid file: start only if none answers.
		if rabbitmqctl -q ping >/dev/null 2>&1; then
			say "services.sh: a RabbitMQ node is running; waiting for it to listen on $AMQP_HOST:$AMQP_PORT"
		else
			say "services.sh: starting RabbitMQ"
			rabbitmq-server -detached || say "services.sh: rabbitmq-server -detached failed"
		fi
		if ! wait_until "RabbitMQ on $AMQP_HOST:$AMQP_PORT" rabbit_reachable; then
			say "services.sh: see the server log (Debian: /var/log/rabbitmq/)"
			instructions RabbitMQ
			return 1
		fi
	fi
	echo "rabbitmq: ready at $AMQP_HOST:$AMQP_PORT (guest/guest)"
}

# ----------------------------------------------------- test-only programs

# ensure_tool CMD PACKAGE: tests run CMD themselves (promtool checks the
# alerting rules; the PgBouncer tests start private pgbouncer processes), so
# only the program is needed: install PACKAGE without recommends (no daemons
# such as a node exporter on the test machine) when CMD is missing.
ensure_tool() {
	local cmd=$1 pkg=$2
	if command -v "$cmd" >/dev/null; then
		echo "$pkg: $(command -v "$cmd") present"
	elif is_root && is_debian; then
		apt_install --no-install-recommends "$pkg" || die "apt-get install $pkg failed"
		echo "$pkg: installed $(command -v "$cmd")"
	else
		echo "$pkg: $cmd missing (install the $pkg package as root); tests that need it will fail"
	fi
}

# -------------------------------------------------------------------- main

cmd_up() {
	local rc=0
	postgres_up || rc=1
	rabbitmq_up || rc=1
	ensure_tool promtool prometheus || rc=1
	ensure_tool pgbouncer pgbouncer || rc=1
	return "$rc"
}

cmd_status() {
	local rc=0
	if pg_reachable; then echo "postgres: up at $PGHOST:$PGPORT"; else echo "postgres: down ($PGHOST:$PGPORT unreachable)"; rc=1; fi
	if rabbit_reachable; then echo "rabbitmq: up at $AMQP_HOST:$AMQP_PORT"; else echo "rabbitmq: down ($AMQP_HOST:$AMQP_PORT unreachable)"; rc=1; fi
	if command -v promtool >/dev/null; then echo "prometheus: promtool present"; else echo "prometheus: promtool missing"; fi
	if command -v pgbouncer >/dev/null; then echo "pgbouncer: present"; else echo "pgbouncer: missing"; fi
	return "$rc"
}

case "${1:-}" in
up) cmd_up ;;
status) cmd_status ;;
*)
	say "usage: $0 up|status"
	exit 2
	;;
esac
