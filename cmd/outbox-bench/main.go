// Command outbox-bench measures the relay against the raw ceilings of this
// machine and prints every figure and ratio, one per line ("name: value
// unit"): the broker's publish-with-confirms ceiling, the drain rate of a
// pre-filled backlog and its WAL cost, producer commit rates under each
// wake-up mode, the relay's idle cost, commit→receive latency at fixed
// offered rates, and the relay's RSS at a small and a large backlog.
//
// Everything it creates (a schema bench_<random> with its own outbox table,
// an exchange and a queue of the same name) is removed at the end, also on
// error or Ctrl-C. See docs/benchmarks.md for the method behind each figure.
//
//	go run ./cmd/outbox-bench            # full run, several minutes
//	go run ./cmd/outbox-bench -quick     # under a minute
//	go run ./cmd/outbox-bench -only drain,latency
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// Sections, in the order they run and print.
const (
	secBroker    = "broker"
	secDrain     = "drain"
	secProducers = "producers"
	secIdle      = "idle"
	secLatency   = "latency"
	secRSS       = "rss"
	secOrdered   = "ordered"
)

var allSections = []string{secBroker, secDrain, secProducers, secIdle, secLatency, secRSS, secOrdered}

// options are the command-line settings; zero durations and sizes are
// filled per mode (full or -quick) by withDefaults.
type options struct {
	quick   bool
	only    []string
	dsn     string
	amqpURL string
	timeout time.Duration

	payload   int           // bytes per event
	windows   []int         // ceiling: outstanding confirms tried
	ceilTime  time.Duration // ceiling: per window
	backlog   int           // drain: pre-filled events
	delete    bool          // drain: also on_dispatch: delete
	producers int           // producer connections
	prodTime  time.Duration // producer commit rate: per mode and round
	rounds    int           // producer commit rate: a b c d, then d c b a, ...
	idleTime  time.Duration // idle cost window
	latTime   time.Duration // latency: per point
	latInproc bool          // latency: the relay engine in the bench process
	latDump   string        // latency: directory for each event's times
	rates     []int         // latency: fixed offered rates, events/s
	fractions []int         // latency: percent of the measured drain capacity
	rssSmall  int
	rssLarge  int
	rssTime   time.Duration
	// large payloads: rows and their size
	rssBigRows int
	rssBigSize int
	cpuProf    string // write CPU profiles of the drains to this path, .N.MODE appended
	// drain A/B: the default against drainAlt, drainRounds times
	drainAlt    drainAlt
	drainRounds int
}

func parseOptions(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("outbox-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: outbox-bench [flags]\n\nSections: %s\n\nFlags:\n", strings.Join(allSections, ", "))
		fs.PrintDefaults()
	}
	only := fs.String("only", "", "comma-separated sections to run (default all): "+strings.Join(allSections, ","))
	windows := fs.String("windows", "", "broker ceiling: outstanding-confirm windows to try (default 50,100,250,500,1000,2000, quick 100,500)")
	rates := fs.String("rates", "1000,2500,5000", "latency: fixed offered rates, events/s")
	fractions := fs.String("fractions", "", "latency: offered rates as percent of the measured drain capacity (default 25,50,90, quick 50)")
	fs.BoolVar(&o.quick, "quick", false, "small sizes and short windows: the whole run takes under a minute")
	fs.StringVar(&o.dsn, "dsn", cmp.Or(os.Getenv("TEST_DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"), "PostgreSQL URL (default $TEST_DATABASE_URL or the local server)")
	fs.StringVar(&o.amqpURL, "amqp", cmp.Or(os.Getenv("TEST_AMQP_URL"), "amqp://guest:guest@127.0.0.1:5672/"), "RabbitMQ URL (default $TEST_AMQP_URL or the local broker)")
	fs.DurationVar(&o.timeout, "timeout", 0, "overall deadline (default 3m with -quick, 25m otherwise)")
	fs.IntVar(&o.payload, "payload", 256, "event payload size in bytes")
	fs.DurationVar(&o.ceilTime, "ceiling-time", 0, "broker ceiling: duration per window (default 5s, quick 1s)")
	fs.IntVar(&o.backlog, "backlog", 0, "drain: pre-filled backlog in events (default 200000, quick 20000)")
	drainDelete := fs.Bool("drain-delete", true, "drain: also measure relay.on_dispatch: delete (skipped with -quick unless set explicitly)")
	fs.IntVar(&o.producers, "producers", 32, "producer connections (one-event transactions)")
	fs.DurationVar(&o.prodTime, "producer-time", 0, "producer commit rate: duration per mode (default 10s, quick 2s)")
	fs.IntVar(&o.rounds, "rounds", 0, "producer commit rate: rounds over the four modes, alternating order (default 3, quick 1)")
	fs.DurationVar(&o.idleTime, "idle-time", 0, "idle cost: measuring window per wake mode (default 5s, quick 2s, poll mode only)")
	fs.DurationVar(&o.latTime, "latency-time", 0, "latency: duration per point (default 5s, quick 2s)")
	fs.BoolVar(&o.latInproc, "latency-inproc", false, "latency: run the relay engine inside the bench process instead of the daemon as a process of its own")
	fs.StringVar(&o.latDump, "latency-dump", "", "latency: write each event's commit and receive times (Unix ns, 0 for never received) to `dir`/POINT.txt, one event per line, to find where a tail comes from")
	fs.IntVar(&o.rssSmall, "rss-small", 1000, "RSS: small pending backlog")
	fs.IntVar(&o.rssLarge, "rss-large", 0, "RSS: large pending backlog (default 1000000, quick 100000)")
	fs.DurationVar(&o.rssTime, "rss-time", 0, "RSS: sampling window per backlog (default 5s, quick 1.5s)")
	fs.IntVar(&o.rssBigRows, "rss-big-rows", 0, "RSS: rows of the large-payload drain (default 16, quick 4)")
	fs.IntVar(&o.rssBigSize, "rss-big-size", 24<<20, "RSS: payload bytes per row of the large-payload drain")
	alt := fs.String("drain-alt", "", "drain: alternate the default relay configuration with this one (max_conns=N,batch_size=N,max_unconfirmed=N), ABBA, -drain-rounds times each")
	fs.IntVar(&o.drainRounds, "drain-rounds", 4, "drain: rounds of the -drain-alt comparison")
	fs.StringVar(&o.cpuProf, "cpuprofile", "", "drain: write a CPU profile of the bench process (the relay engine and the consumer) during each drain, not its fill, to this path with .N.MODE appended")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	o.delete = *drainDelete
	if o.quick {
		explicit := false
		fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "drain-delete" })
		o.delete = o.delete && explicit
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var err error
	if *windows == "" {
		*windows = "50,100,250,500,1000,2000"
		if o.quick {
			*windows = "100,500"
		}
	}
	if o.windows, err = intList(*windows); err != nil {
		return o, fmt.Errorf("-windows: %w", err)
	}
	if o.rates, err = intList(*rates); err != nil {
		return o, fmt.Errorf("-rates: %w", err)
	}
	if *fractions == "" {
		*fractions = "25,50,90"
		if o.quick {
			*fractions = "50"
		}
	}
	if o.fractions, err = intList(*fractions); err != nil {
		return o, fmt.Errorf("-fractions: %w", err)
	}
	if *alt != "" {
		if o.drainAlt, err = parseDrainAlt(*alt); err != nil {
			return o, fmt.Errorf("-drain-alt: %w", err)
		}
		if o.drainRounds < 1 {
			return o, errors.New("-drain-rounds: at least 1")
		}
	}
	if *only != "" {
		for _, s := range strings.Split(*only, ",") {
			s = strings.TrimSpace(s)
			if !slices.Contains(allSections, s) {
				return o, fmt.Errorf("-only: unknown section %q (sections: %s)", s, strings.Join(allSections, ", "))
			}
			o.only = append(o.only, s)
		}
	}
	o = o.withDefaults()
	switch {
	case o.payload < 32:
		return o, errors.New("-payload: at least 32 bytes (the event number is kept in it)")
	case o.producers < 1 || o.producers > 80:
		return o, errors.New("-producers: between 1 and 80 (the server allows 100 connections)")
	case o.backlog < 1 || o.rssSmall < 1 || o.rssLarge < 1 || o.rssBigRows < 1 || o.rssBigSize < 1:
		return o, errors.New("-backlog, -rss-small, -rss-large, -rss-big-rows, -rss-big-size: at least 1")
	}
	return o, nil
}

func (o options) withDefaults() options {
	pick := func(quick, full time.Duration) time.Duration {
		if o.quick {
			return quick
		}
		return full
	}
	pickN := func(quick, full int) int {
		if o.quick {
			return quick
		}
		return full
	}
	o.timeout = cmp.Or(o.timeout, pick(3*time.Minute, 25*time.Minute))
	o.ceilTime = cmp.Or(o.ceilTime, pick(time.Second, 5*time.Second))
	o.backlog = cmp.Or(o.backlog, pickN(20_000, 200_000))
	o.prodTime = cmp.Or(o.prodTime, pick(2*time.Second, 10*time.Second))
	o.rounds = cmp.Or(o.rounds, pickN(1, 3))
	o.idleTime = cmp.Or(o.idleTime, pick(2*time.Second, 5*time.Second))
	o.latTime = cmp.Or(o.latTime, pick(2*time.Second, 5*time.Second))
	o.rssLarge = cmp.Or(o.rssLarge, pickN(100_000, 1_000_000))
	o.rssTime = cmp.Or(o.rssTime, pick(1500*time.Millisecond, 5*time.Second))
	o.rssBigRows = cmp.Or(o.rssBigRows, pickN(4, 16))
	return o
}

func (o options) runs(section string) bool {
	return len(o.only) == 0 || slices.Contains(o.only, section)
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		var n int
		if _, err := fmt.Sscanf(f, "%d", &n); err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	opts, err := parseOptions(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "outbox-bench:", err)
		return 2
	}
	// The first Ctrl-C cancels the run and cleans up; a second one kills.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop)
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()

	out := newReport(stdout)
	b := &bench{opts: opts, out: out, log: stderr}
	defer func() {
		// Cleanup gets its own deadline: the run's may be what ended it.
		cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
		defer ccancel()
		if err := b.cleanup(cctx); err != nil {
			fmt.Fprintln(stderr, "outbox-bench: cleanup:", err)
		}
	}()
	if err := b.setup(ctx); err != nil {
		fmt.Fprintln(stderr, "outbox-bench: setup:", err)
		return 1
	}
	b.header(ctx)

	failed := false
	for _, s := range []struct {
		name string
		fn   func(context.Context) error
	}{
		{secBroker, b.broker},
		{secDrain, b.drainSection},
		{secProducers, b.producersSection},
		{secIdle, b.idleSection},
		{secLatency, b.latencySection},
		{secRSS, b.rssSection},
		{secOrdered, b.orderedSection},
	} {
		if !opts.runs(s.name) {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		start := time.Now()
		out.section(s.name)
		if err := s.fn(ctx); err != nil {
			failed = true
			out.line(s.name+".error", err.Error(), "")
			fmt.Fprintf(stderr, "outbox-bench: %s: %v\n", s.name, err)
		}
		out.line(s.name+".section_time", fmt.Sprintf("%.1f", time.Since(start).Seconds()), "s")
	}
	out.section("end")
	out.line("run.loadavg_end", loadavg(), "")
	out.line("run.total_time", fmt.Sprintf("%.1f", time.Since(b.started).Seconds()), "s")
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "outbox-bench: stopped:", context.Cause(ctx))
		return 1
	}
	if failed {
		return 1
	}
	return 0
}
