package faulttest

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
	ctx := context.Background()
	owners := func() map[int]int { // OS pid → partitions held
		t.Helper()
		list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
		if err != nil {
			t.Fatal(err)
		}
		m := map[int]int{}
		for _, ow := range list {
			m[ownerPID(t, ow.Owner)] += len(ow.Partitions)
		}
		return m
	}
	relays := map[int]*relayProc{}
	for _, name := range []string{"a", "b"} {
		p := startRelay(t, env(name))
		relays[p.cmd.Process.Pid] = p
	}
	testenv.Eventually(t, 20*time.Second, "two relays holding 4 partitions each", func() bool {
		m := owners()
		return len(m) == 2 && m[pidsOf(relays)[0]] == 4 && m[pidsOf(relays)[1]] == 4
	})

	// Consumer: duplicates dropped by id, per key the highest seq seen.
	var (
		mu         sync.Mutex
		seen       = map[string]bool{}
		received   = map[string]time.Time{}
		lastSeq    = map[string]int64{}
		outOfOrder []string
	)
	go func() {
		for d := range deliveries {
			mu.Lock()
			if !seen[d.MessageId] {
				seen[d.MessageId] = true
				received[d.MessageId] = time.Now()
				key, _ := d.Headers[relay.HeaderPartitionKey].(string)
				seq, _ := d.Headers[relay.HeaderSeq].(int64)
				if seq <= lastSeq[key] {
					outOfOrder = append(outOfOrder, fmt.Sprintf("key %s: seq %d after %d", key, seq, lastSeq[key]))
				}
				lastSeq[key] = max(lastSeq[key], seq)
			}
			mu.Unlock()
		}
	}()

	// Producer: every 10 ms one event of the busy key and one of another of
	// 50 keys, each in a transaction of its own.
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	type written struct {
		id string
		at time.Time
	}
	var (
		wmu      sync.Mutex
		busy     []written
		all      []string
		stopProd atomic.Bool
		prodDone = make(chan struct{})
	)
	go func() {
		defer close(prodDone)
		for i := 0; !stopProd.Load(); i++ {
			for _, key := range []string{busyKey, fmt.Sprint("k", i%50)} {
				e := outbox.NewEvent("lesson.progressed", fmt.Appendf(nil, `{"i":%d}`, i))
				e.Key = key
				if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, e) }); err != nil {
					t.Error(err)
					return
				}
				wmu.Lock()
				all = append(all, e.ID.String())
				if key == busyKey {
					busy = append(busy, written{e.ID.String(), time.Now()})
				}
				wmu.Unlock()
			}
			time.Sleep(10 * time.Millisecond) // the producer's pace, not a wait for a condition
		}
	}()
	defer func() { stopProd.Store(true); <-prodDone }()
	delivered := func(id string) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		at, ok := received[id]
		return at, ok
	}
	// The flow is live: a busy event written now arrives.
	testenv.Eventually(t, 20*time.Second, "the busy key flowing", func() bool {
		wmu.Lock()
		defer wmu.Unlock()
		if len(busy) < 20 {
			return false
		}
		_, ok := delivered(busy[len(busy)-20].id)
		return ok
	})

	// Freeze the relay that owns the busy key's partition.
	var part int32
	if err := o.Pool.QueryRow(ctx, `SELECT ((hashtextextended($1, 0) & 2147483647) % $2)::int4`, busyKey, partitions).Scan(&part); err != nil {
		t.Fatal(err)
	}
	frozen := 0
	list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, ow := range list {
		for _, p := range ow.Partitions {
			if p == part {
				frozen = ownerPID(t, ow.Owner)
			}
		}
	}
	if relays[frozen] == nil {
		t.Fatalf("partition %d of %q is held by pid %d, not one of the relays", part, busyKey, frozen)
	}
	if err := syscall.Kill(frozen, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	defer syscall.Kill(frozen, syscall.SIGCONT)
	wmu.Lock()
	firstAfter := len(busy)
	wmu.Unlock()

	// The busy key's events written after the freeze arrive, from the
	// other relay, within the bound.
	var moved time.Time
	testenv.Eventually(t, 3*bound, "a busy event written after the freeze delivered", func() bool {
		wmu.Lock()
		defer wmu.Unlock()
		if len(busy) <= firstAfter {
			return false
		}
		at, ok := delivered(busy[firstAfter].id)
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
		return owners()[frozen] > 0
	})
	stopProd.Store(true)
	<-prodDone

	testenv.Eventually(t, 60*time.Second, "every written event delivered", func() bool {
		wmu.Lock()
		defer wmu.Unlock()
		for _, id := range all {
			if _, ok := delivered(id); !ok {
				return false
			}
		}
		return true
	})
	mu.Lock()
	defer mu.Unlock()
	t.Logf("frozen replica: %d events, %d busy", len(all), len(busy))
	if len(outOfOrder) > 0 {
		t.Errorf("%d out of order, first: %s", len(outOfOrder), outOfOrder[0])
	}
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
