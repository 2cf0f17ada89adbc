package config

import (
	"slices"
	"strings"
	"testing"
)

// TestKubernetesServiceLinksIgnored checks that the variables the kubelet
// injects for Services named outbox-relay and outbox-relay-metrics are
// ignored (and reported for the log), while unknown OUTBOX_RELAY_* variables
// that merely look alike still fail, each named.
func TestKubernetesServiceLinksIgnored(t *testing.T) {
	links := []string{
		"OUTBOX_RELAY_SERVICE_HOST=10.96.12.34",
		"OUTBOX_RELAY_SERVICE_PORT=9464",
		"OUTBOX_RELAY_SERVICE_PORT_METRICS=9464",
		"OUTBOX_RELAY_PORT=tcp://10.96.12.34:9464",
		"OUTBOX_RELAY_PORT_9464_TCP=tcp://10.96.12.34:9464",
		"OUTBOX_RELAY_PORT_9464_TCP_PROTO=tcp",
		"OUTBOX_RELAY_PORT_9464_TCP_PORT=9464",
		"OUTBOX_RELAY_PORT_9464_TCP_ADDR=10.96.12.34",
		"OUTBOX_RELAY_METRICS_SERVICE_HOST=fd00::1234",
		"OUTBOX_RELAY_METRICS_PORT_9464_TCP=tcp://[fd00::1234]:9464",
	}
	env := append([]string{"OUTBOX_RELAY_RELAY_BATCH_SIZE=10"}, links...)
	f, err := Load("", env)
	if err != nil {
		t.Fatalf("service-link variables rejected: %v", err)
	}
	if f.Relay.BatchSize != 10 {
		t.Errorf("relay.batch_size = %d, want 10 from the environment", f.Relay.BatchSize)
	}
	var want []string
	for _, kv := range links {
		want = append(want, strings.SplitN(kv, "=", 2)[0])
	}
	slices.Sort(want)
	if got := f.ServiceLinks(); !slices.Equal(got, want) {
		t.Errorf("ServiceLinks() = %v, want %v", got, want)
	}

	for _, bad := range []string{
		"OUTBOX_RELAY_BATCH_SIZE=10",                    // a typo for relay.batch_size
		"OUTBOX_RELAY_PORT=9464",                        // not what the kubelet writes there
		"OUTBOX_RELAY_SERVICE_HOST=relay.example",       // the kubelet writes an IP
		"OUTBOX_RELAY_PORT_9464_TCP_PROTO=http",         // not a protocol
		"OUTBOX_RELAY_PORT_9464_HTTP=tcp://10.0.0.1:80", // not a protocol either
	} {
		name := strings.SplitN(bad, "=", 2)[0]
		others := slices.DeleteFunc(slices.Clone(links), func(kv string) bool { return strings.HasPrefix(kv, name+"=") })
		_, err := Load("", append(others, bad))
		if err == nil || !strings.Contains(err.Error(), name+": unknown environment variable") {
			t.Errorf("%s: got %v, want an unknown-variable error naming it", bad, err)
		}
	}
}
