package relay_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/shipped"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// shippedMemory reads the container memory limit and GOMEMLIMIT of the
// shipped Kubernetes sidecar manifest, so the test holds the relay to them.
func shippedMemory(t *testing.T) (limit int64, gomemlimit string) {
	t.Helper()
	m, err := shipped.ReadMemory("..")
	if err != nil {
		t.Fatal(err)
	}
	return m.Limit, m.GOMEMLIMIT
}

// peakRSS is the VmHWM of process pid, in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/pid/status")
	return 0
}

// TestLargePayloadsDrainWithinContainerLimit: a backlog of large payloads
// behind a row the broker would refuse drains completely through the real
// daemon, run with the shipped manifest's GOMEMLIMIT and default settings,
// and its peak RSS stays under the shipped container memory limit: 16 rows
// of 24 MiB (each over relay.batch_bytes, so each goes alone), 320 rows
// of 1 MiB (many to a claim, up to the budget), and 12 rows of 12 MiB sent
// as structured CloudEvents (each a 16 MiB document, data_base64).
func TestLargePayloadsDrainWithinContainerLimit(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		rows, size int
		format     string
	}{{16, 24 << 20, ""}, {320, 1 << 20, ""}, {12, 12 << 20, relay.FormatCloudEventsStructured}} {
		t.Run(strings.Trim(fmt.Sprintf("%dx%dMiB_%s", c.rows, c.size>>20, c.format), "_"), func(t *testing.T) {
			t.Parallel()
			drainLarge(t, c.rows, c.size, c.format)
		})
	}
}

// drainLarge runs the check with rows payloads of size bytes, published in
// amqp.format format (plain if empty).
func drainLarge(t *testing.T, rows, size int, format string) {
	limit, gomemlimit := shippedMemory(t)
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	if _, err := o.Pool.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, headers) VALUES ('bad.event', '{}', '{"CC": "x"}')`); err != nil {
		t.Fatal(err)
	}
	payloads := make(map[string][]byte, rows)
	for i := range rows {
		p := make([]byte, size)
		_, _ = rand.Read(p) // incompressible, as TOAST would otherwise shrink it
		var id string
		if err := o.Pool.QueryRow(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, content_type)
			VALUES ('big.event', $1, 'application/octet-stream') RETURNING id::text`, p).Scan(&id); err != nil {
			t.Fatalf("row %d: %v", i, err)
		}
		payloads[id] = p
	}

	bin := filepath.Join(t.TempDir(), "outbox-relay")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/outbox-relay").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "run")
	cmd.Env = append(os.Environ(),
		"GOMEMLIMIT="+gomemlimit,
		"OUTBOX_RELAY_POSTGRES_DSN="+o.DSN,
		"OUTBOX_RELAY_POSTGRES_SCHEMA="+o.Schema,
		"OUTBOX_RELAY_POSTGRES_TABLE="+o.Table.Name,
		"OUTBOX_RELAY_AMQP_URL="+b.URL,
		"OUTBOX_RELAY_AMQP_EXCHANGE="+b.Exchange,
		"OUTBOX_RELAY_AMQP_DECLARE_EXCHANGE=false",
		"OUTBOX_RELAY_METRICS_ADDR=off",
		"OUTBOX_RELAY_LOG_LEVEL=warn",
	)
	if format != "" {
		cmd.Env = append(cmd.Env, "OUTBOX_RELAY_AMQP_FORMAT="+format, "OUTBOX_RELAY_AMQP_CLOUDEVENTS_SOURCE=//edupulse/test")
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	seen := map[string]bool{}
	deadline := time.After(3 * time.Minute)
	for len(seen) < rows {
		select {
		case d := <-deliveries:
			want, ok := payloads[d.MessageId]
			body := d.Body
			if format != "" {
				var doc struct {
					Data []byte `json:"data_base64"`
				}
				if err := json.Unmarshal(d.Body, &doc); err != nil {
					t.Fatalf("message %s: %v", d.MessageId, err)
				}
				body = doc.Data
			}
			if !ok || !bytes.Equal(body, want) {
				t.Fatalf("unexpected message %s (%s, %d bytes)", d.MessageId, d.Type, len(d.Body))
			}
			seen[d.MessageId] = true
		case err := <-exited:
			t.Fatalf("relay exited: %v\n%s", err, stderr.String())
		case <-deadline:
			t.Fatalf("%d of %d large rows delivered in 3m\n%s", len(seen), rows, stderr.String())
		}
	}
	testenv.Eventually(t, 30*time.Second, "all large rows dispatched, the refused row dead", func() bool {
		return o.Count(t, "event_type = 'big.event' AND dispatched_at IS NOT NULL") == rows &&
			o.Count(t, "event_type = 'bad.event' AND dead_at IS NOT NULL") == 1
	})
	peak := peakRSS(t, cmd.Process.Pid)
	t.Logf("peak RSS %.1f MiB draining %d x %d MiB (GOMEMLIMIT %s, container limit %d MiB)", float64(peak)/(1<<20), rows, size>>20, gomemlimit, limit>>20)
	if peak >= limit {
		t.Errorf("peak RSS %.1f MiB, over the shipped container limit of %d MiB", float64(peak)/(1<<20), limit>>20)
	}
}
