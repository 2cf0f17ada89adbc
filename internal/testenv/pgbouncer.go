package testenv

import (
	"cmp"
	"context"
	"fmt"
	"net/url"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PgBouncer is a private PgBouncer in transaction mode, with its default
// settings otherwise, in front of a PostgreSQL server, listening on
// 127.0.0.1 on a free port. Clients authenticate as the server's users
// without a password (auth_type trust, user postgres).
type PgBouncer struct {
	*serverHome
	cmd  *exec.Cmd
	done chan error
}

// StartPgBouncer starts a PgBouncer in front of the PostgreSQL server that
// upstreamDSN (a URL, such as DatabaseURL()) points at. The test fails when
// pgbouncer is not installed. Cleanup stops it and removes its directory.
func StartPgBouncer(t testing.TB, upstreamDSN string) *PgBouncer {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		if isExecutable("/usr/sbin/pgbouncer") {
			bin = "/usr/sbin/pgbouncer"
		} else {
			t.Fatal("testenv: pgbouncer not installed: run scripts/services.sh up (it installs it on Debian as root)")
		}
	}
	u, err := url.Parse(upstreamDSN)
	if err != nil || u.Hostname() == "" {
		t.Fatalf("testenv: pgbouncer: upstream %q is not a postgres:// URL with a host", upstreamDSN)
	}
	upPort := cmp.Or(u.Port(), "5432")
	// PgBouncer refuses to run as root, like PostgreSQL.
	b := &PgBouncer{serverHome: newServerHome(t, "postgres", "outbox-testenv-pgb-", "pgbouncer.pid"), done: make(chan error, 1)}
	t.Cleanup(func() { b.cleanup() })
	dir, as := b.dir, b.as
	pidFile := filepath.Join(dir, "pgbouncer.pid")
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = transaction
logfile = %s
pidfile = %s
`, u.Hostname(), upPort, b.port, filepath.Join(dir, "userlist.txt"), filepath.Join(dir, "pgbouncer.log"), pidFile)
	files := map[string]string{"pgbouncer.ini": ini, "userlist.txt": `"postgres" ""` + "\n"}
	for name, content := range files {
		if err := as.writeFile(filepath.Join(dir, name), content, 0o600); err != nil {
			t.Fatalf("testenv: pgbouncer: %v", err)
		}
	}
	b.cmd = exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	b.cmd.Dir = dir
	b.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/bin", "HOME=" + dir}
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: as.cred}
	begin := time.Now()
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("testenv: pgbouncer: %v", err)
	}
	go func() { b.done <- b.cmd.Wait() }()
	if err := b.waitReady(); err != nil {
		t.Fatalf("testenv: pgbouncer: %v\nlog tail:\n%s", err, fileTail(filepath.Join(dir, "pgbouncer.log")))
	}
	t.Logf("testenv: private pgbouncer on 127.0.0.1:%d (transaction mode) ready in %v", b.port, time.Since(begin).Round(time.Millisecond))
	return b
}

// DSN returns the URL of database db through the pooler, as user postgres.
func (b *PgBouncer) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", b.port, db)
}

// Port returns the port PgBouncer listens on.
func (b *PgBouncer) Port() int { return b.port }

func (b *PgBouncer) waitReady() error {
	deadline := time.Now().Add(serverStartTimeout)
	for {
		select {
		case err := <-b.done:
			return fmt.Errorf("exited while starting: %v", err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := pgx.Connect(ctx, b.DSN("postgres"))
		if err == nil {
			_, err = conn.Exec(ctx, "SELECT 1")
			_ = conn.Close(ctx)
		}
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not accepting connections after %v: %v", serverStartTimeout, err)
		}
		time.Sleep(serverPoll)
	}
}

func (b *PgBouncer) cleanup() {
	if b.cmd != nil && b.cmd.Process != nil {
		// SIGTERM closes client connections at once; SIGINT would wait
		// for them.
		_ = b.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.done:
		case <-time.After(serverStopTimeout):
			_ = b.cmd.Process.Kill()
			<-b.done
		}
	}
}
