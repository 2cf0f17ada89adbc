package relay_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// batchRecorder is a fake broker that also records each batch's payload
// sizes.
type batchRecorder struct {
	*relaytest.Fake
	mu      sync.Mutex
	batches [][]int
}

func (b *batchRecorder) Send(ctx context.Context, msgs []relay.Message) relay.Pending {
	sizes := make([]int, len(msgs))
	for i, m := range msgs {
		sizes[i] = len(m.Body)
	}
	b.mu.Lock()
	b.batches = append(b.batches, sizes)
	b.mu.Unlock()
	return b.Fake.Send(ctx, msgs)
}

// TestClaimByteBudget: payloads of every size class the claim handles
// (returned with the row, read after the claim because they exceed the
// per-row share of the budget, read in pieces because they exceed a
// megabyte, and larger than the whole budget) arrive
// whole, rows over amqp.max_message_size are parked unsent wherever they
// fall (also past a batch's budget), and no batch of more than one message
// carries more than relay.batch_bytes.
func TestClaimByteBudget(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	const budget = 256 << 10
	const maxSize = 2 << 20 // the 3 MiB rows are parked, wherever they fall
	sizes := []int{0, 100, 100, 5000, 100, 40 << 10, 5000, 200 << 10, 100, 3 << 20, 5000, 100, 300 << 10, 0, 100, 200 << 10, 3 << 20, 3 << 19}
	for range 40 {
		sizes = append(sizes, 100, 5000)
	}
	want, parked := map[int64][]byte{}, map[int64]bool{}
	ctx := context.Background()
	for i, n := range sizes {
		p := make([]byte, n)
		_, _ = rand.Read(p)
		var seq int64
		if err := o.Pool.QueryRow(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, content_type)
			VALUES ('sized.event', $1, 'application/octet-stream') RETURNING seq`, p).Scan(&seq); err != nil {
			t.Fatalf("row %d: %v", i, err)
		}
		if n > maxSize {
			parked[seq] = true
			continue
		}
		want[seq] = p
	}

	rec := &batchRecorder{Fake: relaytest.NewFake()}
	declare := false
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP: relay.AMQPConfig{URL: "amqp://relaytest.invalid/", Exchange: "relaytest", DeclareExchange: &declare,
			MaxMessageSize: maxSize},
		Relay: relay.EngineConfig{ShutdownTimeout: 5 * time.Second, BatchSize: 20, BatchBytes: budget},
	}
	testenv.StartRelay(t, cfg, testenv.WithPublisher(rec))
	testenv.Eventually(t, 30*time.Second, "every event dispatched and the oversized ones parked", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(want) && o.Count(t, "dead_at IS NOT NULL") == len(parked)
	})

	got := map[int64]bool{}
	for _, m := range rec.Sent() {
		p, ok := want[m.Seq]
		if parked[m.Seq] {
			t.Fatalf("seq %d, over amqp.max_message_size, was sent", m.Seq)
		}
		if !ok {
			t.Fatalf("seq %d was sent but not written", m.Seq)
		}
		if !bytes.Equal(m.Body, p) {
			t.Fatalf("seq %d: sent %d bytes, want the %d written", m.Seq, len(m.Body), len(p))
		}
		got[m.Seq] = true
	}
	if len(got) != len(want) {
		t.Fatalf("%d of %d rows sent", len(got), len(want))
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for _, b := range rec.batches {
		total := 0
		for _, n := range b {
			total += n
		}
		if len(b) > 1 && total > budget {
			t.Errorf("a batch of %d messages carried %d payload bytes, over relay.batch_bytes (%d): %v", len(b), total, budget, b)
		}
	}
}
