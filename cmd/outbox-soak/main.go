// Command outbox-soak pushes many events through a relay with retention on
// and reports whether the table stays bounded: table and index sizes, dead
// tuples, and the claim query's plan, sampled as it runs. It uses its own
// schema and exchange and removes them at the end.
//
//	go run ./cmd/outbox-soak -events 1000000
package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/internal/amqpconn"
	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
	"github.com/outbox-relay/outbox-relay/schema"
)

func main() { os.Exit(run()) }

func run() int {
	events := flag.Int("events", 1_000_000, "events to push through the relay")
	perTx := flag.Int("per-tx", 100, "events per producer transaction")
	rate := flag.Int("rate", 5000, "events per second the producer offers")
	keep := flag.Duration("retention", 10*time.Second, "retention.dispatched for the run")
	sample := flag.Duration("sample", 10*time.Second, "how often to sample sizes")
	dsn := flag.String("dsn", cmp.Or(os.Getenv("TEST_DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"), "PostgreSQL URL")
	amqpURL := flag.String("amqp", cmp.Or(os.Getenv("TEST_AMQP_URL"), "amqp://guest:guest@127.0.0.1:5672/"), "RabbitMQ URL")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := soak(ctx, *dsn, *amqpURL, *events, *perTx, *rate, *keep, *sample); err != nil {
		fmt.Fprintln(os.Stderr, "outbox-soak:", err)
		return 1
	}
	return 0
}

type sizes struct {
	at                  time.Duration
	written, dispatched int64
	rows, deadTuples    int64
	table, indexes      int64 // bytes
	pendingIndex        int64
	archive             int64 // bytes of the archive of dispatched rows, with its indexes
	plan                string
}

func soak(ctx context.Context, dsn, amqpURL string, events, perTx, rate int, keep, every time.Duration) error {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	name := fmt.Sprintf("soak_%d", time.Now().UnixNano()%1e9)
	t := ident.Table{Schema: name, Name: "outbox"}
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+ident.Quote(name)+" CASCADE")
	db := stdlib.OpenDBFromPool(pool)
	m, err := schema.NewMigrator(db, name, "outbox")
	if err == nil {
		_, err = m.Up(ctx)
	}
	db.Close()
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	w, err := outbox.NewWriter(t.Schema, t.Name)
	if err != nil {
		return err
	}
	// Autovacuum per table as a platform team would set it for an outbox:
	// the default scale factor (20% of the table) lets dead tuples pile up.
	if _, err := pool.Exec(ctx, "ALTER TABLE "+t.Quoted()+" SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 10000)"); err != nil {
		return err
	}

	conn, ch, err := amqpconn.Channel(amqpURL, amqp.Config{Heartbeat: 10 * time.Second, Properties: amqp.Table{"connection_name": name}})
	if err != nil {
		return err
	}
	defer conn.Close()
	exchange := name
	if err := ch.ExchangeDeclare(exchange, "topic", false, true, false, false, nil); err != nil {
		return err
	}
	// A queue that drops what it is given, so the broker keeps nothing.
	q, err := ch.QueueDeclare("", false, true, true, false, amqp.Table{"x-max-length": int32(0)})
	if err != nil {
		return err
	}
	if err := ch.QueueBind(q.Name, "#", exchange, false, nil); err != nil {
		return err
	}

	mets, err := metrics.New(prometheus.NewRegistry(), metrics.Config{})
	if err != nil {
		return err
	}
	declare := false
	cfg := relay.Config{
		Postgres:  relay.PostgresConfig{DSN: dsn, Schema: name},
		AMQP:      relay.AMQPConfig{URL: amqpURL, Exchange: exchange, DeclareExchange: &declare},
		Retention: relay.RetentionConfig{Dispatched: keep, Interval: time.Second, BatchSize: 5000},
	}.WithDefaults().WithAppNames()
	relayPoolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return err
	}
	relayPool, err := pgxpool.NewWithConfig(ctx, relayPoolCfg)
	if err != nil {
		return err
	}
	defer relayPool.Close()
	pub, err := rabbitmq.NewForRelay(cfg, zap.NewNop(), mets)
	if err != nil {
		return err
	}
	r, err := relay.New(cfg, relay.Deps{Logger: zap.NewNop(), Metrics: mets, Pool: relayPool, Publisher: pub})
	if err != nil {
		return err
	}
	rctx, cancelRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(rctx) }()
	defer func() { cancelRelay(); <-relayDone }()

	start := time.Now()
	var written int64
	produced := make(chan error, 1)
	go func() {
		body := bytes.Repeat([]byte("x"), 200)
		batch := make([]outbox.Event, 0, perTx)
		for written < int64(events) && ctx.Err() == nil {
			if due := start.Add(time.Duration(float64(written) / float64(rate) * float64(time.Second))); time.Now().Before(due) {
				time.Sleep(time.Until(due))
			}
			batch = batch[:0]
			for g := 1; g <= min(perTx, events-int(written)); g++ {
				e := outbox.NewEvent("lesson.progressed", body)
				e.Key = "learner-" + strconv.Itoa(g%1000)
				batch = append(batch, e)
			}
			if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, batch...) }); err != nil {
				produced <- err
				return
			}
			written += int64(len(batch))
		}
		produced <- nil
	}()

	fmt.Printf("soak: %d events of 200 bytes at %d/s into %s, retention.dispatched %s, sampling every %s\n", events, rate, t, keep, every)
	var autovacuum string
	if err := pool.QueryRow(ctx, "SHOW autovacuum").Scan(&autovacuum); err != nil {
		return err
	}
	manualVacuum := autovacuum != "on"
	if manualVacuum {
		// Without vacuum no table that sees updates or deletes stays
		// bounded; stand in for autovacuum rather than measure its absence.
		fmt.Println("soak: autovacuum is off on this server: the soak runs a plain VACUUM of the table and its archive at every sample instead")
	}
	fmt.Println("at       written   dispatched  rows      dead_tup  table_MB  indexes_MB  pending_idx_kB  archive_MB  claim_plan")
	var samples []sizes
	tick := time.NewTicker(every)
	defer tick.Stop()
	producerDone := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-produced:
			if err != nil {
				return fmt.Errorf("producer: %w", err)
			}
			producerDone = true
			produced = nil
		case <-tick.C:
		}
		if manualVacuum {
			if _, err := pool.Exec(ctx, "VACUUM "+t.Quoted()+", "+outboxsql.Archive(t)); err != nil {
				return fmt.Errorf("vacuum: %w", err)
			}
		}
		s, err := sample(ctx, pool, t, mets, time.Since(start))
		if err != nil {
			return err
		}
		s.written = written
		samples = append(samples, s)
		fmt.Printf("%-8s %-9d %-11d %-9d %-9d %-9.1f %-11.1f %-15.1f %-11.1f %s\n", s.at.Round(time.Second), s.written, s.dispatched,
			s.rows, s.deadTuples, mb(s.table), mb(s.indexes), float64(s.pendingIndex)/1024, mb(s.archive), s.plan)
		if producerDone && s.dispatched >= int64(events) && time.Since(start) > 3*keep {
			break
		}
	}
	var maxTable, maxIdx, maxDead, maxArchive int64
	for _, s := range samples {
		maxTable, maxIdx, maxDead = max(maxTable, s.table), max(maxIdx, s.indexes), max(maxDead, s.deadTuples)
		maxArchive = max(maxArchive, s.archive)
	}
	last := samples[len(samples)-1]
	fmt.Printf("soak result: %d events in %s; max table %.1f MB, max indexes %.1f MB, max dead tuples %d, max archive %.1f MB; at the end %d rows, table %.1f MB, indexes %.1f MB, dead tuples %d, archive %.1f MB; claim plan: %s\n",
		events, last.at.Round(time.Second), mb(maxTable), mb(maxIdx), maxDead, mb(maxArchive), last.rows, mb(last.table), mb(last.indexes), last.deadTuples, mb(last.archive), last.plan)
	for _, smp := range samples {
		// Dispatched rows leave the table, so it can end up a page or two,
		// which a sequential scan reads cheaper than any index.
		if smp.plan != "" && !strings.Contains(smp.plan, "_pending") && smp.table >= 1<<20 {
			return fmt.Errorf("at %s the claim query did not use the pending index: %s", smp.at, smp.plan)
		}
	}
	return nil
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

func sample(ctx context.Context, pool *pgxpool.Pool, t ident.Table, m *metrics.Metrics, at time.Duration) (sizes, error) {
	s := sizes{at: at}
	err := pool.QueryRow(ctx, `SELECT pg_relation_size($1::regclass), pg_indexes_size($1::regclass),
		pg_relation_size(($2)::regclass), coalesce(n_dead_tup, 0), coalesce(n_live_tup, 0)
		FROM pg_stat_user_tables WHERE relid = $1::regclass`,
		t.Quoted(), t.Derived("pending")).Scan(&s.table, &s.indexes, &s.pendingIndex, &s.deadTuples, &s.rows)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("sizes: %w", err)
	}
	// Dispatched rows live in the archive (migration 00006): retention
	// bounds it as it bounds the table.
	if err := pool.QueryRow(ctx, `SELECT pg_total_relation_size($1::regclass)`, outboxsql.Archive(t)).Scan(&s.archive); err != nil {
		return s, fmt.Errorf("archive size: %w", err)
	}
	rows, err := pool.Query(ctx, `EXPLAIN SELECT seq FROM `+t.Quoted()+` WHERE `+outboxsql.Pending+`
		AND available_at <= now() ORDER BY seq LIMIT 500 FOR UPDATE SKIP LOCKED`)
	if err != nil {
		return s, fmt.Errorf("explain: %w", err)
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return s, fmt.Errorf("explain: %w", err)
	}
	var nodes []string
	for _, l := range lines {
		if strings.Contains(l, "Scan") || strings.Contains(l, "Sort") {
			nodes = append(nodes, strings.TrimSpace(strings.SplitN(strings.TrimLeft(l, " ->"), "  (", 2)[0]))
		}
	}
	s.plan = strings.Join(nodes, " > ")
	ch := make(chan prometheus.Metric, 64)
	go func() { m.Published.Collect(ch); close(ch) }()
	for metric := range ch {
		var pb dto.Metric
		if err := metric.Write(&pb); err == nil {
			s.dispatched += int64(pb.GetCounter().GetValue())
		}
	}
	return s, nil
}
