package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// TestExampleInStep checks that config.example.yaml lists exactly the keys
// the program reads, each with its default value.
func TestExampleInStep(t *testing.T) {
	data, err := os.ReadFile("../../config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	inExample := map[string]bool{}
	var leaves func(n *yaml.Node, prefix string)
	leaves = func(n *yaml.Node, prefix string) {
		if n.Kind == yaml.DocumentNode {
			leaves(n.Content[0], prefix)
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := strings.TrimPrefix(prefix+"."+n.Content[i].Value, ".")
			if n.Content[i+1].Kind == yaml.MappingNode {
				leaves(n.Content[i+1], p)
			} else {
				inExample[p] = true
			}
		}
	}
	leaves(&doc, "")
	for _, k := range Keys() {
		if !inExample[k.Path] {
			t.Errorf("key %s is missing from config.example.yaml", k.Path)
		}
		delete(inExample, k.Path)
	}
	for k := range inExample {
		t.Errorf("config.example.yaml has %s, which the program does not read", k)
	}

	var example File
	if err := Parse(data, &example); err != nil {
		t.Fatal(err)
	}
	defaults := File{}
	defaults.Postgres.DSN, defaults.AMQP.URL, defaults.AMQP.Exchange = example.Postgres.DSN, example.AMQP.URL, example.AMQP.Exchange
	defaults = defaults.WithDefaults()
	if !reflect.DeepEqual(example, defaults) {
		t.Errorf("config.example.yaml values differ from the defaults:\nexample  %+v\ndefaults %+v", example, defaults)
	}
	if err := example.Validate(); err != nil {
		t.Errorf("config.example.yaml does not validate: %v", err)
	}
}

func TestEnvOverridesEveryKey(t *testing.T) {
	values := map[string]string{"string": "x", "int": "7", "bool": "false", "duration": "3s", "list": " x, y ,"}
	for _, k := range Keys() {
		f, err := Load("", []string{k.Env + "=" + values[k.Kind]})
		if err != nil {
			t.Fatalf("%s: %v", k.Env, err)
		}
		found := false
		walk(reflect.ValueOf(&f).Elem(), "", func(path string, v reflect.Value) {
			if path != k.Path {
				return
			}
			found = true
			got := v.Interface()
			switch k.Kind {
			case "int":
				if v.Int() != 7 {
					t.Errorf("%s: got %v", k.Env, got)
				}
			case "duration":
				if time.Duration(v.Int()) != 3*time.Second {
					t.Errorf("%s: got %v", k.Env, got)
				}
			case "bool":
				if v.Kind() == reflect.Pointer {
					v = v.Elem()
				}
				if v.Bool() {
					t.Errorf("%s: got %v", k.Env, got)
				}
			case "string":
				if v.String() != "x" {
					t.Errorf("%s: got %v", k.Env, got)
				}
			case "list":
				if !reflect.DeepEqual(got, []string{"x", "y"}) {
					t.Errorf("%s: got %q", k.Env, got)
				}
			}
		})
		if !found {
			t.Errorf("%s not found", k.Path)
		}
	}
}

func TestRequiredEnvNames(t *testing.T) {
	want := []string{"OUTBOX_RELAY_POSTGRES_DSN", "OUTBOX_RELAY_AMQP_URL", "OUTBOX_RELAY_AMQP_EXCHANGE", "OUTBOX_RELAY_METRICS_ADDR"}
	have := map[string]bool{}
	for _, k := range Keys() {
		have[k.Env] = true
	}
	for _, w := range want {
		if !have[w] {
			t.Errorf("no key is overridden by %s", w)
		}
	}
}

func TestUnknownKeyNamesPath(t *testing.T) {
	var f File
	err := Parse([]byte("amqp:\n  exchnage: x\n"), &f)
	if err == nil || !strings.Contains(err.Error(), "amqp.exchnage") || !strings.Contains(err.Error(), "exchange") {
		t.Fatalf("error %v does not name amqp.exchnage and the allowed keys", err)
	}
}

// FuzzParse: no input makes the loader panic, and whatever it accepts
// survives validation without panicking.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile("../../config.example.yaml"); err == nil {
		f.Add(data)
	}
	f.Add([]byte("relay:\n  batch_size: -1\n"))
	f.Add([]byte("wake: [1, 2]\n"))
	f.Add([]byte("---\n---\n"))
	f.Add([]byte("amqp:\n  url: [amqp://a, \"amqps://b:1/v\"]\npostgres:\n  dsn: postgres://x@y/z?default_query_exec_mode=exec\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var file File
		if err := Parse(data, &file); err != nil {
			return
		}
		_ = file.WithDefaults().Validate()
	})
}

// loadRequired loads yaml, after the required keys, with env applied, and
// returns the file and what Validate says of it.
func loadRequired(t *testing.T, yaml string, env ...string) (File, error) {
	t.Helper()
	const required = "postgres:\n  dsn: postgres://x@127.0.0.1/db\namqp:\n  url: amqp://x@127.0.0.1/\n  exchange: e\n"
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(required+yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Load(p, env)
	if err != nil {
		t.Fatal(err)
	}
	return f, f.Validate()
}

// TestExplicitZero: a number or duration set to 0 is an error naming the
// key when 0 would silently stand for the default; where 0 is the default
// (retention.dead), it is the documented meaning and allowed.
func TestExplicitZero(t *testing.T) {
	load := func(t *testing.T, yaml string, env ...string) error {
		t.Helper()
		_, err := loadRequired(t, yaml, env...)
		return err
	}
	for _, tc := range []struct {
		name, yaml string
		env        []string
		key        string // "" for no error
	}{
		{"batch size in the file", "relay:\n  batch_size: 0\n", nil, "relay.batch_size"},
		{"duration in the file", "retention:\n  dispatched: 0s\n", nil, "retention.dispatched"},
		{"another duration", "wake:\n  poll_interval: 0ms\n", nil, "wake.poll_interval"},
		{"file section of its own", "metrics:\n  max_event_types: 0\n", nil, "metrics.max_event_types"},
		{"from the environment", "", []string{"OUTBOX_RELAY_RELAY_MAX_ATTEMPTS=0"}, "relay.max_attempts"},
		{"int32 from the environment", "", []string{"OUTBOX_RELAY_POSTGRES_MAX_CONNS=0"}, "postgres.max_conns"},
		{"environment overrides a file zero", "relay:\n  batch_size: 0\n", []string{"OUTBOX_RELAY_RELAY_BATCH_SIZE=20"}, ""},
		{"YAML null is left out", "relay:\n  batch_size:\n", nil, ""},
		{"zero is the default", "retention:\n  dead: 0s\n", []string{"OUTBOX_RELAY_RETENTION_DEAD=0s"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := load(t, tc.yaml, tc.env...)
			if tc.key == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.key+": 0 is not allowed") || !strings.Contains(err.Error(), "default (") {
				t.Fatalf("error %v does not reject 0 for %s naming the default", err, tc.key)
			}
		})
	}
}

// TestLingerBounds: wake.linger must lie between wake.min_interval and
// wake.poll_interval, and its default follows those two when they are set.
func TestLingerBounds(t *testing.T) {
	for _, tc := range []struct {
		name, wake string
		linger     time.Duration // the value in effect, when valid
		key        string        // "" for no error
	}{
		{"default", "", 20 * time.Millisecond, ""},
		{"off", "  linger: 2ms\n", 2 * time.Millisecond, ""},
		{"default under a short poll_interval", "  poll_interval: 10ms\n", 10 * time.Millisecond, ""},
		{"default over a long min_interval", "  min_interval: 50ms\n", 50 * time.Millisecond, ""},
		{"below min_interval", "  linger: 1ms\n", 0, "wake.linger"},
		{"above poll_interval", "  linger: 200ms\n", 0, "wake.linger"},
		{"rate not positive", "  linger_above: -5\n", 0, "wake.linger_above"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := loadRequired(t, "wake:\n"+tc.wake)
			if tc.key != "" {
				if err == nil || !strings.Contains(err.Error(), tc.key+": must") {
					t.Fatalf("error %v does not name %s", err, tc.key)
				}
				return
			}
			if err != nil {
				t.Fatalf("want valid, got %v", err)
			}
			if f.Wake.Linger != tc.linger {
				t.Fatalf("linger %s, want %s", f.Wake.Linger, tc.linger)
			}
		})
	}
}

func TestMetricsAddr(t *testing.T) {
	for addr, ok := range map[string]bool{
		"off": true, ":9464": true, "127.0.0.1:9464": true, "[::1]:9464": true, "localhost:0": true,
		"relay-1.example.com:80": true, ":65535": true,
		"not an address": false, ":65536": false, "127.0.0.1:99999": false, ":-1": false, "9464": false,
		":http": false, "bad host:80": false, "": false, "on": false, ":+80": false,
	} {
		f := File{}.WithDefaults()
		f.Metrics.Addr = addr
		err := f.Validate()
		var bad bool
		for _, e := range Problems(err) {
			if strings.HasPrefix(e.Error(), "metrics.addr: must be host:port or :port") && strings.Contains(e.Error(), `"off"`) {
				bad = true
			}
		}
		if bad == ok {
			t.Errorf("metrics.addr %q: accepted %v, want %v (%v)", addr, !bad, ok, err)
		}
	}
}

// TestRoutingAndFormatKeys: amqp.exchanges reads a YAML list or a
// comma-separated variable; a cloudevents format without
// amqp.cloudevents_source, an unknown format and an empty exchange name are
// errors naming their key.
func TestRoutingAndFormatKeys(t *testing.T) {
	f, err := loadRequired(t, "  exchanges: [billing.events, audit.events]\n  format: cloudevents-structured\n  cloudevents_source: //edupulse/lessons\n")
	if err != nil {
		t.Fatalf("valid routing and format keys rejected: %v", err)
	}
	if !reflect.DeepEqual(f.AMQP.Exchanges, []string{"billing.events", "audit.events"}) {
		t.Errorf("amqp.exchanges = %q", f.AMQP.Exchanges)
	}
	f, err = loadRequired(t, "", "OUTBOX_RELAY_AMQP_EXCHANGES=billing.events,audit.events")
	if err != nil || !reflect.DeepEqual(f.AMQP.Exchanges, []string{"billing.events", "audit.events"}) {
		t.Errorf("OUTBOX_RELAY_AMQP_EXCHANGES: %q, %v", f.AMQP.Exchanges, err)
	}
	for yaml, key := range map[string]string{
		"  format: cloudevents-binary\n":                                "amqp.cloudevents_source: must be set",
		"  format: cloudevents-structured\n  cloudevents_source: a b\n": "amqp.cloudevents_source: must be a URI-reference",
		"  format: cloudevents\n":                                       `amqp.format: must be one of`,
		"  exchanges: [billing.events, \"\"]\n":                         "amqp.exchanges[1]:",
	} {
		if _, err := loadRequired(t, yaml); err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%q: error %v, want one naming %s", yaml, err, key)
		}
	}
}
