package testenv

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

// RunRelay runs r in the background until the test ends. The returned stop
// cancels it and waits for Run to return (failing the test if that takes
// more than 30 s) and returns Run's error; it may be called early and more
// than once. At cleanup a Run error fails the test.
func RunRelay(t testing.TB, r *relay.Relay) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var (
		once   sync.Once
		runErr error
	)
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				t.Error("relay did not stop within 30s")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("relay Run: %v", err)
		}
	})
	return stop
}
