package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeTemp(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestBlankEnvIsEmpty checks that a variable holding only spaces empties a
// string key (a required one is then reported missing, by its key) and
// leaves any other key at its default instead of failing to parse.
func TestBlankEnvIsEmpty(t *testing.T) {
	t.Parallel()
	_, err := loadRequired(t, "", "OUTBOX_RELAY_POSTGRES_DSN= ", "OUTBOX_RELAY_AMQP_URL=\t")
	for _, key := range []string{"postgres.dsn: required", "amqp.url: required"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("blank variable: error %v does not say %q", err, key)
		}
	}
	f, err := loadRequired(t, "", "OUTBOX_RELAY_RELAY_BATCH_SIZE= ", "OUTBOX_RELAY_RELAY_STATS_INTERVAL=")
	if err != nil {
		t.Fatalf("blank number and duration: %v", err)
	}
	if f.Relay.BatchSize != 500 || f.Relay.StatsInterval != 5*time.Second {
		t.Errorf("blank number and duration: got %d and %s, want the defaults", f.Relay.BatchSize, f.Relay.StatsInterval)
	}
}

// TestConfigEnvNamesFile checks that OUTBOX_RELAY_CONFIG names the file
// when no path is given, and that a given path wins over it.
func TestConfigEnvNamesFile(t *testing.T) {
	t.Parallel()
	fromEnv := writeTemp(t, "env.yaml", "relay:\n  batch_size: 7\n")
	fromFlag := writeTemp(t, "flag.yaml", "relay:\n  batch_size: 9\n")
	env := []string{ConfigEnv + "=" + fromEnv}
	f, err := Load("", env)
	if err != nil || f.Relay.BatchSize != 7 {
		t.Fatalf("OUTBOX_RELAY_CONFIG: batch_size %d, err %v; want 7", f.Relay.BatchSize, err)
	}
	f, err = Load(fromFlag, env)
	if err != nil || f.Relay.BatchSize != 9 {
		t.Fatalf("path and OUTBOX_RELAY_CONFIG: batch_size %d, err %v; want the path's 9", f.Relay.BatchSize, err)
	}
	if _, err := Load("", []string{ConfigEnv + "=/nonexistent/relay.yaml"}); err == nil || !strings.Contains(err.Error(), "/nonexistent/relay.yaml") {
		t.Fatalf("missing file named by OUTBOX_RELAY_CONFIG: error %v does not name it", err)
	}
}

// TestSecretFiles checks that the _FILE variables read the two secrets from
// files without their trailing newline, and that an unreadable file or both
// forms at once are errors naming the key.
func TestSecretFiles(t *testing.T) {
	t.Parallel()
	dsn := writeTemp(t, "dsn", "postgres://relay:s3cret@db:5432/app\n")
	url := writeTemp(t, "url", "amqp://relay:s3cret@mq:5672/\r\n")
	f, err := Load("", []string{"OUTBOX_RELAY_POSTGRES_DSN_FILE=" + dsn, "OUTBOX_RELAY_AMQP_URL_FILE=" + url, "OUTBOX_RELAY_AMQP_EXCHANGE=e"})
	if err != nil {
		t.Fatal(err)
	}
	if f.Postgres.DSN != "postgres://relay:s3cret@db:5432/app" || f.AMQP.URL != "amqp://relay:s3cret@mq:5672/" {
		t.Fatalf("secrets read as %q and %q", f.Postgres.DSN, f.AMQP.URL)
	}
	if err := f.Validate(); err != nil {
		t.Fatalf("secrets from files do not validate: %v", err)
	}

	for name, env := range map[string][]string{
		"missing file": {"OUTBOX_RELAY_POSTGRES_DSN_FILE=/nonexistent/dsn"},
		"both forms":   {"OUTBOX_RELAY_POSTGRES_DSN_FILE=" + dsn, "OUTBOX_RELAY_POSTGRES_DSN=postgres://x@y/z"},
	} {
		_, err := Load("", env)
		if err == nil || !strings.Contains(err.Error(), "postgres.dsn") || !strings.Contains(err.Error(), "OUTBOX_RELAY_POSTGRES_DSN") {
			t.Errorf("%s: error %v does not name postgres.dsn and its variable", name, err)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: error shows the secret: %v", name, err)
		}
	}
	if _, err := Load("", []string{"OUTBOX_RELAY_RELAY_BATCH_SIZE_FILE=" + dsn}); err == nil {
		t.Errorf("a _FILE variable for a key that is not a secret was accepted")
	}
}

// TestAppNamesTellRelaysApart checks that amqp.app_id and
// amqp.connection_name default to a name with the host and the table, and
// that set values are kept.
func TestAppNamesTellRelaysApart(t *testing.T) {
	t.Parallel()
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	f, err := Load("", []string{"OUTBOX_RELAY_POSTGRES_SCHEMA=billing", "OUTBOX_RELAY_POSTGRES_TABLE=events"})
	if err != nil {
		t.Fatal(err)
	}
	want := "outbox-relay/" + host + "/billing.events"
	if f.AMQP.AppID != want || f.AMQP.ConnectionName != want {
		t.Errorf("defaults: app_id %q, connection_name %q; want %q", f.AMQP.AppID, f.AMQP.ConnectionName, want)
	}
	f, err = Load("", []string{"OUTBOX_RELAY_AMQP_APP_ID=orders", "OUTBOX_RELAY_AMQP_CONNECTION_NAME=orders-relay-1"})
	if err != nil {
		t.Fatal(err)
	}
	if f.AMQP.AppID != "orders" || f.AMQP.ConnectionName != "orders-relay-1" {
		t.Errorf("set values: app_id %q, connection_name %q", f.AMQP.AppID, f.AMQP.ConnectionName)
	}
}
