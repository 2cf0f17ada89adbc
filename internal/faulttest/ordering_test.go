package faulttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestOrderingWithReplicas: 3 ordered relays share one table while one of
// them is SIGKILLed and restarted every few seconds; producers write over
// 1,000 keys, including pairs of transactions on one key that commit out of
// identity order. After dropping duplicates by message_id, every key's events
// arrive in strictly increasing sequence and nothing is lost.
// ORDERING_EVENTS sets the size (default 20,000; 100,000 for a full run).
func TestOrderingWithReplicas(t *testing.T) {
	t.Parallel()
	total := envInt(t, "ORDERING_EVENTS", 20000)
	const keys = 1000
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	env := relayEnv(o, b.URL, b.Exchange,
		"OUTBOX_RELAY_RELAY_ORDERING=partition_key",
		"OUTBOX_RELAY_RELAY_PARTITIONS=32",
		"OUTBOX_RELAY_RELAY_BATCH_SIZE=200",
		"OUTBOX_RELAY_RELAY_SHUTDOWN_TIMEOUT=5s")
	relays := []*relayProc{startRelay(t, env), startRelay(t, env), startRelay(t, env)}

	cons := consumeInKeyOrder(deliveries, total)
	// Producers stop with the chaos loop's deadline, so a stuck write fails
	// the test instead of hanging it; a transaction left open would hold
	// back every ordered relay on the server.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	// Paced over ORDERING_SECONDS (default 15) so the kills hit live traffic.
	pace := time.Duration(envInt(t, "ORDERING_SECONDS", 15)) * time.Second
	var written atomic.Int64
	var wg sync.WaitGroup
	produceKeyed(ctx, t, &wg, o, total, keys, pace, &written)

	// Chaos: kill and restart one relay every 1.5 s until everything arrived.
	kills := 0
	tick := time.NewTicker(1500 * time.Millisecond)
	defer tick.Stop()
wait:
	for {
		select {
		case <-cons.done:
			break wait
		case <-ctx.Done():
			break wait
		case <-tick.C:
			i := kills % len(relays)
			relays[i].kill(t)
			relays[i] = startRelay(t, env)
			kills++
		}
	}
	wg.Wait()
	cons.mu.Lock()
	defer cons.mu.Unlock()
	lost := int(written.Load()) - len(cons.received)
	line := fmt.Sprintf("ordering: keys %d, events %d, out-of-order %d, lost %d, dups %d",
		keys, written.Load(), len(cons.outOfOrder), lost, cons.dups)
	t.Log(line)
	fmt.Println(line)
	t.Logf("ordering: relay kills %d", kills)
	if len(cons.outOfOrder) > 0 {
		t.Errorf("out of order: %s", cons.outOfOrder[0])
	}
	if lost != 0 || int(written.Load()) != total {
		t.Errorf("lost %d of %d written (%d intended)", lost, written.Load(), total)
	}
	if kills == 0 {
		t.Error("no relay was killed: the run proves nothing about faults")
	}
	// Two batches await their confirms and one is being claimed.
	if cons.dups > kills*3*200 {
		t.Errorf("%d duplicates exceed what was in flight at %d kills (3 batches of 200 each)", cons.dups, kills)
	}
}

// produceKeyed starts 4 producers in wg that write total events over keys,
// paced over pace, counting them in written; one transaction in ten is a
// pair on one key whose second insert commits first.
func produceKeyed(ctx context.Context, t *testing.T, wg *sync.WaitGroup, o *testenv.Outbox, total, keys int, pace time.Duration, written *atomic.Int64) {
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	// A pair holds two connections at once: with fewer than two per
	// producer, four producers each holding their first could wait for a
	// second forever.
	pool := producerPool(t, o.DSN, 8)
	perProducer := total / 4
	began := time.Now()
	for p := 0; p < 4; p++ {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(p), 42))
			n := 0
			ev := func(key string) outbox.Event {
				e := outbox.NewEvent("lesson.progressed", fmt.Appendf(nil, `{"producer":%d,"n":%d}`, p, n))
				e.Key = key
				n++
				return e
			}
			for n < perProducer {
				if due := began.Add(pace * time.Duration(n) / time.Duration(perProducer)); time.Now().Before(due) {
					time.Sleep(time.Until(due))
				}
				key := fmt.Sprint("k", rng.IntN(keys))
				if rng.IntN(10) == 0 && perProducer-n >= 2 {
					if err := outOfOrderPair(ctx, pool, w, ev(key), ev(key)); err != nil {
						t.Error(err)
						return
					}
					written.Add(2)
					continue
				}
				batch := []outbox.Event{ev(key)}
				for len(batch) < 5 && n < perProducer {
					batch = append(batch, ev(fmt.Sprint("k", rng.IntN(keys))))
				}
				if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, batch...) }); err != nil {
					t.Error(err)
					return
				}
				written.Add(int64(len(batch)))
			}
		})
	}
}

// outOfOrderPair writes a then b on the same key in two transactions, a
// drawing the lower sequence, and commits b first.
func outOfOrderPair(ctx context.Context, pool *pgxpool.Pool, w *outbox.Writer, a, b outbox.Event) error {
	ta, err := pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer ta.Rollback(ctx)
	if err := w.Write(ctx, ta, a); err != nil {
		return err
	}
	if err := pgx.BeginFunc(ctx, pool, func(tb pgx.Tx) error { return w.Write(ctx, tb, b) }); err != nil {
		return err
	}
	time.Sleep(time.Millisecond) // let a relay see b before a commits
	return ta.Commit(ctx)
}

// producerPool is a pool of up to n connections, closed when the test ends.
func producerPool(t *testing.T, dsn string, n int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = n
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}
