package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server serves /metrics, /healthz and /readyz.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	live atomic.Pointer[func() error]
}

// NewServer listens on addr at once, so a taken port is a start-up error.
// ready returns nil while the process should receive traffic; /readyz shows
// only the public reasons of its error (see publicReasons).
func NewServer(addr string, g prometheus.Gatherer, ready func() error) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{ln: ln}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if live := s.live.Load(); live != nil {
			if err := (*live)(); err != nil {
				http.Error(w, "not live: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, "not ready: "+publicReasons(err), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

// SetLiveness makes /healthz answer 503 while live returns an error: the
// process is stuck and only a restart helps. Without it /healthz is 200.
func (s *Server) SetLiveness(live func() error) { s.live.Store(&live) }

// Addr is the address actually bound (useful with port 0).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Serve blocks until Shutdown.
func (s *Server) Serve() error {
	if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops the server, waiting at most until ctx is done.
func (s *Server) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }

// publicReasons lists what is down without the errors' text, which names
// hosts, users and databases to anyone who can reach the port: the errors
// (errors.Join trees) that have a Public method give their reason, others
// only count.
func publicReasons(err error) string {
	var reasons []string
	var walk func(error)
	walk = func(err error) {
		if p, ok := err.(interface{ Public() string }); ok {
			reasons = append(reasons, p.Public())
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		reasons = append(reasons, "unavailable")
	}
	walk(err)
	sort.Strings(reasons)
	return strings.Join(slices.Compact(reasons), ", ")
}
