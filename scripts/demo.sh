#!/usr/bin/env bash
# demo.sh runs the EduPulse Live example end to end: it migrates the outbox
# table, starts the search indexer (consumer), the relay and the producer, lets
# events flow for DEMO_SECONDS, shows the relay's metrics, stops everything and
# compares what was written with what arrived.
#
# Needs PostgreSQL and RabbitMQ (scripts/services.sh up), go and curl; psql
# for the table counts in the summary. Settings:
#   DEMO_SECONDS  how long the producer runs (default 20)
#   DEMO_RATE     events per second (default 5)
#   OUTBOX_RELAY_POSTGRES_DSN, _POSTGRES_SCHEMA, _POSTGRES_TABLE, _AMQP_URL,
#   _AMQP_EXCHANGE and _METRICS_ADDR override examples/edupulse/relay.yaml
#   for every part of the demo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${DEMO_SECONDS:-20}
rate=${DEMO_RATE:-5}
config=examples/edupulse/relay.yaml
dsn=${OUTBOX_RELAY_POSTGRES_DSN:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}
exchange=${OUTBOX_RELAY_AMQP_EXCHANGE:-edupulse.events}
metrics=http://${OUTBOX_RELAY_METRICS_ADDR:-127.0.0.1:9464}
outbox_schema=${OUTBOX_RELAY_POSTGRES_SCHEMA:-public}
outbox_table=${OUTBOX_RELAY_POSTGRES_TABLE:-outbox}

say() { printf '\n==> %s\n' "$*"; }
die() {
	echo "demo: $*" >&2
	exit 1
}

command -v go >/dev/null || die "go is not on PATH"
command -v curl >/dev/null || die "curl is not on PATH"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/edupulse-demo.XXXXXX")
pids=()
sleeper=
interrupted=0

# stop NAME PID asks PID to shut down and kills it if it takes over 15s.
stop() {
	local name=$1 pid=$2 deadline=$((SECONDS + 15))
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do
		if ((SECONDS >= deadline)); then
			echo "demo: $name did not stop within 15s; killing it" >&2
			kill -KILL "$pid" 2>/dev/null || true
			break
		fi
		sleep 0.1
	done
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local pid deadline=$((SECONDS + 5))
	[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null || true
	rm -rf "${tmp:?}/bin" # the logs stay for reading
	if ((interrupted)); then
		# Ctrl-C reached the children too: let them shut down on that one
		# signal, since a second one makes the relay exit without draining.
		for pid in "${pids[@]}"; do
			while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
		done
	fi
	for pid in "${pids[@]}"; do
		stop "process $pid" "$pid"
	done
	if ((interrupted)); then
		echo "demo: interrupted; logs are in $tmp" >&2
	fi
}
trap cleanup EXIT
trap 'interrupted=1; exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... runs CMD in the background, its output shown with a
# [NAME] prefix and kept in $tmp/NAME.log. The display ignores SIGINT so that
# Ctrl-C cannot break the pipe under a process that is still shutting down.
start() {
	local name=$1
	shift
	"$@" > >(
		trap '' INT
		exec awk -v file="$tmp/$name.log" -v prefix="[$name] " \
			'{ print > file; fflush(file); print prefix $0; fflush() }'
	) 2>&1 &
	pids+=($!)
}

# wait_for WHAT SECONDS PID CMD... polls CMD until it succeeds; it fails if
# PID exits or the time runs out first.
wait_for() {
	local what=$1 deadline=$((SECONDS + $2)) pid=$3
	shift 3
	until "$@" >/dev/null 2>&1; do
		if ! kill -0 "$pid" 2>/dev/null; then
			echo "demo: $what: the process exited; see the logs in $tmp" >&2
			return 1
		elif ((SECONDS >= deadline)); then
			echo "demo: timed out waiting for $what; see the logs in $tmp" >&2
			return 1
		fi
		sleep 0.2
	done
}

# last_line FILE PATTERN prints the last line of FILE matching PATTERN.
last_line() { grep -E "$2" "$1" 2>/dev/null | tail -n 1; }

say "Building (binaries in $tmp/bin)"
if [[ ! -x bin/outbox-relay ]]; then
	go build -o bin/outbox-relay ./cmd/outbox-relay
fi
go build -o "$tmp/bin/" ./examples/edupulse/producer ./examples/edupulse/consumer

say "Migrating the outbox table: bin/outbox-relay migrate up --config $config"
bin/outbox-relay migrate up --config "$config"

say "Starting the search indexer (consumer of $exchange)"
start consumer "$tmp/bin/consumer" -exchange "$exchange"
consumer_pid=${pids[-1]}
wait_for "the consumer's queue" 20 "$consumer_pid" grep -q '^ready:' "$tmp/consumer.log" || exit 1

say "Starting the relay (log: $tmp/relay.log)"
bin/outbox-relay run --config "$config" >"$tmp/relay.log" 2>&1 &
relay_pid=$!
pids+=("$relay_pid")
wait_for "the relay to be ready ($metrics/readyz)" 30 "$relay_pid" curl -fsS "$metrics/readyz" || exit 1
echo "relay is ready; while the demo runs, look at:"
echo "  curl -s $metrics/metrics | grep outbox_relay_events_published_total"
echo "  curl -s $metrics/readyz"

start_time=
if command -v psql >/dev/null; then
	start_time=$(psql "$dsn" -XAtqc 'SELECT now()') || start_time=
fi

say "Producing about $rate events/s for ${seconds}s"
start producer "$tmp/bin/producer" -rate "$rate" -outbox-schema "$outbox_schema" -outbox-table "$outbox_table"
producer_pid=${pids[-1]}
# In the background, so that a signal's trap runs at once, not after it.
sleep "$seconds" &
sleeper=$!
wait "$sleeper"
stop producer "$producer_pid"
wait_for "the producer's summary" 5 $$ grep -q 'wrote [0-9]* events' "$tmp/producer.log" || exit 1
written=$(last_line "$tmp/producer.log" 'wrote [0-9]+ events' | grep -oE 'wrote [0-9]+' | grep -oE '[0-9]+')

say "Waiting for the consumer to index all $written events"
indexed() { (($(grep -c ' seq=' "$tmp/consumer.log" || true) >= written)); }
wait_for "the consumer to catch up" 30 "$consumer_pid" indexed || true

say "Relay metrics: curl -s $metrics/metrics | grep outbox_relay_events_published_total"
curl -fsS "$metrics/metrics" | grep outbox_relay_events_published_total || echo "(no such metric)"
say "Relay readiness: curl -s $metrics/readyz"
curl -sS "$metrics/readyz" || true

say "Stopping"
stop relay "$relay_pid"
stop consumer "$consumer_pid"
pids=()
wait_for "the consumer's summary" 5 $$ grep -q '^received ' "$tmp/consumer.log" || true

say "Summary"
echo "producer: $(last_line "$tmp/producer.log" 'wrote [0-9]+ events' | grep -oE 'wrote .*')"
echo "consumer: $(last_line "$tmp/consumer.log" '^received ')"
if [[ -n $start_time ]]; then
	psql "$dsn" -XAtq -F ' ' -c "
		SELECT count(*) FILTER (WHERE dispatched_at IS NOT NULL),
		       count(*) FILTER (WHERE dispatched_at IS NULL AND dead_at IS NULL),
		       count(*) FILTER (WHERE dead_at IS NOT NULL)
		FROM (SELECT created_at, event_type, dispatched_at, dead_at FROM $outbox_schema.$outbox_table
		      UNION ALL
		      SELECT created_at, event_type, dispatched_at, dead_at FROM $outbox_schema.${outbox_table}_dispatched) o
		WHERE created_at >= '$start_time'
		  AND event_type IN ('lesson.published', 'quiz.submitted', 'badge.awarded')" |
		{
			read -r dispatched pending dead
			echo "outbox:   this run's rows in $outbox_schema.$outbox_table and its archive: $dispatched dispatched, $pending pending, $dead dead"
		}
else
	echo "outbox:   psql not found; skipped counting the table's dispatched rows"
fi
echo "logs:     $tmp/{consumer,producer,relay}.log"
indexed=$(grep -c ' seq=' "$tmp/consumer.log" || true)
if ((indexed >= written)); then
	echo "result:   every event written reached the consumer"
	if ((indexed > written)); then
		echo "          (and $((indexed - written)) older ones left pending in the table, e.g. written while no relay ran)"
	fi
else
	echo "result:   some events did not reach the consumer; see $tmp/relay.log" >&2
	exit 1
fi
