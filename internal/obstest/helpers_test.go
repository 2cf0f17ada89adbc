package obstest_test

import (
	"bytes"
	"context"
	"encoding/json"
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
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// Paths of the shipped files, from this package's directory.
var (
	dashboardPath = filepath.Join("..", "..", "deploy", "grafana", "outbox-relay-dashboard.json")
	alertsPath    = filepath.Join("..", "..", "deploy", "prometheus", "alerts.yml")
	alertsTest    = filepath.Join("..", "..", "deploy", "prometheus", "alerts_test.yml")
	promConfig    = filepath.Join("..", "..", "deploy", "prometheus", "prometheus.yml")
	metricsDoc    = filepath.Join("..", "..", "docs", "metrics.md")
)

// needTool returns the path of a Prometheus binary, failing (not skipping)
// the test when it is missing: these checks are part of `make test`.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed (not in PATH): run `scripts/services.sh up`, which installs the Debian package prometheus (prometheus and promtool)", name)
	}
	return p
}

// runTool runs a command with a deadline and returns its combined output.
func runTool(t *testing.T, dir string, stdin io.Reader, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, needTool(t, name), args...)
	cmd.Dir = dir
	cmd.Stdin = stdin
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// runningRelay is a relay running in-process with its metrics served on a
// loopback port, wired as cmd/outbox-relay/run.go wires it.
type runningRelay struct {
	*relay.Relay
	Addr string // host:port of /metrics, /healthz, /readyz
}

// startRelay runs a relay until the test ends. The registry holds what
// `outbox-relay run` registers: the Go and process collectors and the
// relay's metrics.
func startRelay(t *testing.T, cfg relay.Config) *runningRelay {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r := testenv.NewRelay(t, cfg, testenv.WithRegistry(reg),
		testenv.WithMetricsConfig(metrics.Config{Version: "v0.0.0-obstest", Commit: "0bs7e57"}),
		testenv.WithLogger(zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))))
	srv, err := metrics.NewServer("127.0.0.1:0", reg, r.Ready)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()

	r.Start(t)
	t.Cleanup(func() {
		if err := r.Stop(); err != nil {
			t.Errorf("relay Run: %v", err)
		}
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		if err := srv.Shutdown(sctx); err != nil {
			t.Errorf("metrics server shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("metrics server: %v", err)
		}
	})
	return &runningRelay{Relay: r.Relay, Addr: srv.Addr()}
}

// get fetches a URL and returns the status code and body.
func get(t *testing.T, u string) (int, string) {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return resp.StatusCode, string(b)
}

// writeEvents commits events of the given types, one transaction.
func writeEvents(t *testing.T, o *testenv.Outbox, types ...string) {
	t.Helper()
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	evs := make([]outbox.Event, len(types))
	for i, typ := range types {
		evs[i] = outbox.NewEvent(typ, []byte(`{"n":`+strconv.Itoa(i)+`}`))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, evs...) }); err != nil {
		t.Fatalf("write events: %v", err)
	}
}

// repeat returns n copies of s.
func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

// eventually polls cond until it returns "" (met) or the timeout passes,
// then fails with cond's last explanation.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s; last: %s", timeout, what, why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// prometheusServer is a Prometheus started by a test on a loopback port.
type prometheusServer struct {
	URL string // http://127.0.0.1:port
	log string // its log file
}

// startPrometheus runs the prometheus binary with config (YAML text) and
// the extra files (name -> content) in a temporary directory, and stops it
// at cleanup. It returns once Prometheus reports ready.
func startPrometheus(t *testing.T, config string, files map[string]string) *prometheusServer {
	t.Helper()
	bin := needTool(t, "prometheus")
	dir := t.TempDir()
	files["prometheus.yml"] = config
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	port := freePort(t)
	logPath := filepath.Join(dir, "prometheus.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin,
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:"+strconv.Itoa(port),
		"--log.level=info",
	)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Dies with the test binary, even when it is killed without cleanups.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	p := &prometheusServer{URL: "http://127.0.0.1:" + strconv.Itoa(port), log: logPath}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("prometheus log:\n%s", tail(p.log, 40))
		}
	})

	deadline := time.Now().Add(30 * time.Second)
	c := http.Client{Timeout: time.Second}
	for {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("prometheus exited at start: %v\n%s", err, tail(p.log, 40))
		default:
		}
		if resp, err := c.Get(p.URL + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready within 30s\n%s", tail(p.log, 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// promResponse is the envelope of Prometheus's HTTP API.
type promResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
}

// api calls a Prometheus API path and returns the decoded envelope; a
// query error is returned in it, not as a test failure.
func (p *prometheusServer) api(t *testing.T, path string, params url.Values) promResponse {
	t.Helper()
	u := p.URL + path
	if params != nil {
		u += "?" + params.Encode()
	}
	_, body := get(t, u)
	var r promResponse
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("GET %s: %v in %q", u, err, body)
	}
	return r
}

// sample is one element of an instant vector.
type sample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"` // [unix time, "value"]
}

func (s sample) float(t *testing.T) float64 {
	t.Helper()
	str, _ := s.Value[1].(string)
	f, err := strconv.ParseFloat(str, 64)
	if err != nil {
		t.Fatalf("sample value %v: %v", s.Value, err)
	}
	return f
}

// query evaluates an instant query that must succeed and returns its vector.
func (p *prometheusServer) query(t *testing.T, q string) []sample {
	t.Helper()
	r := p.api(t, "/api/v1/query", url.Values{"query": {q}})
	if r.Status != "success" {
		t.Fatalf("query %s: %s: %s", q, r.ErrorType, r.Error)
	}
	var data struct {
		ResultType string   `json:"resultType"`
		Result     []sample `json:"result"`
	}
	if err := json.Unmarshal(r.Data, &data); err != nil {
		t.Fatalf("query %s: %v", q, err)
	}
	if data.ResultType != "vector" {
		t.Fatalf("query %s: result type %s, want vector", q, data.ResultType)
	}
	return data.Result
}

// scalar evaluates a query expected to return one sample; ok is false when
// the vector is empty.
func (p *prometheusServer) scalar(t *testing.T, q string) (v float64, ok bool) {
	t.Helper()
	res := p.query(t, q)
	switch len(res) {
	case 0:
		return 0, false
	case 1:
		return res[0].float(t), true
	}
	t.Fatalf("query %s: %d samples, want one", q, len(res))
	return 0, false
}

// alert is an element of /api/v1/alerts.
type alert struct {
	Labels map[string]string `json:"labels"`
	State  string            `json:"state"` // pending or firing
	Value  string            `json:"value"`
}

// alerts returns the active (pending or firing) alerts named name.
func (p *prometheusServer) alerts(t *testing.T, name string) []alert {
	t.Helper()
	r := p.api(t, "/api/v1/alerts", nil)
	if r.Status != "success" {
		t.Fatalf("alerts: %s: %s", r.ErrorType, r.Error)
	}
	var data struct {
		Alerts []alert `json:"alerts"`
	}
	if err := json.Unmarshal(r.Data, &data); err != nil {
		t.Fatal(err)
	}
	var out []alert
	for _, a := range data.Alerts {
		if a.Labels["alertname"] == name {
			out = append(out, a)
		}
	}
	return out
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
