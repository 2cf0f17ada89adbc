package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMain runs the command itself when TEST_OUTBOX_RELAY_MAIN=1, so tests
// can start the test binary as a real outbox-relay process (to signal it).
// The variable is outside OUTBOX_RELAY_*, which the command checks.
func TestMain(m *testing.M) {
	if os.Getenv("TEST_OUTBOX_RELAY_MAIN") == "1" {
		main()
	}
	os.Exit(m.Run())
}

// runCLI runs the command in-process with the given environment.
func runCLI(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, env, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const validYAML = `
postgres:
  dsn: postgres://postgres@127.0.0.1:5432/test
amqp:
  url: amqp://guest:secret@127.0.0.1:5672/
  exchange: events
metrics:
  addr: "off"
`

// TestBadConfigExits2 checks that each bad configuration exits with status 2
// and a message naming the key at fault, before connecting to anything.
func TestBadConfigExits2(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, yaml string
		env        []string
		wantKey    string
	}{
		{"missing dsn", strings.Replace(validYAML, "dsn: postgres://postgres@127.0.0.1:5432/test", "", 1), nil, "postgres.dsn"},
		{"blank dsn in the file", strings.Replace(validYAML, "dsn: postgres://postgres@127.0.0.1:5432/test", `dsn: "  "`, 1), nil, "postgres.dsn: required"},
		{"blank exchange in the file", strings.Replace(validYAML, "exchange: events", `exchange: " "`, 1), nil, "amqp.exchange: required"},
		{"unknown key", validYAML + "relay:\n  batchsize: 10\n", nil, "batchsize"},
		{"unknown top-level key", validYAML + "nonsense: 1\n", nil, "nonsense"},
		{"negative batch size", validYAML + "relay:\n  batch_size: -5\n", nil, "relay.batch_size"},
		{"negative confirm window", validYAML, []string{"OUTBOX_RELAY_AMQP_MAX_UNCONFIRMED=-1"}, "amqp.max_unconfirmed: must be at least 1"},
		{"invalid table identifier", validYAML, []string{"OUTBOX_RELAY_POSTGRES_TABLE=outbox; DROP TABLE x"}, "postgres.table"},
		{"invalid schema identifier", validYAML, []string{"OUTBOX_RELAY_POSTGRES_SCHEMA=Public"}, "postgres.schema"},
		{"bad duration from env", validYAML, []string{"OUTBOX_RELAY_WAKE_POLL_INTERVAL=soon"}, "wake.poll_interval"},
		{"unknown env var", validYAML, []string{"OUTBOX_RELAY_POSTGRES_DNS=x"}, "OUTBOX_RELAY_POSTGRES_DNS"},
		{"bad wake mode", validYAML + "wake:\n  mode: listen\n", nil, "wake.mode"},
		{"bad amqp url", validYAML, []string{"OUTBOX_RELAY_AMQP_URL=http://x"}, "amqp.url"},
		{"bad log level", validYAML + "log:\n  level: loud\n", nil, "log.level"},
		{"metrics addr not an address", validYAML, []string{"OUTBOX_RELAY_METRICS_ADDR=not an address"}, `metrics.addr: must be host:port or :port`},
		{"metrics port out of range", validYAML, []string{"OUTBOX_RELAY_METRICS_ADDR=127.0.0.1:65536"}, `metrics.addr: must be host:port or :port (e.g. ":9464" or "127.0.0.1:9464", port 0 to 65535) or "off"`},
		{"explicit zero batch size", validYAML + "relay:\n  batch_size: 0\n", nil, "relay.batch_size: 0 is not allowed"},
		{"explicit zero duration from env", validYAML, []string{"OUTBOX_RELAY_RETENTION_DISPATCHED=0s"}, "retention.dispatched: 0 is not allowed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			code, _, stderr := runCLI(t, tc.env, "run", "--config", writeFile(t, tc.yaml))
			if code != exitUsage {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, exitUsage, stderr)
			}
			if !strings.Contains(stderr, tc.wantKey) {
				t.Fatalf("stderr does not name %q:\n%s", tc.wantKey, stderr)
			}
		})
	}
}

func TestUsageErrorsExit2(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"run", "--no-such-flag"},
		{"run", "extra-arg"},
		{"migrate"},
		{"migrate", "sideways"},
		{"notify", "maybe"},
	} {
		code, _, stderr := runCLI(t, nil, args...)
		if code != exitUsage {
			t.Errorf("%q: exit %d, want 2; stderr: %s", args, code, stderr)
		}
	}
}

func TestConfigErrorHidesPassword(t *testing.T) {
	t.Parallel()
	code, _, stderr := runCLI(t, []string{"OUTBOX_RELAY_AMQP_URL=http://guest:hunter2@x/"}, "run", "--config", writeFile(t, validYAML))
	if code != exitUsage {
		t.Fatalf("exit %d", code)
	}
	if strings.Contains(stderr, "hunter2") {
		t.Fatalf("password printed: %s", stderr)
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	code, out, _ := runCLI(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "outbox-relay ") {
		t.Fatalf("exit %d, output %q", code, out)
	}
}
