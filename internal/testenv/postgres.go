package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a private PostgreSQL server in a temporary directory, listening
// on 127.0.0.1 on a free port, with trust authentication for user postgres and
// a database named test. Its lifecycle methods must be called from the test
// goroutine, one at a time: Start after a Kill runs crash recovery first;
// Stop is pg_ctl stop -m fast (open transactions are rolled back, clients
// disconnected); Kill sends SIGKILL to the postmaster and returns once it
// and all its children are gone.
type Postgres struct {
	*serverHome
	serverControl
	data    string // dir/data
	name    string // cluster_name: marks the server's processes
	bin     string // directory holding pg_ctl and initdb
	running bool
}

// PostgresOptions tunes a private PostgreSQL server.
type PostgresOptions struct {
	// TLS, if set, turns ssl on with its server certificate; connections
	// over TLS must then present a client certificate of its CA whose CN
	// is the database user (clientcert=verify-full). Unencrypted
	// connections are still accepted.
	TLS *TLS
}

// StartPostgres creates, starts and returns a private PostgreSQL server. The
// test fails when PostgreSQL is not installed. Cleanup stops the server
// and removes its directory.
func StartPostgres(t testing.TB) *Postgres {
	t.Helper()
	return StartPostgresWith(t, PostgresOptions{})
}

// StartPostgresWith is StartPostgres with options.
func StartPostgresWith(t testing.TB, opts PostgresOptions) *Postgres {
	t.Helper()
	bin := postgresBinDir()
	if bin == "" {
		t.Fatal("testenv: PostgreSQL server binaries (pg_ctl, initdb) not installed: run scripts/services.sh up (it installs them on Debian as root)")
	}
	home := newServerHome(t, "postgres", "outbox-testenv-pg-", filepath.Join("data", "postmaster.pid"))
	p := &Postgres{
		serverHome: home,
		data:       filepath.Join(home.dir, "data"),
		name:       "outbox-testenv-" + randomHex(6),
		bin:        bin,
	}
	p.serverControl = serverControl{kind: "postgres", proc: p}
	t.Cleanup(func() { p.cleanup(t) })

	begin := time.Now()
	if out, err := p.pg(serverStartTimeout, "initdb", "-D", p.data, "-A", "trust", "-U", "postgres",
		"-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"); err != nil {
		t.Fatalf("testenv: postgres initdb: %v\n%s", err, out)
	}
	// fsync and full_page_writes only protect against an OS crash; killing
	// the server (Kill) keeps every committed transaction either way.
	conf := fmt.Sprintf(`
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = '%s'
cluster_name = '%s'
fsync = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
`, p.port, p.dir, p.name)
	if opts.TLS != nil {
		if err := p.enableTLS(opts.TLS); err != nil {
			t.Fatalf("testenv: postgres: %v", err)
		}
		conf += "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'\n"
	}
	if err := appendFile(filepath.Join(p.data, "postgresql.conf"), conf); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
	if err := p.start(); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
	if err := p.createDatabase(); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
	t.Logf("testenv: private postgres on 127.0.0.1:%d ready in %v", p.port, time.Since(begin).Round(time.Millisecond))
	return p
}

// enableTLS copies the certificates into the data directory (PostgreSQL
// wants its key private to its user) and requires a client certificate on
// TLS connections.
func (p *Postgres) enableTLS(c *TLS) error {
	for name, data := range map[string][]byte{"server.pem": c.serverPEM, "server.key": c.serverKey, "ca.pem": c.caPEM} {
		if err := p.as.writeFile(filepath.Join(p.data, name), string(data), 0o600); err != nil {
			return err
		}
	}
	hba := filepath.Join(p.data, "pg_hba.conf")
	old, err := os.ReadFile(hba)
	if err != nil {
		return err
	}
	return os.WriteFile(hba, append([]byte("hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"), old...), 0o600)
}

// DSN returns the URL of the server's test database.
func (p *Postgres) DSN() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/test?sslmode=disable", p.port)
}

// Port returns the TCP port the server listens on.
func (p *Postgres) Port() int { return p.port }

func (p *Postgres) start() error {
	if p.running {
		return errors.New("start: already running")
	}
	logFile := filepath.Join(p.dir, "postgres.log")
	out, err := p.pg(serverStartTimeout, "pg_ctl", "start", "-D", p.data, "-l", logFile,
		"-w", "-t", strconv.Itoa(int(serverStartTimeout/time.Second)))
	if err != nil {
		return fmt.Errorf("pg_ctl start: %w\n%s\nlog tail:\n%s", err, out, fileTail(logFile))
	}
	p.running = true
	return nil
}

func (p *Postgres) stop() error {
	if !p.running {
		return errors.New("stop: not running")
	}
	out, err := p.pg(serverStopTimeout, "pg_ctl", "stop", "-D", p.data, "-m", "fast",
		"-w", "-t", strconv.Itoa(int(serverStopTimeout/time.Second)))
	if err != nil {
		return fmt.Errorf("pg_ctl stop: %w\n%s", err, out)
	}
	p.running = false
	return pollUntil(serverStopTimeout, "port closed", func() bool { return !portOpen(p.port) })
}

func (p *Postgres) kill() error {
	if !p.running {
		return errors.New("kill: not running")
	}
	pid, err := readPid(filepath.Join(p.data, "postmaster.pid"))
	if err != nil {
		return fmt.Errorf("kill: %w", err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill postmaster %d: %w", pid, err)
	}
	p.running = false
	// The children notice the postmaster's death and exit on their own; a new
	// postmaster refuses to start while they still hold the shared memory.
	title := "postgres: " + p.name + ":"
	if err := pollUntil(serverStopTimeout, "postmaster and children gone", func() bool {
		return processGone(pid) && len(processesWith(title)) == 0
	}); err != nil {
		return fmt.Errorf("kill: %w", err)
	}
	// A new postmaster refuses to start while the pid in postmaster.pid
	// exists, and the dead one stays a zombie until init reaps it (about a
	// second on this machine). Should init never reap, drop the stale lock
	// file instead; its children are gone, so nothing else guards the data.
	if err := pollUntil(10*time.Second, "postmaster reaped", func() bool {
		return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
	}); err != nil {
		if err := os.Remove(filepath.Join(p.data, "postmaster.pid")); err != nil {
			return fmt.Errorf("kill: remove stale postmaster.pid: %w", err)
		}
	}
	return nil
}

func (p *Postgres) createDatabase() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", p.port))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE test"); err != nil {
		return fmt.Errorf("create database test: %w", err)
	}
	return nil
}

func (p *Postgres) cleanup(t testing.TB) {
	if p.running {
		if err := p.stop(); err != nil {
			t.Logf("testenv: postgres cleanup: %v; killing it", err)
			if err := p.kill(); err != nil {
				t.Errorf("testenv: postgres cleanup: %v", err)
			}
		}
	}
}

// pg runs one of the PostgreSQL programs as the server's user.
func (p *Postgres) pg(timeout time.Duration, prog string, args ...string) (string, error) {
	env := []string{"PATH=" + p.bin + ":/usr/bin:/bin", "HOME=" + p.dir, "LANG=C", "LC_ALL=C", "TZ=UTC"}
	return p.as.run(timeout, p.dir, env, filepath.Join(p.bin, prog), args...)
}

// postgresBinDir returns the directory of the newest installed pg_ctl and
// initdb (Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH), or
// "" when there is none.
func postgresBinDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(d string) float64 {
		v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(d)), 64)
		return v
	}
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if isExecutable(filepath.Join(d, "initdb")) && isExecutable(filepath.Join(d, "pg_ctl")) {
			return d
		}
	}
	if path, err := exec.LookPath("initdb"); err == nil && isExecutable(filepath.Join(filepath.Dir(path), "pg_ctl")) {
		return filepath.Dir(path)
	}
	return ""
}
