package config

import (
	"slices"
	"strings"
	"testing"
)

// TestAMQPURLList checks that amqp.url takes several broker URLs, as a YAML
// list or comma-separated in the environment, in order, a comma inside a
// password not splitting a URL; and that a bad entry is named.
func TestAMQPURLList(t *testing.T) {
	want := []string{"amqp://relay:p,w@rmq-0:5672/app", "amqp://relay:p,w@rmq-1:5672/app", "amqps://relay:p,w@rmq-2/app"}
	yamlList := "amqp:\n  url:\n    - " + strings.Join(want, "\n    - ") + "\n"
	var f File
	if err := Parse([]byte(yamlList), &f); err != nil {
		t.Fatalf("YAML list: %v", err)
	}
	if got := f.AMQP.URLs(); !slices.Equal(got, want) {
		t.Errorf("YAML list: URLs() = %q, want %q", got, want)
	}
	env, err := Load("", []string{"OUTBOX_RELAY_AMQP_URL=" + strings.Join(want, ", ")})
	if err != nil {
		t.Fatal(err)
	}
	if got := env.AMQP.URLs(); !slices.Equal(got, want) {
		t.Errorf("environment: URLs() = %q, want %q", got, want)
	}

	bad, err := Load("", []string{"OUTBOX_RELAY_AMQP_URL=amqp://a:5672/,amqp://b:5672/", "OUTBOX_RELAY_POSTGRES_DSN=postgres://x@y/z", "OUTBOX_RELAY_AMQP_EXCHANGE=e"})
	if err != nil {
		t.Fatal(err)
	}
	bad.AMQP.URL += ",http://c:5672/"
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), `amqp.url: must be an amqp:// or amqps:// URL (URL 3 of 3), got "http://c:5672/"`) {
		t.Errorf("a non-AMQP entry: got %v", err)
	}
	if err := Parse([]byte("amqp:\n  url:\n    - {host: a}\n"), &f); err == nil || !strings.Contains(err.Error(), "amqp.url") {
		t.Errorf("a list of mappings: got %v, want an error naming amqp.url", err)
	}
}
