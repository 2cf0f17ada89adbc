package testenv_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func TestPrivatePostgres(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	begin := time.Now()
	pg := testenv.StartPostgres(t)
	t.Logf("start: %v", time.Since(begin).Round(time.Millisecond))

	exec := func(sql string) {
		t.Helper()
		conn, err := pgx.Connect(ctx, pg.DSN())
		if err != nil {
			t.Fatalf("connect %s: %v", pg.DSN(), err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	count := func() int {
		t.Helper()
		conn, err := pgx.Connect(ctx, pg.DSN())
		if err != nil {
			t.Fatalf("connect %s: %v", pg.DSN(), err)
		}
		defer conn.Close(ctx)
		var n int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil {
			t.Fatalf("count: %v", err)
		}
		return n
	}

	exec("CREATE TABLE t (id int PRIMARY KEY)")
	exec("INSERT INTO t VALUES (1)")

	// A connection open across the restart must see it drop.
	held, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer held.Close(ctx)

	begin = time.Now()
	pg.Restart(t)
	t.Logf("restart (stop -m fast + start): %v", time.Since(begin).Round(time.Millisecond))
	if err := held.Ping(ctx); err == nil {
		t.Errorf("connection opened before the restart still works")
	}
	if n := count(); n != 1 {
		t.Fatalf("rows after restart = %d, want 1", n)
	}

	exec("INSERT INTO t VALUES (2)")
	begin = time.Now()
	pg.Kill(t)
	killed := time.Since(begin)
	begin = time.Now()
	pg.Start(t)
	t.Logf("kill: %v, start with crash recovery: %v", killed.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
	if n := count(); n != 2 {
		t.Fatalf("rows after kill and start = %d, want 2 (committed rows must survive a crash)", n)
	}
}

func TestPrivateRabbitMQ(t *testing.T) {
	t.Parallel()

	begin := time.Now()
	rmq := testenv.StartRabbitMQ(t)
	t.Logf("start: %v", time.Since(begin).Round(time.Millisecond))

	const queue = "testenv-durable"
	dial := func() (*amqp.Connection, *amqp.Channel) {
		t.Helper()
		conn, err := amqp.Dial(rmq.URL())
		if err != nil {
			t.Fatalf("dial %s: %v", rmq.URL(), err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		ch, err := conn.Channel()
		if err != nil {
			t.Fatalf("channel: %v", err)
		}
		return conn, ch
	}
	messages := func() int {
		t.Helper()
		_, ch := dial()
		q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
		if err != nil {
			t.Fatalf("queue %s: %v", queue, err)
		}
		return q.Messages
	}

	conn, ch := dial()
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		t.Fatalf("declare: %v", err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatalf("confirm: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false,
		amqp.Publishing{DeliveryMode: amqp.Persistent, Body: []byte("survives")})
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if ok, err := confirm.WaitContext(ctx); err != nil || !ok {
		t.Fatalf("confirm: ok=%v err=%v", ok, err)
	}

	begin = time.Now()
	rmq.Restart(t)
	t.Logf("restart (graceful stop + start): %v", time.Since(begin).Round(time.Millisecond))
	if !conn.IsClosed() {
		t.Errorf("connection opened before the restart is still open")
	}
	if n := messages(); n != 1 {
		t.Fatalf("messages after restart = %d, want 1 (durable queue, persistent message)", n)
	}
	if out := rmq.Ctl(t, "list_queues", "name", "messages"); !strings.Contains(out, queue) {
		t.Errorf("rabbitmqctl list_queues does not show %s:\n%s", queue, out)
	}

	begin = time.Now()
	rmq.Kill(t)
	killed := time.Since(begin)
	begin = time.Now()
	rmq.Start(t)
	t.Logf("kill: %v, start after kill: %v", killed.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
	if n := messages(); n != 1 {
		t.Fatalf("messages after kill and start = %d, want 1", n)
	}
}
