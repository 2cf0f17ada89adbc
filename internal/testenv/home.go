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
