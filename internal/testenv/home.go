package testenv

import (
	"os"
	"path/filepath"
	"testing"
)

// serverHome is where a private server lives: a temporary directory owned
// by the user the server runs as, a free local port, and a reaper that
// kills the server (found by its pid file) and removes the directory if the
// test process dies before its cleanup.
type serverHome struct {
	as     osUser
	dir    string
	port   int
	reaper *reaper
}

// newServerHome prepares a private server's home, run as user, its pid file
// at pidFile inside the directory. Its cleanup (remove the directory,
// dismiss the reaper) is registered first, so it runs after the server's
// own cleanup, registered by the caller, has stopped the server.
func newServerHome(t testing.TB, user, prefix, pidFile string) *serverHome {
	t.Helper()
	as, err := serverUser(user)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	port := freeLocalPort(t)
	dir, err := as.tempDir(prefix)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	h := &serverHome{as: as, dir: dir, port: port}
	t.Cleanup(func() {
		if err := os.RemoveAll(h.dir); err != nil {
			t.Errorf("testenv: cleanup: %v", err)
		}
		h.reaper.dismiss()
	})
	if h.reaper, err = startReaper(filepath.Join(dir, pidFile), dir); err != nil {
		t.Fatalf("testenv: %s: %v", prefix, err)
	}
	return h
}

// serverProcess is what a private server does to its own process; each
// returns once the server is up, or gone.
type serverProcess interface {
	start() error
	stop() error
	kill() error
}

// serverControl gives a private server its lifecycle methods, for the test
// goroutine, one call at a time. The server's type documents what each step
// means for it.
type serverControl struct {
	kind string // "postgres", "rabbitmq": in failure messages
	proc serverProcess
}

// Start starts the stopped or killed server on the same port and data and
// returns once it accepts connections.
func (s serverControl) Start(t testing.TB) {
	t.Helper()
	s.must(t, s.proc.start())
}

// Stop shuts the server down and returns once it is gone.
func (s serverControl) Stop(t testing.TB) {
	t.Helper()
	s.must(t, s.proc.stop())
}

// Restart stops and starts the server.
func (s serverControl) Restart(t testing.TB) {
	t.Helper()
	s.Stop(t)
	s.Start(t)
}

// Kill sends SIGKILL to the server, as a crash would, and returns once it
// is gone.
func (s serverControl) Kill(t testing.TB) {
	t.Helper()
	s.must(t, s.proc.kill())
}

func (s serverControl) must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("testenv: %s: %v", s.kind, err)
	}
}
