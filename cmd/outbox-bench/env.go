package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/amqpconn"
	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/schema"
)

// eventType is every bench event's type, hence its routing key.
const eventType = "bench.event"

// bench is one run: its own schema, exchange and queue, and what must be
// undone at the end.
type bench struct {
	opts    options
	out     *report
	log     io.Writer
	started time.Time

	name     string // schema, exchange and queue name: bench_<random>
	table    ident.Table
	writer   *outbox.Writer // every insert goes through the helper applications use
	pool     *pgxpool.Pool  // the bench's own queries
	prodPool *pgxpool.Pool  // the producers', connected on first use
	consConn *amqp.Connection
	tmpDir   string
	relayBin string // built lazily for the subprocess sections

	pgVersion, mqVersion string

	mu       sync.Mutex
	cleanups []func(context.Context) error // run in reverse order

	capacity      float64 // measured drain rate (events/s), for the latency points
	brokerPID     int     // the local broker process, 0 if not found
	ceiling       float64 // best broker ceiling (msg/s)
	ceilingWindow int     // the window that reached it
	drains        int     // drains run so far (numbers the -cpuprofile files)
}

// onCleanup registers f to run at the end, before what was registered earlier.
func (b *bench) onCleanup(f func(context.Context) error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cleanups = append(b.cleanups, f)
}

func (b *bench) cleanup(ctx context.Context) error {
	b.mu.Lock()
	fs := b.cleanups
	b.cleanups = nil
	b.mu.Unlock()
	var errs []error
	for i := len(fs) - 1; i >= 0; i-- {
		errs = append(errs, fs[i](ctx))
	}
	return errors.Join(errs...)
}

func (b *bench) setup(ctx context.Context) error {
	b.started = time.Now()
	rnd := make([]byte, 6)
	_, _ = rand.Read(rnd)
	b.name = "bench_" + hex.EncodeToString(rnd)
	b.table = ident.Table{Schema: b.name, Name: "outbox"}
	w, err := outbox.NewWriter(b.table.Schema, b.table.Name)
	if err != nil {
		return err
	}
	b.writer = w

	poolCfg, err := pgxpool.ParseConfig(b.opts.dsn)
	if err != nil {
		return fmt.Errorf("-dsn: %s", relay.Redact(err.Error()))
	}
	poolCfg.MaxConns = 4
	poolCfg.ConnConfig.RuntimeParams["application_name"] = b.name + "_bench"
	if b.pool, err = pgxpool.NewWithConfig(ctx, poolCfg); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	b.onCleanup(func(context.Context) error { b.pool.Close(); return nil })
	if err := b.pool.QueryRow(ctx, `SHOW server_version`).Scan(&b.pgVersion); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}

	b.onCleanup(func(ctx context.Context) error {
		_, err := b.pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+ident.Quote(b.name)+" CASCADE")
		if err != nil {
			return fmt.Errorf("drop schema %s: %w", b.name, err)
		}
		return nil
	})
	db := stdlib.OpenDBFromPool(b.pool)
	defer db.Close()
	mig, err := schema.NewMigrator(db, b.name, "outbox")
	if err != nil {
		return err
	}
	if _, err := mig.Up(ctx); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}

	// The exchange and queue are declared on a throwaway channel; the
	// consumer connection stays open for the whole run.
	conn, err := b.dial(ctx, b.name+"_consumer")
	if err != nil {
		return err
	}
	b.consConn = conn
	b.onCleanup(func(context.Context) error { return ignoreClosed(conn.Close()) })
	if v, ok := conn.Properties["version"].(string); ok {
		b.mqVersion = v
	}
	b.brokerPID = findBrokerPID(b.opts.amqpURL)
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("amqp channel: %w", err)
	}
	defer ch.Close()
	b.onCleanup(b.deleteBrokerObjects)
	if err := ch.ExchangeDeclare(b.name, "topic", true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange: %w", err)
	}
	if _, err := ch.QueueDeclare(b.name, true, false, false, false, amqp.Table{"x-queue-type": "classic"}); err != nil {
		return fmt.Errorf("declare queue: %w", err)
	}
	if err := ch.QueueBind(b.name, "#", b.name, false, nil); err != nil {
		return fmt.Errorf("bind queue: %w", err)
	}

	if b.tmpDir, err = os.MkdirTemp("", "outbox-bench-"); err != nil {
		return err
	}
	b.onCleanup(func(context.Context) error { return os.RemoveAll(b.tmpDir) })
	// Build the daemon now, so that it is the same source as the engine
	// compiled into this binary, however the tree changes during the run.
	if b.opts.runs(secIdle) || b.opts.runs(secRSS) {
		if _, err := b.buildRelay(ctx); err != nil {
			return err
		}
	}
	return nil
}

// deleteBrokerObjects deletes the queue and exchange over a fresh
// connection, since the run's may be the reason it is ending.
func (b *bench) deleteBrokerObjects(ctx context.Context) error {
	conn, ch, err := amqpconn.Channel(b.opts.amqpURL, b.amqpConfig(ctx, b.name+"_cleanup"))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, errQ := ch.QueueDelete(b.name, false, false, false)
	return errors.Join(errQ, ch.ExchangeDelete(b.name, false, false))
}

func (b *bench) dial(ctx context.Context, name string) (*amqp.Connection, error) {
	return amqpconn.Dial(b.opts.amqpURL, b.amqpConfig(ctx, name))
}

// amqpConfig names a connection of the bench and bounds its dial by ctx.
func (b *bench) amqpConfig(ctx context.Context, name string) amqp.Config {
	cfg := amqp.Config{
		Heartbeat:  10 * time.Second,
		Properties: amqp.Table{"connection_name": name},
		Dial:       amqp.DefaultDial(10 * time.Second),
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < 10*time.Second {
		cfg.Dial = amqp.DefaultDial(max(time.Until(dl), time.Second))
	}
	return cfg
}

func ignoreClosed(err error) error {
	if errors.Is(err, amqp.ErrClosed) {
		return nil
	}
	return err
}

func (b *bench) header(ctx context.Context) {
	o, out := b.opts, b.out
	def := relay.Config{}.WithDefaults()
	mode := "full"
	if o.quick {
		mode = "quick"
	}
	out.section("outbox-bench")
	out.line("date", time.Now().UTC().Format(time.RFC3339), "")
	out.line("machine.nproc", strconv.Itoa(runtime.NumCPU()), "")
	out.line("machine.cpu", cpuModel(), "")
	out.line("machine.mem_total", memTotal(), "")
	out.line("machine.loadavg_start", loadavg(), "", "other work on the machine skews absolute figures; compare ratios")
	out.line("postgres.version", b.pgVersion, "")
	out.line("postgres.settings", b.pgSettings(ctx), "")
	out.line("rabbitmq.version", b.mqVersion, "")
	if b.brokerPID > 0 {
		out.line("rabbitmq.pid", strconv.Itoa(b.brokerPID), "", "the local process listening on the AMQP port; its CPU is reported")
	}
	out.line("go.version", runtime.Version(), "")
	out.line("git.commit", gitDescribe(), "")
	out.line("relay.source", relaySourceHash(), "", "sha256 of relay/*.go at start: which engine was measured")
	out.line("config.mode", mode, "")
	out.line("config.sections", strings.Join(b.sections(), ","), "")
	out.line("config.schema", b.name, "", "exchange and queue have the same name")
	out.line("config.payload", strconv.Itoa(o.payload), "bytes")
	out.line("config.ceiling_windows", joinInts(o.windows), "outstanding confirms")
	out.line("config.ceiling_time", o.ceilTime.String(), "", "per window")
	out.line("config.backlog", strconv.Itoa(o.backlog), "events")
	drainModes := "mark"
	if o.delete {
		drainModes += ",delete"
	}
	out.line("config.drain_on_dispatch", drainModes, "")
	out.line("config.producers", strconv.Itoa(o.producers), "connections", "one-event transactions, outbox.Writer.Write")
	out.line("config.producer_time", o.prodTime.String(), "", fmt.Sprintf("per mode, %d round(s)", o.rounds))
	out.line("config.idle_time", o.idleTime.String(), "")
	out.line("config.latency_time", o.latTime.String(), "", "per point")
	out.line("config.latency_rates", joinInts(o.rates), "events/s")
	out.line("config.latency_fractions", joinInts(o.fractions), "% of drain capacity")
	out.line("config.rss_backlogs", fmt.Sprintf("%d,%d", o.rssSmall, o.rssLarge), "events")
	out.line("relay.batch_size", strconv.Itoa(def.Relay.BatchSize), "", "relay defaults, used unless a line says otherwise")
	out.line("postgres.max_conns", strconv.Itoa(int(def.Postgres.MaxConns)), "")
	out.line("amqp.max_unconfirmed", strconv.Itoa(def.AMQP.MaxUnconfirmed), "")
	out.line("relay.wake.min_interval", def.Wake.MinInterval.String(), "")
	out.line("relay.wake.poll_interval", def.Wake.PollInterval.String(), "")
	out.line("relay.wake.linger", def.Wake.Linger.String(), "", fmt.Sprintf("after a short batch while rows are claimed faster than %d/s", def.Wake.LingerAbove))
	out.line("relay.on_dispatch", def.Relay.OnDispatch, "")
}

func (b *bench) sections() []string {
	var s []string
	for _, name := range allSections {
		if b.opts.runs(name) {
			s = append(s, name)
		}
	}
	return s
}

func (b *bench) pgSettings(ctx context.Context) string {
	var parts []string
	for _, name := range []string{"synchronous_commit", "full_page_writes", "shared_buffers", "max_wal_size", "checkpoint_timeout"} {
		var v string
		if err := b.pool.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&v); err == nil {
			parts = append(parts, name+"="+v)
		}
	}
	return strings.Join(parts, " ")
}

func gitDescribe() string {
	rev, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "n/a"
	}
	s := strings.TrimSpace(string(rev))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
		s += " (uncommitted changes)"
	}
	return s
}

// relaySourceHash identifies the engine's source (relay/*.go, tests
// excluded) at the start of the run; the tree may change while it runs.
func relaySourceHash() string {
	root, err := moduleRoot()
	if err != nil {
		return "n/a"
	}
	files, err := filepath.Glob(filepath.Join(root, "relay", "*.go"))
	if err != nil || len(files) == 0 {
		return "n/a"
	}
	h := sha256.New()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return "n/a"
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// --- the outbox table ---------------------------------------------------

// reset empties the outbox table and its archive of dispatched rows, and
// sets its NOTIFY trigger. No relay may be running.
func (b *bench) reset(ctx context.Context, notify bool) error {
	if _, err := b.pool.Exec(ctx, "TRUNCATE "+b.table.Quoted()+", "+b.table.Derived(outboxsql.ArchiveSuffix)); err != nil {
		return fmt.Errorf("truncate: %w", err)
	}
	return b.setTrigger(ctx, notify)
}

func (b *bench) setTrigger(ctx context.Context, enabled bool) error {
	if _, err := b.pool.Exec(ctx, outboxsql.SetNotify(b.table, enabled)); err != nil {
		verb := map[bool]string{true: "enable", false: "disable"}[enabled]
		return fmt.Errorf("%s trigger: %w", verb, err)
	}
	return nil
}

// fillChunk is how many events fill writes per transaction: large enough
// that round trips do not matter, small enough to bound the bench's memory.
const fillChunk = 10_000

// fill writes n events numbered from first with payloads like the
// producers' ({"k":N,"p":"xxx..."}), keyed k0 to k<keys-1> by number when
// keys > 0, through the outbox helper in transactions of fillChunk events.
func (b *bench) fill(ctx context.Context, first, n, keys int) error {
	events := make([]outbox.Event, 0, min(n, fillChunk))
	for lo := first; lo < first+n; lo += fillChunk {
		events = events[:0]
		for k := lo; k < min(lo+fillChunk, first+n); k++ {
			e := outbox.NewEvent(eventType, payload(int64(k), b.opts.payload))
			if keys > 0 {
				e.Key = "k" + strconv.Itoa(k%keys)
			}
			events = append(events, e)
		}
		if err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error { return b.writer.Write(ctx, tx, events...) }); err != nil {
			return fmt.Errorf("fill backlog: %w", err)
		}
	}
	if _, err := b.pool.Exec(ctx, "ANALYZE "+b.table.Quoted()); err != nil {
		return fmt.Errorf("analyze: %w", err)
	}
	return nil
}

func (b *bench) pending(ctx context.Context) (int64, error) {
	var n int64
	err := b.pool.QueryRow(ctx, `SELECT count(*) FROM `+b.table.Quoted()+` WHERE `+outboxsql.Pending).Scan(&n)
	return n, err
}

func (b *bench) walLSN(ctx context.Context) (string, error) {
	var lsn string
	err := b.pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&lsn)
	return lsn, err
}

func (b *bench) walDiff(ctx context.Context, from, to string) (float64, error) {
	var d float64
	err := b.pool.QueryRow(ctx, `SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::float8`, to, from).Scan(&d)
	return d, err
}

// writeOne commits one event in a transaction of its own, as an
// application's request would: what the producers run.
func (b *bench) writeOne(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}, body []byte) error {
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error { return b.insertOne(ctx, tx, body) })
}

// insertOne is a producer's insert of one event in tx.
func (b *bench) insertOne(ctx context.Context, tx pgx.Tx, body []byte) error {
	return b.writer.Write(ctx, tx, outbox.NewEvent(eventType, body))
}

// relayConfig is the relay's default configuration pointed at the bench's
// table and exchange.
func (b *bench) relayConfig() relay.Config {
	var c relay.Config
	c.Postgres.DSN = b.opts.dsn
	// Tag the engine's connections so their backends can be found.
	if dsn, err := withAppName(b.opts.dsn, b.engineAppName()); err == nil {
		c.Postgres.DSN = dsn
	}
	c.Postgres.Schema = b.name
	c.AMQP.URL = b.opts.amqpURL
	c.AMQP.Exchange = b.name
	c.Relay.ShutdownTimeout = 10 * time.Second
	return c
}

func (b *bench) engineAppName() string { return b.name + "_engine" }

// waitFor polls cond every step until it holds, ctx ends or limit passes.
func waitFor(ctx context.Context, limit, step time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not reached within %s", limit)
		}
		t := time.NewTimer(step)
		select {
		case <-ctx.Done():
			t.Stop()
			return context.Cause(ctx)
		case <-t.C:
		}
	}
}

// sleepCtx sleeps d unless ctx ends first.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}

// moduleRoot finds the directory holding go.mod, from the working directory up.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory: run from the repository")
		}
		dir = parent
	}
}
