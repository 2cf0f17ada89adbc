package relay_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// TestOrderedIgnoresReadersAndOtherDatabases: while a transaction in another
// database writes to a table with the outbox table's OID (a clone of the
// same template) and stays open, and a reader with a transaction id holds
// ACCESS SHARE on the outbox table and stays open, keyed events written and
// committed meanwhile are delivered in order: neither could have drawn a
// seq of this outbox, so neither holds back the commit horizon.
func TestOrderedIgnoresReadersAndOtherDatabases(t *testing.T) {
	t.Parallel()
	// A server of its own: cloning a database needs it free of sessions.
	pg := testenv.StartPostgres(t)
	ctx := context.Background()
	admin, err := pgxpool.New(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec(ctx, `CREATE DATABASE app`); err != nil {
		t.Fatal(err)
	}
	appDSN := strings.Replace(pg.DSN(), "/test?", "/app?", 1)
	o, b := testenv.NewOutboxAt(t, appDSN), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	o.Pool.Reset() // no session on app while it is cloned
	if _, err := admin.Exec(ctx, `CREATE DATABASE app_copy TEMPLATE app`); err != nil {
		t.Fatal(err)
	}
	copyConn, err := pgx.Connect(ctx, strings.Replace(pg.DSN(), "/test?", "/app_copy?", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer copyConn.Close(ctx)

	// In the clone: an open writer of the table with the same OID.
	elsewhere, err := copyConn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer elsewhere.Rollback(ctx)
	if _, err := elsewhere.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload) VALUES ('elsewhere', '{}')`); err != nil {
		t.Fatal(err)
	}
	// In app: an open reader of the outbox table with a transaction id.
	reader, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback(ctx)
	if _, err := reader.Exec(ctx, `SELECT pg_current_xact_id(), (SELECT count(*) FROM `+o.Table.Quoted()+`)`); err != nil {
		t.Fatal(err)
	}
	// Both hold locks on the outbox table's OID, as pg_locks shows them.
	var modes []string
	rows, err := o.Pool.Query(ctx, `SELECT mode || CASE WHEN database = (SELECT oid FROM pg_database WHERE datname = current_database())
	  THEN ' here' ELSE ' elsewhere' END FROM pg_locks WHERE locktype = 'relation' AND relation = $1::regclass ORDER BY 1`, o.Table.Quoted())
	if err != nil {
		t.Fatal(err)
	}
	if modes, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(modes) != "[AccessShareLock here RowExclusiveLock elsewhere]" {
		t.Fatalf("locks on the outbox table's OID: %v; the test would prove nothing", modes)
	}

	cfg := orderedConfig(o, b)
	start(t, cfg)
	deliversOneKeyInOrder(t, o, deliveries)
}

// hangingPublisher is the real AMQP publisher whose Send blocks while hang
// is closed over: a claim loop stuck inside the process (a deadlock, a
// wedged call) with its database sessions alive.
type hangingPublisher struct {
	*rabbitmq.Publisher
	hang    atomic.Bool
	release chan struct{}
}

func (p *hangingPublisher) Send(ctx context.Context, msgs []relay.Message) relay.Pending {
	if p.hang.Load() {
		<-p.release
	}
	return p.Publisher.Send(ctx, msgs)
}

// TestOrderedStuckLoopGivesUpPartitions: an ordered relay whose claim loop
// hangs with its connections up stops holding its partitions within the
// lease timeout, another replica takes them and delivers the keys' new
// events, and the stuck relay reports itself not live until its loop turns
// again.
func TestOrderedStuckLoopGivesUpPartitions(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	cfg := orderedConfig(o, b)
	cfg.Relay.LeaseTimeout = 2 * time.Second
	pub := &hangingPublisher{Publisher: testenv.NewAMQPPublisher(t, cfg.WithDefaults().AMQP, 500, zaptest.NewLogger(t)), release: make(chan struct{})}
	stuck := testenv.StartRelay(t, cfg, testenv.WithLogger(zaptest.NewLogger(t).Named("stuck")), testenv.WithPublisher(pub)).Relay
	defer close(pub.release)
	holds := func() int {
		list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, ow := range list {
			n = max(n, len(ow.Partitions))
		}
		return n
	}
	testenv.Eventually(t, 10*time.Second, "the first relay holding all 8 partitions", func() bool { return holds() == 8 })
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	write := func(i int) string {
		e := outbox.NewEvent("lesson.updated", fmt.Appendf(nil, `{"i":%d}`, i))
		e.Key = fmt.Sprint("lesson-", i)
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, e) }); err != nil {
			t.Fatal(err)
		}
		return e.ID.String()
	}
	pub.hang.Store(true)
	stuckOn := write(0) // the first relay claims it and hangs sending it
	other := start(t, cfg)
	testenv.Eventually(t, 10*time.Second, "the stuck relay not live", func() bool { return stuck.Live() != nil })
	// Measured from the loop's last turn, which may precede the write: the
	// turn that claims a row begins before its claim query runs.
	if since := time.Since(relay.LastTurn(stuck)); since < cfg.Relay.LeaseTimeout {
		t.Fatalf("not live %v after the loop's last turn, before relay.lease_timeout %v", since, cfg.Relay.LeaseTimeout)
	}
	if other.Live() != nil {
		t.Fatalf("the working relay is not live: %v", other.Live())
	}
	// Its keys move: events written now arrive through the other relay,
	// and so does the one it hangs on, once the server has ended the
	// stuck claim's transaction (idle for relay.lease_timeout).
	want := []string{stuckOn}
	for i := 1; i <= 5; i++ {
		want = append(want, write(i))
	}
	got := map[string]bool{}
	for _, d := range testenv.Receive(t, deliveries, len(want), 15*time.Second) {
		got[d.MessageId] = true
	}
	for _, id := range want {
		if !got[id] {
			t.Fatalf("event %s not delivered while the first relay was stuck", id)
		}
	}
	pub.hang.Store(false)
	pub.release <- struct{}{}
	testenv.Eventually(t, 10*time.Second, "the unstuck relay live again", func() bool { return stuck.Live() == nil })
}
