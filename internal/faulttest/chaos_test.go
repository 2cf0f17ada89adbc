package faulttest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/amqpconn"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// The chaos run's fixed settings. The duplicate bound is
// faults × chaosInFlight × chaosBatch.
const (
	chaosBatch = 200 // relay.batch_size
	// chaosInFlight is how many claimed batches the relay can have sent and
	// not yet committed: 2 await their confirms (with the default
	// postgres.max_conns) while it claims and sends the next one
	// (relay.claimLoop). A fault at the wrong moment republishes them all.
	chaosInFlight   = 3
	chaosTxEvents   = 10               // events per producer transaction
	chaosKeys       = 1000             // distinct partition keys
	chaosRelayKills = 5                // SIGKILLs of the relay
	chaosRMQ        = 2                // RabbitMQ restarts
	chaosPG         = 1                // PostgreSQL restarts
	chaosDrain      = 3 * time.Minute  // wait for delivery after the producer finished
	chaosSlack      = time.Minute      // producer's catch-up after outages; longest retry of one transaction
	chaosReconnect  = 90 * time.Second // longest outage the consumer rides out
)

// TestChaos is the delivery promise under every fault we can produce on one
// machine: a producer writes events at a steady rate through the outbox
// helper into a private PostgreSQL, the relay (the real binary) publishes
// them to a private RabbitMQ, and meanwhile the harness SIGKILLs the relay 5
// times, restarts RabbitMQ twice and PostgreSQL once. An independent consumer
// counts deliveries by message_id: nothing may be lost, and duplicates may not
// exceed what was in flight at the faults (faults × 3 batches × batch_size).
//
// CHAOS_EVENTS sets the size (default 20,000; 100,000 for a full run), CHAOS_RATE the events per second (default: the writing takes
// about 90 s), CHAOS_SEED the fault schedule.
//
// Not parallel: it would compete for the 2 cores with the other tests while
// its servers restart, and its figures are about the relay, not the machine.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos suite: skipped with -short")
	}
	total := envInt(t, "CHAOS_EVENTS", 20000)
	rate := float64(envInt(t, "CHAOS_RATE", max(1, total/90)))
	seed := uint64(time.Now().UnixNano())
	if os.Getenv("CHAOS_SEED") != "" {
		seed = uint64(envInt(t, "CHAOS_SEED", 1))
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	producing := time.Duration(float64(total) / rate * float64(time.Second))
	t.Logf("chaos: %d events at %.0f/s (about %v), seed %d", total, rate, producing.Round(time.Second), seed)

	runStart := time.Now()
	// Everything ends by then: at the default size, under 5 minutes with
	// the servers' start and cleanup.
	deadline := runStart.Add(producing + chaosSlack + chaosDrain - 20*time.Second)
	pgBegin := time.Now()
	pg := testenv.StartPostgres(t)
	rmqBegin := time.Now()
	rmq := testenv.StartRabbitMQ(t)
	// What each fault is expected to take, from the servers' first start on
	// this machine at this moment, raised by every fault measured later: the
	// schedule keeps that much time in hand for the faults still to come, so
	// all of them begin while the producer writes even when a loaded machine
	// makes a RabbitMQ restart take 15 s instead of 5.
	expect := map[string]time.Duration{
		"relay-kill":       500 * time.Millisecond,
		"rabbitmq-restart": time.Since(rmqBegin) + 2*time.Second,
		"postgres-restart": rmqBegin.Sub(pgBegin) + time.Second,
	}
	o := testenv.NewOutboxAt(t, pg.DSN())
	b := testenv.NewBrokerAt(t, rmq.URL())
	queue := b.DurableQueue(t, "#", nil)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	cons := &chaosConsumer{url: rmq.URL(), queue: queue, seen: map[string]int{},
		sentinel: make(chan struct{}, 1), done: make(chan struct{})}
	go cons.run(ctx)
	t.Cleanup(func() { cancel(); <-cons.done }) // before the servers stop

	relays := &relaySupervisor{t: t, env: relayEnv(o, rmq.URL(), b.Exchange,
		"OUTBOX_RELAY_AMQP_CONFIRM_TIMEOUT=5s",
		"OUTBOX_RELAY_RELAY_BATCH_SIZE="+strconv.Itoa(chaosBatch),
		"OUTBOX_RELAY_RELAY_MAX_ATTEMPTS=1000",
		// Keep any charged retry (nack, timeout) inside the drain wait.
		"OUTBOX_RELAY_RELAY_RETRY_MAX_BACKOFF=10s",
		"OUTBOX_RELAY_RELAY_SHUTDOWN_TIMEOUT=5s")}
	relays.start()

	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	prod := &producer{pool: o.Pool, w: w, table: o.Table.Quoted(), total: total, rate: rate,
		done: make(chan struct{})}
	prodCtx, cancelProd := context.WithTimeout(ctx, producing+chaosSlack)
	defer cancelProd()
	go prod.run(prodCtx)
	t.Cleanup(func() { cancelProd(); <-prod.done })

	run := &chaosRun{seed: seed, total: total, start: runStart, rng: rng, expect: expect,
		pg: pg, rmq: rmq, o: o, queue: queue, cons: cons, relays: relays, prod: prod}
	run.injectFaults(t, producing)

	// The producer finishes on its own; the relay is watched meanwhile.
	relays.waitFor(prod.done, time.Until(prod.started().Add(producing+chaosSlack+5*time.Second)), "producer finished")
	if prod.err != nil {
		t.Errorf("producer: %v", prod.err)
	}
	run.awaitDelivery(deadline)
	run.tally()
	run.log(t)
	run.check(t)
	checkTable(t, o, run.ids)
	relays.report(prod.started())
}

// chaosRun is one chaos run's servers, actors and results, filled in step
// by step: injectFaults, awaitDelivery, tally; then log and check.
type chaosRun struct {
	seed   uint64
	total  int
	start  time.Time
	rng    *rand.Rand
	expect map[string]time.Duration // what each kind of fault is expected to take
	pg     *testenv.Postgres
	rmq    *testenv.RabbitMQ
	o      *testenv.Outbox
	queue  string
	cons   *chaosConsumer
	relays *relaySupervisor
	prod   *producer

	// injectFaults
	faults, overlapped int
	timeline           []string
	// awaitDelivery
	written             int
	writeTook           time.Duration
	drainFor, drainTook time.Duration
	settled, barrier    bool
	// tally
	ids                           []string
	received, lost, unknown, dups int
	redelivered, reconnects       int
	consErr                       error
	missing, bursts               string
}

// injectFaults runs the faults, shuffled, over 10%..85% of the producing
// period: each one a random gap after the previous one finished, the gap
// drawn around an even share of the time left once the expected duration of
// the faults still to come is set aside (nextFaultAt).
func (r *chaosRun) injectFaults(t *testing.T, producing time.Duration) {
	var kinds []string
	for range chaosRelayKills {
		kinds = append(kinds, "relay-kill")
	}
	for range chaosRMQ {
		kinds = append(kinds, "rabbitmq-restart")
	}
	for range chaosPG {
		kinds = append(kinds, "postgres-restart")
	}
	r.rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	from, to := producing/10, producing*85/100

	prod := r.prod
	for i, kind := range kinds {
		at := from + time.Duration(r.rng.Int64N(int64(max(from, 1))))
		if i > 0 {
			var reserve time.Duration
			for _, k := range kinds[i:] {
				reserve += r.expect[k]
			}
			at = nextFaultAt(time.Since(prod.started()), to, reserve, len(kinds)-i, r.rng)
		}
		r.relays.waitUntil(prod.started().Add(at))
		before := time.Now()
		written := prod.written.Load()
		if !prod.finished() {
			r.overlapped++
		}
		switch kind {
		case "relay-kill":
			r.relays.killAndRestart()
		case "rabbitmq-restart":
			r.rmq.Restart(t)
		case "postgres-restart":
			r.pg.Restart(t)
		}
		r.expect[kind] = max(r.expect[kind], time.Since(before))
		r.timeline = append(r.timeline, fmt.Sprintf("+%.1fs %s (%v, written %d, received %d)",
			before.Sub(prod.started()).Seconds(), kind, time.Since(before).Round(10*time.Millisecond),
			written, r.cons.unique()))
	}
	r.faults = len(kinds)
}

// awaitDelivery waits, until deadline at the latest, for every written
// event to be received and every row settled, then for a sentinel put
// behind everything the relay published: it arrives after all of it, so the
// duplicate count is final.
func (r *chaosRun) awaitDelivery(deadline time.Time) {
	r.written = int(r.prod.written.Load())
	r.writeTook = r.prod.end.Sub(r.prod.start)
	drainStart := time.Now()
	r.drainFor = min(chaosDrain, time.Until(deadline))
	r.settled = r.relays.poll(r.drainFor, func() bool {
		if r.cons.unique() < r.written {
			return false
		}
		n, err := countRows(r.o.Pool, r.o.Table.Quoted(), "dispatched_at IS NULL AND dead_at IS NULL")
		return err == nil && n == 0
	})
	r.drainTook = time.Since(drainStart)
	if r.settled {
		r.barrier = publishSentinel(r.rmq.URL(), r.queue) == nil && r.relays.waitFor(r.cons.sentinel, 20*time.Second, "")
	}
}

// tally compares what the producer committed with what the consumer saw.
func (r *chaosRun) tally() {
	r.ids = r.prod.ids()
	cons := r.cons
	cons.mu.Lock()
	defer cons.mu.Unlock()
	writtenSet := make(map[string]bool, len(r.ids))
	for _, id := range r.ids {
		writtenSet[id] = true
	}
	for _, id := range r.ids {
		if cons.seen[id] > 0 {
			r.received++
		} else {
			r.lost++
		}
	}
	for id := range cons.seen {
		if !writtenSet[id] {
			r.unknown++
		}
	}
	r.dups, r.redelivered, r.reconnects, r.consErr = cons.deliveries-len(cons.seen), cons.redelivered, cons.reconnects, cons.err
	r.missing = firstMissing(r.ids, cons)
	r.bursts = repeatBursts(cons.repeats, r.prod.started())
}

// log prints the run's figures to the test log and to stdout.
func (r *chaosRun) log(t *testing.T) {
	line := fmt.Sprintf("chaos: written %d, received unique %d, lost %d, duplicates %d", r.written, r.received, r.lost, r.dups)
	t.Log(line)
	fmt.Println(line)
	faultLine := fmt.Sprintf("chaos faults (seed %d): %s; relay processes %d; producer %v (%d retries, %d ambiguous commits: %d had committed); drain %v; consumer reconnects %d, broker redeliveries %d; total %v",
		r.seed, strings.Join(r.timeline, ", "), len(r.relays.procs), r.writeTook.Round(100*time.Millisecond),
		r.prod.retries, r.prod.ambiguous, r.prod.ambiguousCommitted, r.drainTook.Round(100*time.Millisecond),
		r.reconnects, r.redelivered, time.Since(r.start).Round(time.Second))
	t.Log(faultLine)
	fmt.Println(faultLine)
	t.Logf("chaos duplicates by arrival: %s", r.bursts)
}

// check holds the run to the promise: nothing lost, duplicates within what
// was in flight at the faults, nothing unknown, everything written and
// settled, and every fault while the producer wrote.
func (r *chaosRun) check(t *testing.T) {
	bound := r.faults * chaosInFlight * chaosBatch
	if r.lost > 0 {
		t.Errorf("lost %d of %d written events (first: %s)", r.lost, r.written, r.missing)
	}
	if r.dups > bound {
		t.Errorf("duplicates %d exceed the bound of what can be in flight at the faults: %d faults (%d relay kills + %d RabbitMQ restarts + %d PostgreSQL restarts) × %d batches in flight × relay.batch_size %d = %d",
			r.dups, r.faults, chaosRelayKills, chaosRMQ, chaosPG, chaosInFlight, chaosBatch, bound)
	}
	if r.unknown > 0 {
		t.Errorf("%d message ids received that the producer never counted as written", r.unknown)
	}
	if r.written != r.total {
		t.Errorf("producer wrote %d of %d events", r.written, r.total)
	}
	if !r.settled {
		t.Errorf("not settled within %v after the producer finished: received unique %d of %d", r.drainFor.Round(time.Second), r.received, r.written)
	} else if !r.barrier {
		t.Errorf("the sentinel published after the last event did not arrive within 20s")
	}
	if r.consErr != nil {
		t.Errorf("consumer: %v", r.consErr)
	}
	if r.overlapped < r.faults {
		t.Errorf("only %d of %d faults began while the producer was writing: the writing (%v) is too short for the faults (a RabbitMQ restart takes seconds); lower CHAOS_RATE",
			r.overlapped, r.faults, r.writeTook.Round(time.Second))
	}
}

// nextFaultAt returns when (as an offset from the producer's start) the next
// of left faults begins, now being the offset at which the previous one
// ended: a random gap around an even share of the time until to, after
// reserve (what the faults still to come are expected to take) is set aside.
// With no time to share, the next fault follows at once (after 300ms, for
// the relay to be up again).
func nextFaultAt(now, to, reserve time.Duration, left int, rng *rand.Rand) time.Duration {
	const minGap = 300 * time.Millisecond
	share := (to - now - reserve) / time.Duration(left)
	if share <= minGap {
		return now + minGap
	}
	return now + share/2 + time.Duration(rng.Int64N(int64(share)))
}

const sentinelID = "chaos-sentinel"

// publishSentinel puts a confirmed persistent message straight into queue.
func publishSentinel(url, queue string) error {
	conn, ch, err := amqpconn.Channel(url, amqp.Config{Dial: amqp.DefaultDial(5 * time.Second)})
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := ch.Confirm(false); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false,
		amqp.Publishing{MessageId: sentinelID, DeliveryMode: amqp.Persistent, Body: []byte{}})
	if err != nil {
		return err
	}
	if ok, err := dc.WaitContext(ctx); err != nil || !ok {
		return fmt.Errorf("sentinel not confirmed: ok=%v err=%v", ok, err)
	}
	return nil
}

// checkTable: every written event is a row, every row is dispatched, none dead.
func checkTable(t *testing.T, o *testenv.Outbox, ids []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var rows, pending, dead, dispatched, mine, maxAttempts, retried int
	err := o.Pool.QueryRow(ctx, `SELECT count(*),
		count(*) FILTER (WHERE dispatched_at IS NULL AND dead_at IS NULL),
		count(*) FILTER (WHERE dead_at IS NOT NULL),
		count(*) FILTER (WHERE dispatched_at IS NOT NULL),
		count(*) FILTER (WHERE id = ANY($1::uuid[])),
		coalesce(max(attempts), 0),
		count(*) FILTER (WHERE attempts > 0)
		FROM `+o.Rows()+` o`, ids).Scan(&rows, &pending, &dead, &dispatched, &mine, &maxAttempts, &retried)
	if err != nil {
		t.Errorf("read the table: %v", err)
		return
	}
	t.Logf("chaos table: rows %d, dispatched %d, pending %d, dead %d; rows with charged attempts %d (max %d)",
		rows, dispatched, pending, dead, retried, maxAttempts)
	if rows != len(ids) || mine != len(ids) {
		t.Errorf("table holds %d rows, %d of them written by the producer, want exactly the %d written", rows, mine, len(ids))
	}
	if pending != 0 || dead != 0 || dispatched != rows {
		t.Errorf("at the end: %d rows dispatched of %d, %d pending, %d dead; want all dispatched", dispatched, rows, pending, dead)
		var lastErr *string
		if err := o.Pool.QueryRow(ctx, `SELECT last_error FROM `+o.Rows()+
			` o WHERE dispatched_at IS NULL ORDER BY seq LIMIT 1`).Scan(&lastErr); err == nil && lastErr != nil {
			t.Errorf("first undispatched row's last_error: %s", *lastErr)
		}
	}
	if retried > 0 {
		var sample *string
		_ = o.Pool.QueryRow(ctx, `SELECT last_error FROM `+o.Rows()+
			` o WHERE attempts > 0 ORDER BY seq LIMIT 1`).Scan(&sample)
		if sample != nil {
			t.Logf("chaos table: a retried row's last_error: %s", *sample)
		}
	}
}

func countRows(pool *pgxpool.Pool, table, cond string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int
	err := pool.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE "+cond).Scan(&n)
	return n, err
}

// repeatBursts groups repeated deliveries that arrived less than a second
// apart: "+12.3s..+12.9s: 200 (seq 4001..4200, 0 redelivered)", to tell
// which fault each burst of duplicates followed.
func repeatBursts(reps []repeat, start time.Time) string {
	if len(reps) == 0 {
		return "none"
	}
	var out []string
	for i := 0; i < len(reps); {
		j := i + 1
		for j < len(reps) && reps[j].at.Sub(reps[j-1].at) < time.Second {
			j++
		}
		lo, hi, redelivered := reps[i].seq, reps[i].seq, 0
		for _, r := range reps[i:j] {
			lo, hi = min(lo, r.seq), max(hi, r.seq)
			if r.redelivered {
				redelivered++
			}
		}
		out = append(out, fmt.Sprintf("+%.1fs..+%.1fs: %d (seq %d..%d, %d redelivered)",
			reps[i].at.Sub(start).Seconds(), reps[j-1].at.Sub(start).Seconds(), j-i, lo, hi, redelivered))
		i = j
	}
	return strings.Join(out, "; ")
}

// firstMissing returns the first written id never received; c.mu held.
func firstMissing(ids []string, c *chaosConsumer) string {
	for _, id := range ids {
		if c.seen[id] == 0 {
			return id
		}
	}
	return ""
}

// producer writes events in small transactions at a steady rate, riding out
// database restarts. Each event has its id before its first attempt; after a
// commit that failed ambiguously it asks the database whether those ids exist
// before writing them again, and the unique index on id backs that up. An
// event counts as written only once its transaction is known to be committed.
type producer struct {
	pool  *pgxpool.Pool
	w     *outbox.Writer
	table string
	total int
	rate  float64

	written atomic.Int64
	begun   atomic.Int64 // start, unix nanoseconds
	done    chan struct{}

	// Owned by run until done is closed.
	committed                              []string
	retries, ambiguous, ambiguousCommitted int
	start, end                             time.Time
	err                                    error
}

func (p *producer) started() time.Time {
	for p.begun.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	return time.Unix(0, p.begun.Load())
}

func (p *producer) finished() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ids returns the committed ids; only after done.
func (p *producer) ids() []string {
	<-p.done
	return p.committed
}

func (p *producer) run(ctx context.Context) {
	defer close(p.done)
	p.start = time.Now()
	p.begun.Store(p.start.UnixNano())
	defer func() { p.end = time.Now() }()
	for n := 0; n < p.total; {
		due := p.start.Add(time.Duration(float64(n) / p.rate * float64(time.Second)))
		if !sleepCtx(ctx, time.Until(due)) {
			p.err = fmt.Errorf("stopped after %d events: %w", n, ctx.Err())
			return
		}
		events := make([]outbox.Event, min(chaosTxEvents, p.total-n))
		ids := make([]string, len(events))
		for i := range events {
			events[i] = outbox.NewEvent("chaos.event", fmt.Appendf(nil, `{"n":%d}`, n+i))
			events[i].Key = fmt.Sprint("key-", rand.IntN(chaosKeys))
			ids[i] = events[i].ID.String()
		}
		if err := p.commit(ctx, events, ids); err != nil {
			p.err = fmt.Errorf("after %d events: %w", n, err)
			return
		}
		p.committed = append(p.committed, ids...)
		n += len(events)
		p.written.Store(int64(n))
	}
}

// commit writes events in one transaction, retrying until it is known to be
// committed exactly once; it gives up after chaosSlack.
func (p *producer) commit(ctx context.Context, events []outbox.Event, ids []string) error {
	giveUp := time.Now().Add(chaosSlack)
	for attempt := 1; ; attempt++ {
		err := p.try(ctx, events)
		if err == nil {
			return nil
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23505" {
			if attempt == 1 {
				return fmt.Errorf("fresh event ids already exist: %w", err)
			}
			// An earlier, ambiguous attempt committed after all (the
			// existence check ran before it finished): not written twice.
			err = fmt.Errorf("%w: %v", errAmbiguous, err)
		}
		if errors.Is(err, errAmbiguous) {
			p.ambiguous++
			n, cerr := p.countIDs(ctx, ids, giveUp)
			if cerr != nil {
				return fmt.Errorf("check ids after an ambiguous commit (%v): %w", err, cerr)
			}
			switch n {
			case len(ids):
				p.ambiguousCommitted++
				return nil
			case 0: // rolled back: write again
			default:
				return fmt.Errorf("%d of the %d events of one transaction exist", n, len(ids))
			}
		}
		if time.Now().After(giveUp) {
			return fmt.Errorf("giving up after %d attempts: %w", attempt, err)
		}
		p.retries++
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return ctx.Err()
		}
	}
}

var errAmbiguous = errors.New("commit failed: the transaction may have committed")

func (p *producer) try(ctx context.Context, events []outbox.Event) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tx, err := p.pool.Begin(ctx)
	if err != nil {
		return err
	}
	if err := p.w.Write(ctx, tx, events...); err != nil {
		_ = tx.Rollback(ctx)
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("%w: %v", errAmbiguous, err)
	}
	return nil
}

// countIDs counts how many of ids exist, retrying while the database is away.
func (p *producer) countIDs(ctx context.Context, ids []string, giveUp time.Time) (int, error) {
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var n int
		err := p.pool.QueryRow(qctx, "SELECT count(*) FROM "+p.table+" WHERE id = ANY($1::uuid[])", ids).Scan(&n)
		cancel()
		if err == nil {
			return n, nil
		}
		if time.Now().After(giveUp) {
			return 0, err
		}
		if !sleepCtx(ctx, 200*time.Millisecond) {
			return 0, ctx.Err()
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// chaosConsumer counts deliveries by message_id on a connection of its own,
// redialling after broker restarts. It acks manually after counting: with
// auto-ack, deliveries the client library had buffered when the connection
// closed would be dropped (amqp091-go discards them) although the broker
// considers them delivered; unacked ones are requeued and delivered again.
type chaosConsumer struct {
	url, queue string
	sentinel   chan struct{}
	done       chan struct{}

	mu          sync.Mutex
	seen        map[string]int // deliveries per message id
	deliveries  int
	redelivered int // deliveries of a seen id flagged redelivered by the broker
	reconnects  int
	repeats     []repeat // every delivery of an id already seen
	err         error
}

// repeat is one delivery of a message id already seen.
type repeat struct {
	at          time.Time
	seq         int64
	redelivered bool
}

func (c *chaosConsumer) unique() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

func (c *chaosConsumer) run(ctx context.Context) {
	defer close(c.done)
	var downSince time.Time
	connected := false
	for ctx.Err() == nil {
		conn, deliveries, err := c.connect()
		if err != nil {
			if downSince.IsZero() {
				downSince = time.Now()
			}
			if time.Since(downSince) > chaosReconnect {
				c.mu.Lock()
				c.err = fmt.Errorf("could not reconnect within %v: %w", chaosReconnect, err)
				c.mu.Unlock()
				return
			}
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		if connected {
			c.mu.Lock()
			c.reconnects++
			c.mu.Unlock()
		}
		connected, downSince = true, time.Time{}
		c.consume(ctx, deliveries)
		_ = conn.Close()
	}
}

func (c *chaosConsumer) connect() (*amqp.Connection, <-chan amqp.Delivery, error) {
	conn, err := amqp.DialConfig(c.url, amqp.Config{Heartbeat: 5 * time.Second, Dial: amqp.DefaultDial(2 * time.Second)})
	if err != nil {
		return nil, nil, err
	}
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Qos(500, 0, false)
	}
	if err == nil {
		// Passive: a queue lost in a restart must show, not be recreated empty.
		_, err = ch.QueueDeclarePassive(c.queue, true, false, false, false, nil)
	}
	var deliveries <-chan amqp.Delivery
	if err == nil {
		deliveries, err = ch.Consume(c.queue, "chaos-consumer", false, false, false, false, nil)
	}
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	return conn, deliveries, nil
}

func (c *chaosConsumer) consume(ctx context.Context, deliveries <-chan amqp.Delivery) {
	for {
		select {
		case <-ctx.Done():
			return
		case d, ok := <-deliveries:
			if !ok {
				return
			}
			if d.MessageId == sentinelID {
				select {
				case c.sentinel <- struct{}{}:
				default:
				}
			} else {
				c.mu.Lock()
				if c.seen[d.MessageId] > 0 {
					if d.Redelivered {
						c.redelivered++
					}
					seq, _ := d.Headers[relay.HeaderSeq].(int64)
					c.repeats = append(c.repeats, repeat{at: time.Now(), seq: seq, redelivered: d.Redelivered})
				}
				c.seen[d.MessageId]++
				c.deliveries++
				c.mu.Unlock()
			}
			_ = d.Ack(false) // if the ack is lost, the message comes again
		}
	}
}

// relaySupervisor runs one relay process at a time, restarts it after each
// SIGKILL, and notices (and reports) a relay that exits on its own.
type relaySupervisor struct {
	t       *testing.T
	env     []string
	procs   []*relayProc
	killed  map[*relayProc]bool
	exited  []string
	current *relayProc
}

func (s *relaySupervisor) start() {
	if s.killed == nil {
		s.killed = map[*relayProc]bool{}
	}
	s.current = startRelay(s.t, s.env)
	s.procs = append(s.procs, s.current)
}

func (s *relaySupervisor) killAndRestart() {
	s.check()
	s.killed[s.current] = true
	s.current.kill(s.t)
	s.start()
}

// check restarts the relay if it exited without being killed.
func (s *relaySupervisor) check() {
	select {
	case <-s.current.done:
	default:
		return
	}
	p := s.current
	msg := fmt.Sprintf("relay pid %d exited on its own (%v); last output:\n%s", p.cmd.Process.Pid, p.err, tail(p.out.String(), 20))
	s.exited = append(s.exited, msg)
	s.t.Error(msg)
	if len(s.exited) > 3 {
		s.t.Fatalf("the relay exited on its own %d times: giving up", len(s.exited))
	}
	s.start()
}

// waitUntil sleeps until at, watching the relay.
func (s *relaySupervisor) waitUntil(at time.Time) {
	for time.Now().Before(at) {
		s.check()
		time.Sleep(min(100*time.Millisecond, time.Until(at)))
	}
}

// waitFor waits for ch up to timeout, watching the relay; if what is not
// empty, a timeout fails the test with it.
func (s *relaySupervisor) waitFor(ch <-chan struct{}, timeout time.Duration, what string) bool {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-ch:
			return true
		case <-time.After(100 * time.Millisecond):
		}
		s.check()
		if time.Now().After(deadline) {
			if what != "" {
				s.t.Errorf("not within %v: %s", timeout, what)
			}
			return false
		}
	}
}

// poll checks cond every 100ms until it holds or timeout passes, watching the relay.
func (s *relaySupervisor) poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		s.check()
		time.Sleep(100 * time.Millisecond)
	}
	return true
}

// report logs what the relay processes logged: lines per level and the
// messages above debug with their counts, to spot floods and errors, and
// when each link went down and came back (seconds after start), to set
// against the faults.
func (s *relaySupervisor) report(start time.Time) {
	for i, p := range s.procs {
		how := "running at the end"
		switch {
		case s.killed[p]:
			how = "SIGKILLed"
		case p != s.current:
			how = "exited on its own"
		}
		counts := map[string]int{}
		var links []string
		lines := 0
		for _, l := range strings.Split(strings.TrimSpace(p.out.String()), "\n") {
			if l == "" {
				continue
			}
			lines++
			f := strings.Split(l, "\t")
			if len(f) < 3 {
				counts["(unparsed) "+l]++
				continue
			}
			key := f[1]
			for _, part := range f[2:min(len(f), 4)] {
				if !strings.HasPrefix(part, "{") {
					key += " " + part
				}
			}
			if strings.Contains(key, "link down") && len(f) > 4 {
				key += " " + linkOf(f[len(f)-1])
			}
			counts[key]++
			if msg := f[len(f)-2]; strings.HasPrefix(msg, "link ") && len(f) > 4 {
				if ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", f[0]); err == nil {
					links = append(links, fmt.Sprintf("%+.1fs %s %s", ts.Sub(start).Seconds(), strings.TrimPrefix(msg, "link "), linkOf(f[len(f)-1])))
				}
			}
		}
		keys := make([]string, 0, len(counts))
		for k := range counts {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var parts []string
		for _, k := range keys {
			parts = append(parts, fmt.Sprintf("%s ×%d", k, counts[k]))
			if counts[k] > 50 {
				s.t.Errorf("relay %d logged %q %d times: a flood", i+1, k, counts[k])
			}
		}
		s.t.Logf("relay %d (pid %d, %s): %d log lines: %s; links: %s", i+1, p.cmd.Process.Pid, how, lines,
			strings.Join(parts, "; "), strings.Join(links, ", "))
	}
}

// linkOf extracts the link name from a console line's JSON fields.
func linkOf(fields string) string {
	_, after, ok := strings.Cut(fields, `"link": "`)
	if !ok {
		return ""
	}
	link, _, _ := strings.Cut(after, `"`)
	return "(" + link + ")"
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestNextFaultAt(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		now := time.Duration(rng.Int64N(int64(60 * time.Second)))
		reserve := time.Duration(rng.Int64N(int64(40 * time.Second)))
		left := 1 + rng.IntN(7)
		to := 76 * time.Second
		at := nextFaultAt(now, to, reserve, left, rng)
		share := (to - now - reserve) / time.Duration(left)
		switch {
		case share <= 300*time.Millisecond:
			if at != now+300*time.Millisecond {
				t.Fatalf("no time to share (now %v, reserve %v, left %d): got %v, want now+300ms", now, reserve, left, at)
			}
		case at < now+share/2 || at >= now+share*3/2:
			t.Fatalf("now %v, reserve %v, left %d: got %v, want within [%v, %v)", now, reserve, left, at, now+share/2, now+share*3/2)
		}
	}
	// The faults still to come fit: with the whole budget reserved, the
	// next one starts at once.
	if at := nextFaultAt(10*time.Second, 76*time.Second, 70*time.Second, 3, rng); at != 10300*time.Millisecond {
		t.Fatalf("budget exhausted: got %v, want 10.3s", at)
	}
}
