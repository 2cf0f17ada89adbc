package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// relayMaxUnconfirmed is the relay's default amqp.max_unconfirmed: the
// window of the ceilings beside a drain when no broker section chose one.
func relayMaxUnconfirmed() int { return relay.Config{}.WithDefaults().AMQP.MaxUnconfirmed }

// inproc is the relay engine running inside the bench process, with its
// own metrics registry.
type inproc struct {
	r      *relay.Relay
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

// startRelay runs the engine with cfg until stop, and waits until it is
// ready (database and broker links up).
func (b *bench) startRelay(ctx context.Context, cfg relay.Config) (*inproc, error) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg, metrics.Config{Version: "bench"})
	if err != nil {
		return nil, err
	}
	cfg = cfg.WithDefaults().WithAppNames()
	poolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, err
	}
	pub, err := rabbitmq.NewForRelay(cfg, zap.NewNop(), m)
	if err != nil {
		pool.Close()
		return nil, err
	}
	r, err := relay.New(cfg, relay.Deps{Logger: zap.NewNop(), Metrics: m, Pool: pool, Publisher: pub})
	if err != nil {
		_ = pub.Close()
		pool.Close()
		return nil, err
	}
	rctx, cancel := context.WithCancel(ctx)
	p := &inproc{r: r, reg: reg, cancel: cancel, done: make(chan error, 1)}
	// The pool is ours: closed once Run has returned (Run closes pub).
	go func() { err := r.Run(rctx); pool.Close(); p.done <- err }()
	err = waitFor(ctx, 15*time.Second, 2*time.Millisecond, func() (bool, error) {
		select {
		case err := <-p.done:
			p.done <- err
			return false, fmt.Errorf("relay stopped at start: %v", err)
		default:
		}
		return r.Ready() == nil, nil
	})
	if err != nil {
		_ = p.stop()
		return nil, fmt.Errorf("relay not ready: %w (%v)", err, r.Ready())
	}
	return p, nil
}

// stop cancels the relay and waits for Run to return.
func (p *inproc) stop() error {
	p.cancel()
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-time.After(45 * time.Second):
		return errors.New("relay did not stop within 45s")
	}
}

// batchStats summarises the relay's batches from its metrics.
type batchStats struct {
	batches                 uint64
	meanBatch               float64
	claim, publish, mark    time.Duration // mean per batch
	claimT, publishT, markT time.Duration // total
}

func (p *inproc) batchStats() batchStats { return statsOf(p.reg) }

// statsOf reads the batch statistics from a relay's metrics, gathered once
// (for the daemon, one scrape).
func statsOf(g prometheus.Gatherer) batchStats {
	var st batchStats
	fams, err := g.Gather()
	if err != nil {
		return st
	}
	bsum, bcount := histogram(fams, "outbox_relay_batch_size", nil)
	st.batches = bcount
	if bcount > 0 {
		st.meanBatch = bsum / float64(bcount)
	}
	stage := func(s string) (mean, total time.Duration) {
		sum, count := histogram(fams, "outbox_relay_stage_duration_seconds", map[string]string{"stage": s})
		total = time.Duration(sum * float64(time.Second))
		if count > 0 {
			mean = total / time.Duration(count)
		}
		return mean, total
	}
	// Every claim, empty ones included, is in the claim stage; only
	// batches with rows publish and mark.
	st.claim, st.claimT = stage(metrics.StageClaim)
	st.publish, st.publishT = stage(metrics.StagePublish)
	st.mark, st.markT = stage(metrics.StageMark)
	return st
}

// String is a one-line summary for a note.
func (st batchStats) String() string {
	return fmt.Sprintf("relay: %d batches of mean %.0f rows; mean per claim %s ms, per batch publish %s ms, mark %s ms",
		st.batches, st.meanBatch, ms(st.claim), ms(st.publish), ms(st.mark))
}

// histogram returns the sum and count of a histogram's series whose labels
// include match.
func histogram(fams []*dto.MetricFamily, name string, match map[string]string) (sum float64, count uint64) {
	for _, m := range gather(fams, name, match) {
		if h := m.GetHistogram(); h != nil {
			sum += h.GetSampleSum()
			count += h.GetSampleCount()
		}
	}
	return sum, count
}

// gather returns the series of family name whose labels include match.
func gather(fams []*dto.MetricFamily, name string, match map[string]string) []*dto.Metric {
	var out []*dto.Metric
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	metric:
		for _, m := range f.GetMetric() {
			for k, v := range match {
				found := false
				for _, l := range m.GetLabel() {
					if l.GetName() == k && l.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue metric
				}
			}
			out = append(out, m)
		}
	}
	return out
}

// --- the relay as a subprocess --------------------------------------------

// buildRelay builds ./cmd/outbox-relay into the temporary directory once.
func (b *bench) buildRelay(ctx context.Context) (string, error) {
	if b.relayBin != "" {
		return b.relayBin, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(b.tmpDir, "outbox-relay")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/outbox-relay")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/outbox-relay: %w\n%s", err, out)
	}
	b.relayBin = bin
	return bin, nil
}

// proc is the outbox-relay daemon running as a child process, configured
// through OUTBOX_RELAY_* variables.
type proc struct {
	cmd         *exec.Cmd
	pid         int
	metricsAddr string
	appName     string // application_name of its database connections
	stderr      *limitedBuffer
	exited      chan struct{}
	stopOnce    sync.Once
	stopErr     error
}

// startProc starts the daemon with the bench's table and exchange plus env
// (KEY=VALUE, OUTBOX_RELAY_ names) and waits for /readyz.
func (b *bench) startProc(ctx context.Context, env ...string) (*proc, error) {
	bin, err := b.buildRelay(ctx)
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &proc{
		metricsAddr: fmt.Sprintf("127.0.0.1:%d", port),
		appName:     b.name + "_relay",
		stderr:      &limitedBuffer{max: 64 << 10},
		exited:      make(chan struct{}),
	}
	dsn, err := withAppName(b.opts.dsn, p.appName)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_RELAY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env,
		"OUTBOX_RELAY_POSTGRES_DSN="+dsn,
		"OUTBOX_RELAY_POSTGRES_SCHEMA="+b.name,
		"OUTBOX_RELAY_AMQP_URL="+b.opts.amqpURL,
		"OUTBOX_RELAY_AMQP_EXCHANGE="+b.name,
		"OUTBOX_RELAY_METRICS_ADDR="+p.metricsAddr,
		"OUTBOX_RELAY_LOG_LEVEL=warn",
	)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout = io.Discard
	cmd.Stderr = p.stderr
	// The child dies with the bench, even if the bench is killed. It runs in
	// a session of its own: with the kernel's scheduler autogroups (on by
	// default), CPU is shared between sessions first, and a relay sidecar
	// has its own (its own cgroup under Kubernetes or systemd) rather than
	// a slice of the bench's, which runs the 32 producers and the consumer.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start outbox-relay: %w", err)
	}
	p.cmd, p.pid = cmd, cmd.Process.Pid
	go func() { _ = cmd.Wait(); close(p.exited) }()
	b.onCleanup(func(context.Context) error { return p.stop() })

	client := &http.Client{Timeout: time.Second}
	err = waitFor(ctx, 20*time.Second, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-p.exited:
			return false, fmt.Errorf("outbox-relay exited: %s", strings.TrimSpace(p.stderr.String()))
		default:
		}
		resp, err := client.Get("http://" + p.metricsAddr + "/readyz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		_ = p.stop()
		return nil, fmt.Errorf("outbox-relay not ready: %w", err)
	}
	return p, nil
}

// stop sends SIGTERM, waits up to 15s for the drain, then kills.
func (p *proc) stop() error {
	p.stopOnce.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
			p.stopErr = errors.New("outbox-relay did not stop within 15s of SIGTERM; killed")
		}
	})
	return p.stopErr
}

// Gather scrapes the daemon's /metrics: a proc is a prometheus.Gatherer.
func (p *proc) Gather() ([]*dto.MetricFamily, error) {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + p.metricsAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, err
	}
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, f := range fams {
		out = append(out, f)
	}
	return out, nil
}

// scrape returns the sum of a counter's or gauge's series, whatever their
// labels, from the daemon's /metrics.
func (p *proc) scrape(name string) (float64, error) {
	fams, err := p.Gather()
	if err != nil {
		return 0, err
	}
	series := gather(fams, name, nil)
	if len(series) == 0 {
		return 0, fmt.Errorf("metric %s not found", name)
	}
	var sum float64
	for _, m := range series {
		sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return sum, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// withAppName sets application_name in a URL or key=value DSN.
func withAppName(dsn, name string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("-dsn: cannot parse")
		}
		q := u.Query()
		q.Set("application_name", name)
		u.RawQuery = q.Encode()
		return u.String(), nil
	}
	return dsn + " application_name=" + name, nil
}

type limitedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.max - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// --- /proc ---------------------------------------------------------------

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on Linux
// for every architecture Go supports.
const clockTicks = 100

// cpuTime returns the CPU time a process has used: the sum over its threads
// of /proc/PID/task/TID/schedstat (nanoseconds), or, where the kernel has no
// schedstat, utime+stime from /proc/PID/stat (10ms ticks).
func cpuTime(pid int) (time.Duration, error) {
	if d, err := schedCPU(pid); err == nil {
		return d, nil
	}
	return statCPU(pid)
}

func schedCPU(pid int) (time.Duration, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended
			}
			return 0, err
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0, errors.New("malformed schedstat")
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, err
		}
		sum += time.Duration(ns)
	}
	return sum, nil
}

func statCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, errors.New("malformed stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// memStatus returns VmRSS and VmHWM (peak RSS) in bytes.
func memStatus(pid int) (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, err
		}
		if k == "VmRSS" {
			rss = n << 10
		} else {
			hwm = n << 10
		}
	}
	return rss, hwm, nil
}
