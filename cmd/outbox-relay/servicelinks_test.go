package main

import (
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestRunWithKubernetesServiceLinks checks that `run` in a pod where a
// Service named outbox-relay exists starts (here up to the missing table,
// exit 1) and logs the ignored variables once at info, while a mistyped
// variable beside them still exits 2 naming it.
func TestRunWithKubernetesServiceLinks(t *testing.T) {
	t.Parallel()
	env := []string{
		"OUTBOX_RELAY_POSTGRES_DSN=" + testenv.DatabaseURL(),
		"OUTBOX_RELAY_POSTGRES_SCHEMA=" + testenv.Name("t"), // no table: run stops there
		"OUTBOX_RELAY_AMQP_URL=" + testenv.AMQPURL(),
		"OUTBOX_RELAY_AMQP_EXCHANGE=" + testenv.Name("x"),
		"OUTBOX_RELAY_METRICS_ADDR=off",
		"OUTBOX_RELAY_SERVICE_HOST=10.96.12.34",
		"OUTBOX_RELAY_SERVICE_PORT=9464",
		"OUTBOX_RELAY_PORT=tcp://10.96.12.34:9464",
		"OUTBOX_RELAY_PORT_9464_TCP=tcp://10.96.12.34:9464",
		"OUTBOX_RELAY_PORT_9464_TCP_PROTO=tcp",
		"OUTBOX_RELAY_PORT_9464_TCP_PORT=9464",
		"OUTBOX_RELAY_PORT_9464_TCP_ADDR=10.96.12.34",
	}
	code, _, stderr := runCLI(t, env, "run")
	if code != 1 || !strings.Contains(stderr, "outbox table does not exist") {
		t.Fatalf("run: exit %d, want 1 at the missing table; stderr:\n%s", code, stderr)
	}
	if n := strings.Count(stderr, "ignoring Kubernetes service-link variables"); n != 1 || !strings.Contains(stderr, "OUTBOX_RELAY_PORT_9464_TCP_ADDR") {
		t.Errorf("want one info line naming the ignored variables, got %d:\n%s", n, stderr)
	}

	code, _, stderr = runCLI(t, append(env, "OUTBOX_RELAY_BATCH_SIZE=100"), "run")
	if code != 2 || !strings.Contains(stderr, "OUTBOX_RELAY_BATCH_SIZE: unknown environment variable") {
		t.Errorf("a mistyped variable: exit %d, want 2 naming it; stderr:\n%s", code, stderr)
	}
}
