package faulttest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestOrderedReplicaFrozen: of two ordered relays, the one owning a busy
// key's partition is SIGSTOPped in the middle of a flow. The other delivers
// that key's new events within the lease bound while the first is still
// stopped; after SIGCONT, a consumer that drops duplicates by message id
// sees every event, each key's in sequence order.
func TestOrderedReplicaFrozen(t *testing.T) {
	t.Parallel()
	const (
		lease      = 3 * time.Second
		partitions = 8
		busyKey    = "busy"
	)
	// Leases lapse within lease + one renewal (lease/6); the frozen relay's
	// claim transactions are ended by the server lease after their last
	// statement; then one claim-loop turn.
	bound := lease + lease/6 + time.Second
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	env := func(name string) []string {
		return relayEnv(o, b.URL, b.Exchange,
			"OUTBOX_RELAY_POSTGRES_DSN="+o.DSN+"&application_name="+o.Schema+"_"+name,
			"OUTBOX_RELAY_RELAY_ORDERING=partition_key",
			"OUTBOX_RELAY_RELAY_PARTITIONS="+strconv.Itoa(partitions),
			"OUTBOX_RELAY_RELAY_LEASE_TIMEOUT="+lease.String(),
			"OUTBOX_RELAY_RELAY_BATCH_SIZE=50",
			"OUTBOX_RELAY_RELAY_SHUTDOWN_TIMEOUT=5s")
	}
	relays := map[int]*relayProc{}
	for _, name := range []string{"a", "b"} {
		p := startRelay(t, env(name))
		relays[p.cmd.Process.Pid] = p
	}
	testenv.Eventually(t, 20*time.Second, "two relays holding 4 partitions each", func() bool {
		m := partitionsByPID(t, o)
		return len(m) == 2 && m[pidsOf(relays)[0]] == 4 && m[pidsOf(relays)[1]] == 4
	})

	cons := consumeInKeyOrder(deliveries, 0)
	prod := &busyProducer{key: busyKey, done: make(chan struct{})}
	go prod.run(t, o)
	defer func() { prod.stop.Store(true); <-prod.done }()
	// The flow is live: a busy event written now arrives.
	testenv.Eventually(t, 20*time.Second, "the busy key flowing", func() bool {
		n := prod.busyCount()
		if n < 20 {
			return false
		}
		_, ok := cons.delivered(prod.busyEvent(n - 20).id)
		return ok
	})

	frozen, part := busyOwner(t, o, busyKey, partitions)
	if relays[frozen] == nil {
		t.Fatalf("partition %d of %q is held by pid %d, not one of the relays", part, busyKey, frozen)
	}
	if err := syscall.Kill(frozen, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	defer syscall.Kill(frozen, syscall.SIGCONT)
	firstAfter := prod.busyCount()

	// The busy key's events written after the freeze arrive, from the
	// other relay, within the bound.
	var moved time.Time
	testenv.Eventually(t, 3*bound, "a busy event written after the freeze delivered", func() bool {
		if prod.busyCount() <= firstAfter {
			return false
		}
		at, ok := cons.delivered(prod.busyEvent(firstAfter).id)
		moved = at
		return ok
	})
	if !stopped(t, frozen) {
		t.Fatal("the frozen relay is running again: the test proves nothing")
	}
	took := moved.Sub(stoppedAt)
	t.Logf("busy key moved to the other relay %v after the freeze (bound %v)", took.Round(time.Millisecond), bound)
	if took > bound {
		t.Errorf("the busy key's events waited %v with its relay frozen; bound %v", took, bound)
	}
	// Keep flowing a while with the relay frozen, then thaw it.
	time.Sleep(time.Second) // flow during the freeze, not a wait for a condition
	if err := syscall.Kill(frozen, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 20*time.Second, "the thawed relay holding partitions again", func() bool {
		return partitionsByPID(t, o)[frozen] > 0
	})
	prod.stop.Store(true)
	<-prod.done

	all := prod.written()
	testenv.Eventually(t, 60*time.Second, "every written event delivered", func() bool {
		for _, id := range all {
			if _, ok := cons.delivered(id); !ok {
				return false
			}
		}
		return true
	})
	cons.mu.Lock()
	defer cons.mu.Unlock()
	t.Logf("frozen replica: %d events, %d busy", len(all), prod.busyCount())
	if len(cons.outOfOrder) > 0 {
		t.Errorf("%d out of order, first: %s", len(cons.outOfOrder), cons.outOfOrder[0])
	}
}

// partitionsByPID maps each lease owner's OS pid to the partitions it holds.
func partitionsByPID(t *testing.T, o *testenv.Outbox) map[int]int {
	t.Helper()
	list, err := ops.PartitionOwners(context.Background(), o.Pool, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	m := map[int]int{}
	for _, ow := range list {
		m[ownerPID(t, ow.Owner)] += len(ow.Partitions)
	}
	return m
}

// busyOwner returns key's partition and the OS pid of the relay whose lease
// covers it (0 if none).
func busyOwner(t *testing.T, o *testenv.Outbox, key string, partitions int) (owner int, part int32) {
	t.Helper()
	ctx := context.Background()
	if err := o.Pool.QueryRow(ctx, `SELECT ((hashtextextended($1, 0) & 2147483647) % $2)::int4`, key, partitions).Scan(&part); err != nil {
		t.Fatal(err)
	}
	list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, ow := range list {
		for _, p := range ow.Partitions {
			if p == part {
				owner = ownerPID(t, ow.Owner)
			}
		}
	}
	return owner, part
}

// busyProducer writes, every 10 ms until stop, one event of key and one of
// another of 50 keys, each in a transaction of its own.
type busyProducer struct {
	key  string
	stop atomic.Bool
	done chan struct{}

	mu   sync.Mutex
	busy []writtenAt // key's events
	all  []string    // every event's id
}

type writtenAt struct {
	id string
	at time.Time
}

func (p *busyProducer) run(t *testing.T, o *testenv.Outbox) {
	defer close(p.done)
	ctx := context.Background()
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	for i := 0; !p.stop.Load(); i++ {
		for _, key := range []string{p.key, fmt.Sprint("k", i%50)} {
			e := outbox.NewEvent("lesson.progressed", fmt.Appendf(nil, `{"i":%d}`, i))
			e.Key = key
			if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, e) }); err != nil {
				t.Error(err)
				return
			}
			p.mu.Lock()
			p.all = append(p.all, e.ID.String())
			if key == p.key {
				p.busy = append(p.busy, writtenAt{e.ID.String(), time.Now()})
			}
			p.mu.Unlock()
		}
		time.Sleep(10 * time.Millisecond) // the producer's pace, not a wait for a condition
	}
}

func (p *busyProducer) busyCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.busy)
}

func (p *busyProducer) busyEvent(i int) writtenAt {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.busy[i]
}

func (p *busyProducer) written() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.all)
}

// keyOrder is a consumer that drops duplicates by message id and records,
// per key, the highest sequence seen and every event that came after a
// higher one.
type keyOrder struct {
	mu         sync.Mutex
	received   map[string]time.Time // message id → first arrival
	lastSeq    map[string]int64     // key → highest seq
	dups       int
	outOfOrder []string
	done       chan struct{} // closed when enough events arrived, or deliveries closed
}

// consumeInKeyOrder consumes deliveries until enough distinct events
// arrived (0: until deliveries is closed).
func consumeInKeyOrder(deliveries <-chan amqp.Delivery, enough int) *keyOrder {
	c := &keyOrder{received: map[string]time.Time{}, lastSeq: map[string]int64{}, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for d := range deliveries {
			c.mu.Lock()
			if _, dup := c.received[d.MessageId]; dup {
				c.dups++
				c.mu.Unlock()
				continue
			}
			c.received[d.MessageId] = time.Now()
			key, _ := d.Headers[relay.HeaderPartitionKey].(string)
			seq, _ := d.Headers[relay.HeaderSeq].(int64)
			if seq <= c.lastSeq[key] {
				c.outOfOrder = append(c.outOfOrder, fmt.Sprintf("key %s: seq %d after %d", key, seq, c.lastSeq[key]))
			}
			c.lastSeq[key] = max(c.lastSeq[key], seq)
			stop := enough > 0 && len(c.received) >= enough
			c.mu.Unlock()
			if stop {
				return
			}
		}
	}()
	return c
}

// delivered reports when the event with message id id first arrived.
func (c *keyOrder) delivered(id string) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.received[id]
	return at, ok
}

// ownerPID is the OS process id in a lease owner's name (host/pid/random).
func ownerPID(t *testing.T, owner string) int {
	t.Helper()
	parts := strings.Split(owner, "/")
	if len(parts) < 3 {
		t.Fatalf("lease owner %q is not host/pid/random", owner)
	}
	pid, err := strconv.Atoi(parts[len(parts)-2])
	if err != nil {
		t.Fatalf("lease owner %q: %v", owner, err)
	}
	return pid
}

func pidsOf(m map[int]*relayProc) []int {
	var out []int
	for pid := range m {
		out = append(out, pid)
	}
	return out
}

// stopped reports whether process pid is stopped by a signal.
func stopped(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] == "T"
}
