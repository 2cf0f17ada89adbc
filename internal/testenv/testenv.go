// Package testenv gives each test its own outbox schema in the real
// PostgreSQL and its own exchange and queues in the real RabbitMQ, so tests
// run in parallel and leave nothing behind.
package testenv

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/schema"
)

// DatabaseURL is the shared PostgreSQL: TEST_DATABASE_URL or the local one.
func DatabaseURL() string {
	return cmp.Or(os.Getenv("TEST_DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
}

// AMQPURL is the shared RabbitMQ: TEST_AMQP_URL or the local one.
func AMQPURL() string {
	return cmp.Or(os.Getenv("TEST_AMQP_URL"), "amqp://guest:guest@127.0.0.1:5672/")
}

// Name returns a short unique lowercase identifier with the given prefix.
func Name(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + "_" + hex.EncodeToString(b)
}

// Outbox is a migrated outbox table in a schema of its own.
type Outbox struct {
	DSN    string
	Pool   *pgxpool.Pool
	Schema string
	Table  ident.Table
}

// NewOutbox creates a fresh schema in the shared database, migrates the
// outbox table into it and drops it when the test ends.
func NewOutbox(t testing.TB) *Outbox {
	t.Helper()
	return NewOutboxAt(t, DatabaseURL())
}

// NewOutboxAt is NewOutbox against the database at dsn.
func NewOutboxAt(t testing.TB, dsn string) *Outbox {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	o := &Outbox{DSN: dsn, Pool: pool, Schema: Name("t"), Table: ident.Table{Name: "outbox"}}
	o.Table.Schema = o.Schema
	t.Cleanup(func() {
		// Use a fresh pool: the test may have killed connections of this one.
		defer pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+ident.Quote(o.Schema)+" CASCADE"); err != nil {
			t.Logf("drop schema %s: %v", o.Schema, err)
		}
	})
	o.Migrate(t)
	return o
}

// Migrate runs the migrations up on the outbox's schema.
func (o *Outbox) Migrate(t testing.TB) {
	t.Helper()
	db := o.DB(t)
	m, err := schema.NewMigrator(db, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatalf("migrate up: %v", err)
	}
}

// DB returns a database/sql handle on the outbox's database, closed at cleanup.
func (o *Outbox) DB(t testing.TB) *sql.DB {
	t.Helper()
	db := stdlib.OpenDBFromPool(o.Pool)
	t.Cleanup(func() { db.Close() })
	return db
}

// Archive is the quoted name of the table's archive, where the relay moves
// the rows it marks dispatched.
func (o *Outbox) Archive() string { return outboxsql.Archive(o.Table) }

// Rows is a subquery over the outbox table and its archive together, to
// select from (FROM " + o.Rows() + " o) where a row's table does not matter.
func (o *Outbox) Rows() string {
	return "(SELECT " + outboxsql.Columns + " FROM " + o.Table.Quoted() +
		" UNION ALL SELECT " + outboxsql.Columns + " FROM " + o.Archive() + ")"
}

// ArchiveRows moves the outbox rows matching cond to the archive, as the
// relay's mark does but keeping their dispatched_at (which must be set), so
// a test can model history dispatched at any time. It returns how many.
func (o *Outbox) ArchiveRows(t testing.TB, cond string, args ...any) int {
	t.Helper()
	q := "WITH m AS (DELETE FROM " + o.Table.Quoted() + " WHERE " + cond + " RETURNING " + outboxsql.Columns + ")" +
		" INSERT INTO " + o.Archive() + " (" + outboxsql.Columns + ") SELECT " + outboxsql.Columns + " FROM m ORDER BY dispatched_at"
	tag, err := o.Pool.Exec(context.Background(), q, args...)
	if err != nil {
		t.Fatalf("archive %s: %v", cond, err)
	}
	return int(tag.RowsAffected())
}

// Count returns the number of events matching the SQL condition cond
// ("true" for all), over the outbox table and its archive together: a row
// marked dispatched counts where it is now. cond is test code, never user
// input.
func (o *Outbox) Count(t testing.TB, cond string, args ...any) int {
	t.Helper()
	var n int
	q := "SELECT count(*) FROM " + o.Rows() + " o WHERE " + cond
	if err := o.Pool.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatalf("count %s: %v", cond, err)
	}
	return n
}

// Broker is a test's own exchange on a RabbitMQ server.
type Broker struct {
	URL      string
	Exchange string
	conn     *amqp.Connection
}

// NewBroker declares a uniquely named durable topic exchange on the shared
// RabbitMQ and deletes it (and the test's queues) when the test ends.
func NewBroker(t testing.TB) *Broker {
	t.Helper()
	return NewBrokerAt(t, AMQPURL())
}

// NewBrokerAt is NewBroker on the server at url.
func NewBrokerAt(t testing.TB, url string) *Broker {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	b := &Broker{URL: url, Exchange: Name("x"), conn: conn}
	ch := b.channel(t)
	if err := ch.ExchangeDeclare(b.Exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatalf("declare exchange: %v", err)
	}
	t.Cleanup(func() {
		conn.Close()
		deleteExchange(url, b.Exchange)
	})
	return b
}

// DeleteAtCleanup deletes the exchange name, which the test declares on
// the broker itself, when the test ends.
func (b *Broker) DeleteAtCleanup(t testing.TB, name string) {
	t.Cleanup(func() { deleteExchange(b.URL, name) })
}

// deleteExchange deletes exchange name on a connection of its own, as
// the queues are: a test may have had the broker close its connection (and
// a relay may have declared the exchange again meanwhile), and the
// exchange must go all the same. A broker that is gone (a private one)
// took its exchanges with it.
func deleteExchange(url, name string) {
	c, err := amqp.Dial(url)
	if err != nil {
		return
	}
	defer c.Close()
	if ch, err := c.Channel(); err == nil {
		_ = ch.ExchangeDelete(name, false, false)
	}
}

// ExchangeExists reports, by a passive declare, whether the broker has an
// exchange called name; nil means it does.
func (b *Broker) ExchangeExists(name string) error {
	ch, err := b.conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	return ch.ExchangeDeclarePassive(name, "topic", true, false, false, false, nil)
}

// Channel opens a channel on the broker's connection, closed at cleanup.
func (b *Broker) Channel(t testing.TB) *amqp.Channel {
	t.Helper()
	ch := b.channel(t)
	t.Cleanup(func() { ch.Close() })
	return ch
}

func (b *Broker) channel(t testing.TB) *amqp.Channel {
	t.Helper()
	ch, err := b.conn.Channel()
	if err != nil {
		t.Fatalf("open channel: %v", err)
	}
	return ch
}

// Queue declares a queue bound to the test's exchange with bindingKey
// ("#" for everything) and extra arguments; it is deleted at cleanup.
func (b *Broker) Queue(t testing.TB, bindingKey string, args amqp.Table) string {
	t.Helper()
	return b.queue(t, bindingKey, args, false)
}

// DurableQueue is Queue for a durable queue: it and its persistent messages
// survive a broker restart. It is deleted at cleanup if the broker runs
// then.
func (b *Broker) DurableQueue(t testing.TB, bindingKey string, args amqp.Table) string {
	t.Helper()
	return b.queue(t, bindingKey, args, true)
}

func (b *Broker) queue(t testing.TB, bindingKey string, args amqp.Table, durable bool) string {
	t.Helper()
	ch := b.channel(t)
	defer ch.Close()
	q, err := ch.QueueDeclare(Name("q"), durable, false, false, false, args)
	if err != nil {
		t.Fatalf("declare queue: %v", err)
	}
	if err := ch.QueueBind(q.Name, bindingKey, b.Exchange, false, nil); err != nil {
		t.Fatalf("bind queue: %v", err)
	}
	t.Cleanup(func() {
		conn, err := amqp.Dial(b.URL)
		if err != nil {
			return
		}
		defer conn.Close()
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(q.Name, false, false, false)
		}
	})
	return q.Name
}

// Consume returns the deliveries of queue (auto-ack), on a connection of its
// own that closes at cleanup.
func (b *Broker) Consume(t testing.TB, queue string) <-chan amqp.Delivery {
	t.Helper()
	conn, err := amqp.Dial(b.URL)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	if err := ch.Qos(1000, 0, false); err != nil {
		t.Fatalf("qos: %v", err)
	}
	d, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	return d
}

// Receive collects n deliveries (or anything a consumer sends, such as
// deliveries stamped with their arrival time), failing the test if they do
// not all arrive within timeout.
func Receive[T any](t testing.TB, d <-chan T, n int, timeout time.Duration) []T {
	t.Helper()
	out := make([]T, 0, n)
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for len(out) < n {
		select {
		case m, ok := <-d:
			if !ok {
				t.Fatalf("consumer closed after %d of %d messages", len(out), n)
			}
			out = append(out, m)
		case <-deadline.C:
			t.Fatalf("received %d of %d messages within %s", len(out), n, timeout)
		}
	}
	return out
}

// Eventually polls cond every few milliseconds until it holds, failing the
// test with msg if it does not within timeout.
func Eventually(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", timeout, msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Quiet reports whether no message arrives on d within d: used only to show
// that something did NOT happen (a rolled-back event), after a positive
// control proved the pipeline delivers.
func Quiet(d <-chan amqp.Delivery, wait time.Duration) (amqp.Delivery, bool) {
	select {
	case m := <-d:
		return m, false
	case <-time.After(wait):
		return amqp.Delivery{}, true
	}
}
