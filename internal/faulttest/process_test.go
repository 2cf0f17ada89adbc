// Package faulttest runs the real outbox-relay binary as a process and
// kills it: the delivery promise under SIGKILL and SIGTERM.
package faulttest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

var relayBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outbox-relay-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	relayBin = filepath.Join(dir, "outbox-relay")
	build := exec.Command("go", "build", "-o", relayBin, "github.com/outbox-relay/outbox-relay/cmd/outbox-relay")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build outbox-relay: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// syncBuffer collects a process's output for the test log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// relayProc is one outbox-relay process.
type relayProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// relayEnv configures a relay process for a test's outbox and exchange.
func relayEnv(o *testenv.Outbox, amqpURL, exchange string, extra ...string) []string {
	return append([]string{
		"OUTBOX_RELAY_POSTGRES_DSN=" + o.DSN + "&application_name=" + o.Schema,
		"OUTBOX_RELAY_POSTGRES_SCHEMA=" + o.Schema,
		"OUTBOX_RELAY_AMQP_URL=" + amqpURL,
		"OUTBOX_RELAY_AMQP_EXCHANGE=" + exchange,
		"OUTBOX_RELAY_METRICS_ADDR=off",
		"OUTBOX_RELAY_LOG_FORMAT=console",
	}, extra...)
}

// startRelay runs the binary with env until the test ends.
func startRelay(t *testing.T, env []string) *relayProc {
	t.Helper()
	p := &relayProc{out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(relayBin, "run")
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill(t)
		if t.Failed() {
			t.Logf("relay pid %d output:\n%s", p.cmd.Process.Pid, p.out.String())
		}
	})
	return p
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *relayProc) kill(t *testing.T) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not die after SIGKILL")
	}
}

// exitCode waits up to d for the process to exit and returns its status.
func (p *relayProc) exitCode(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(d):
		t.Fatalf("relay still running after %s", d)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", p.err)
	return -1
}
