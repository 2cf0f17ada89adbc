package testenv

// Private, throwaway PostgreSQL and RabbitMQ servers for fault tests: a test
// that restarts, stops or kills a server gets one of its own, so the shared
// servers (127.0.0.1:5432, rabbit@localhost on 5672) that every other test
// uses are never disturbed.
//
// Notes on running a second RabbitMQ node next to the shared one (Debian
// packages):
//   - /usr/sbin/rabbitmq-server and /usr/sbin/rabbitmqctl are wrappers that cd
//     to /var/lib/rabbitmq, su to the rabbitmq user and force
//     HOME=/var/lib/rabbitmq (the shared node's Erlang cookie). We call the
//     real scripts in /usr/lib/rabbitmq/bin instead.
//   - /etc/rabbitmq/rabbitmq-env.conf sets NODENAME=rabbit@localhost and
//     /etc/rabbitmq/rabbitmq.conf listens on 127.0.0.1:5672. The private node
//     gets its own RABBITMQ_CONF_ENV_FILE, RABBITMQ_CONFIG_FILE and
//     RABBITMQ_ADVANCED_CONFIG_FILE so it never reads them.
//   - HOME is the node's own directory, holding its own random Erlang cookie:
//     the private node and our rabbitmqctl calls cannot even authenticate to
//     rabbit@localhost, so a wrong -n cannot stop the shared node.
//   - epmd needs nothing: the one epmd on 127.0.0.1:4369 serves both nodes
//     under different names. If none runs, the private node starts one
//     (bound to 127.0.0.1, as the shared configuration does); it outlives the
//     node, which is harmless.
//   - Starting a node while an earlier instance of the same name still
//     shuts down fails (dist_port_already_used) and deletes the pid file, so
//     Stop and Kill wait until the OS process is gone.
//
// If the test binary dies without running its cleanups (a -timeout panic,
// SIGKILL, Ctrl-C), a small reaper process kills the server and removes its
// directory, so nothing is left running on the shared machine.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	serverStartTimeout = 90 * time.Second // generous: the machine is shared
	serverStopTimeout  = 60 * time.Second
	serverPoll         = 50 * time.Millisecond
)

// Postgres is a private PostgreSQL server in a temporary directory, listening
// on 127.0.0.1 on a free port, with trust authentication for user postgres and
// a database named test. Its lifecycle methods must be called from the test
// goroutine, one at a time.
type Postgres struct {
	*serverHome
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

// Start starts the stopped or killed server on the same port and data; after a
// Kill, PostgreSQL runs crash recovery first. It returns once the server
// accepts connections.
func (p *Postgres) Start(t testing.TB) {
	t.Helper()
	if err := p.start(); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
}

// Stop shuts the server down (pg_ctl stop -m fast: open transactions are
// rolled back, clients disconnected) and returns once it is gone.
func (p *Postgres) Stop(t testing.TB) {
	t.Helper()
	if err := p.stop(); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
}

// Restart stops and starts the server.
func (p *Postgres) Restart(t testing.TB) {
	t.Helper()
	p.Stop(t)
	p.Start(t)
}

// Kill sends SIGKILL to the postmaster, as a crash would, and returns once
// the postmaster and all its children are gone.
func (p *Postgres) Kill(t testing.TB) {
	t.Helper()
	if err := p.kill(); err != nil {
		t.Fatalf("testenv: postgres: %v", err)
	}
}

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

// RabbitMQ is a private RabbitMQ node in a temporary directory, with its own
// node name, AMQP port, distribution port, Erlang cookie and no plugins. Its
// lifecycle methods must be called from the test goroutine, one at a time.
type RabbitMQ struct {
	*serverHome        // port is AMQP's
	node        string // e.g. rt1a2b3c4d@localhost
	distPort    int    // Erlang distribution
	tlsPort     int    // AMQPS, 0 without RabbitMQOptions.TLS
	tls         *TLS
	server      string // rabbitmq-server script
	ctl         string // rabbitmqctl script
	pid         int    // of the running beam.smp, 0 when stopped
}

// RabbitMQOptions tunes a private RabbitMQ node.
type RabbitMQOptions struct {
	// Conf holds extra rabbitmq.conf lines, in new-style (sysctl) format,
	// for example "max_message_size = 1048576". They come after the node's
	// own listener and log settings.
	Conf []string
	// Cookie is the node's Erlang cookie; the nodes of one cluster share
	// one (StartRabbitMQCluster). Default: a random one.
	Cookie string
	// TLS, if set, adds an AMQPS listener (TLSURL) with its server
	// certificate, requiring a client certificate of its CA.
	TLS *TLS
}

// StartRabbitMQ creates, starts and returns a private RabbitMQ node. The test
// fails when RabbitMQ is not installed. Cleanup stops the node and
// removes its directory.
func StartRabbitMQ(t testing.TB) *RabbitMQ {
	t.Helper()
	return StartRabbitMQWith(t, RabbitMQOptions{})
}

// newRabbitMQ prepares a private node's directory, files and cleanup,
// without starting it.
func newRabbitMQ(t testing.TB, opts RabbitMQOptions) *RabbitMQ {
	t.Helper()
	server, ctl := rabbitMQScripts()
	if server == "" {
		t.Fatal("testenv: RabbitMQ server (rabbitmq-server, rabbitmqctl) not installed: run scripts/services.sh up (it installs them on Debian as root)")
	}
	r := &RabbitMQ{
		serverHome: newServerHome(t, "rabbitmq", "outbox-testenv-rmq-", "rabbit.pid"),
		node:       "rt" + randomHex(5) + "@localhost",
		distPort:   freeLocalPort(t),
		server:     server,
		ctl:        ctl,
	}
	dir, as := r.dir, r.as
	conf := confLines(opts.Conf)
	if opts.TLS != nil {
		r.tls, r.tlsPort = opts.TLS, freeLocalPort(t)
		conf += confLines([]string{
			fmt.Sprintf("listeners.ssl.local = 127.0.0.1:%d", r.tlsPort),
			"ssl_options.cacertfile = " + opts.TLS.CA,
			"ssl_options.certfile = " + opts.TLS.ServerCert,
			"ssl_options.keyfile = " + opts.TLS.ServerKey,
			"ssl_options.verify = verify_peer",
			"ssl_options.fail_if_no_peer_cert = true",
		})
	}
	t.Cleanup(func() { r.cleanup(t) })

	files := map[string]string{
		".erlang.cookie":    cmp.Or(opts.Cookie, randomHex(16)),
		"enabled_plugins":   "[].\n",
		"rabbitmq-env.conf": "# private node: keeps /etc/rabbitmq/rabbitmq-env.conf out\n",
		"rabbitmq.conf": fmt.Sprintf("listeners.tcp.local = 127.0.0.1:%d\n"+
			"log.console = false\nlog.file.level = info\n", r.port) + conf,
	}
	for name, content := range files {
		mode := os.FileMode(0o644)
		if name == ".erlang.cookie" {
			mode = 0o400 // Erlang refuses a cookie others can read
		}
		if err := as.writeFile(filepath.Join(dir, name), content, mode); err != nil {
			t.Fatalf("testenv: rabbitmq: %v", err)
		}
	}
	return r
}

// StartRabbitMQWith is StartRabbitMQ with options, such as broker limits
// that the shared node must not have.
func StartRabbitMQWith(t testing.TB, opts RabbitMQOptions) *RabbitMQ {
	t.Helper()
	r := newRabbitMQ(t, opts)
	begin := time.Now()
	if err := r.start(); err != nil {
		t.Fatalf("testenv: rabbitmq: %v", err)
	}
	t.Logf("testenv: private rabbitmq %s on 127.0.0.1:%d ready in %v", r.node, r.port, time.Since(begin).Round(time.Millisecond))
	return r
}

// confLines joins configuration lines, each ending with a newline.
func confLines(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(strings.TrimRight(l, "\n"))
		b.WriteByte('\n')
	}
	return b.String()
}

// URL returns the AMQP URL of the node (user guest, vhost /).
func (r *RabbitMQ) URL() string {
	return fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", r.port)
}

// Port returns the AMQP port.
func (r *RabbitMQ) Port() int { return r.port }

// TLSURL returns the amqps:// URL of the node's TLS listener (started with
// RabbitMQOptions.TLS), trusting the CA in the file ca and presenting the
// client certificate.
func (r *RabbitMQ) TLSURL(ca string) string {
	if r.tls == nil {
		panic("testenv: TLSURL of a node started without RabbitMQOptions.TLS")
	}
	q := url.Values{"cacertfile": {ca}, "certfile": {r.tls.ClientCert}, "keyfile": {r.tls.ClientKey}}
	return fmt.Sprintf("amqps://guest:guest@127.0.0.1:%d/?%s", r.tlsPort, q.Encode())
}

// Node returns the Erlang node name, for rabbitmqctl -n.
func (r *RabbitMQ) Node() string { return r.node }

// Start starts the stopped or killed node with the same name, port and data
// (durable queues and persistent messages survive) and returns once it
// accepts AMQP connections.
func (r *RabbitMQ) Start(t testing.TB) {
	t.Helper()
	if err := r.start(); err != nil {
		t.Fatalf("testenv: rabbitmq: %v", err)
	}
}

// Stop stops the node gracefully (SIGTERM, the equivalent of rabbitmqctl
// stop) and returns once its process is gone and its AMQP port closed.
func (r *RabbitMQ) Stop(t testing.TB) {
	t.Helper()
	if err := r.stop(); err != nil {
		t.Fatalf("testenv: rabbitmq: %v", err)
	}
}

// Restart stops and starts the node.
func (r *RabbitMQ) Restart(t testing.TB) {
	t.Helper()
	r.Stop(t)
	r.Start(t)
}

// Kill sends SIGKILL to the node's Erlang VM, as a crash would, and returns
// once it is gone and its AMQP port closed.
func (r *RabbitMQ) Kill(t testing.TB) {
	t.Helper()
	if err := r.kill(); err != nil {
		t.Fatalf("testenv: rabbitmq: %v", err)
	}
}

// Ctl runs rabbitmqctl against the node (for example "close_all_connections",
// "set_vm_memory_high_watermark 0" to block publishers) and returns its output.
//
// A node that has just opened its AMQP port may still be booting, and
// rabbitmqctl then fails without a word (exit 64 seen under load): a failed
// call is tried again, up to three times.
func (r *RabbitMQ) Ctl(t testing.TB, args ...string) string {
	t.Helper()
	var (
		out string
		err error
	)
	for attempt := 1; attempt <= 3; attempt++ {
		out, err = r.as.run(serverStopTimeout, r.dir, r.env(), r.ctl, append([]string{"-n", r.node}, args...)...)
		if err == nil {
			return out
		}
		if attempt < 3 {
			t.Logf("testenv: rabbitmqctl %s (attempt %d): %v\n%s", strings.Join(args, " "), attempt, err, out)
			time.Sleep(time.Second) // a pause between tries of an external command
		}
	}
	t.Fatalf("testenv: rabbitmqctl %s: %v\n%s", strings.Join(args, " "), err, out)
	return ""
}

func (r *RabbitMQ) pidFile() string { return filepath.Join(r.dir, "rabbit.pid") }

func (r *RabbitMQ) crashDump() string { return filepath.Join(r.dir, "erl_crash.dump") }

func (r *RabbitMQ) logFile() string {
	return filepath.Join(r.dir, "log", r.node+".log")
}

func (r *RabbitMQ) env() []string {
	d := r.dir
	return []string{
		"PATH=/usr/lib/rabbitmq/bin:/usr/local/bin:/usr/bin:/bin",
		"HOME=" + d, // its own .erlang.cookie, for the node and our rabbitmqctl
		"LANG=C.UTF-8", "LC_ALL=C.UTF-8",
		"RABBITMQ_NODENAME=" + r.node,
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		"RABBITMQ_NODE_PORT=" + strconv.Itoa(r.port),
		"RABBITMQ_DIST_PORT=" + strconv.Itoa(r.distPort),
		"RABBITMQ_CONF_ENV_FILE=" + filepath.Join(d, "rabbitmq-env.conf"),
		"RABBITMQ_CONFIG_FILE=" + filepath.Join(d, "rabbitmq.conf"),
		"RABBITMQ_ADVANCED_CONFIG_FILE=" + filepath.Join(d, "advanced.config"), // absent on purpose
		"RABBITMQ_ENABLED_PLUGINS_FILE=" + filepath.Join(d, "enabled_plugins"),
		"RABBITMQ_MNESIA_BASE=" + filepath.Join(d, "mnesia"),
		"RABBITMQ_LOG_BASE=" + filepath.Join(d, "log"),
		"RABBITMQ_PID_FILE=" + r.pidFile(),
		"ERL_CRASH_DUMP=" + r.crashDump(),
		"ERL_EPMD_ADDRESS=127.0.0.1",
		// One scheduler is plenty for a test node on a shared 2-core machine.
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=+S 1:1 +sbwt none -kernel inet_dist_use_interface {127,0,0,1}",
	}
}

func (r *RabbitMQ) start() error {
	if r.pid != 0 {
		return errors.New("start: already running")
	}
	_ = os.Remove(r.crashDump())
	if out, err := r.as.run(serverStartTimeout, r.dir, r.env(), r.server, "-detached"); err != nil {
		return fmt.Errorf("rabbitmq-server -detached: %w\n%s", err, out)
	}
	// -detached returns at once. rabbitmqctl await_startup fails at once too
	// while the node is not registered with epmd yet, and every rabbitmqctl
	// call costs an Erlang VM start, so poll with AMQP dials instead, and stop
	// early if the VM crashed during boot.
	deadline := time.Now().Add(serverStartTimeout)
	for {
		conn, err := amqp.DialConfig(r.URL(), amqp.Config{Dial: amqp.DefaultDial(2 * time.Second)})
		if err == nil {
			_ = conn.Close()
			break
		}
		if _, serr := os.Stat(r.crashDump()); serr == nil {
			return fmt.Errorf("start: node %s crashed while booting (%s)\nlog tail:\n%s",
				r.node, firstLine(r.crashDump()), fileTail(r.logFile()))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("start: node %s not accepting AMQP after %v: %v\nlog tail:\n%s",
				r.node, serverStartTimeout, err, fileTail(r.logFile()))
		}
		time.Sleep(serverPoll)
	}
	pid, err := readPid(r.pidFile())
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	r.pid = pid
	return nil
}

func (r *RabbitMQ) stop() error {
	if r.pid == 0 {
		return errors.New("stop: not running")
	}
	// SIGTERM is a graceful stop, as rabbitmqctl stop is (connections closed,
	// message stores flushed), without starting a CLI Erlang VM: about 1s
	// instead of 3.5s on this machine.
	if err := syscall.Kill(r.pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop: signal beam %d: %w", r.pid, err)
	}
	return r.waitGone()
}

func (r *RabbitMQ) kill() error {
	if r.pid == 0 {
		return errors.New("kill: not running")
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill beam %d: %w", r.pid, err)
	}
	if err := r.waitGone(); err != nil {
		return err
	}
	_ = os.Remove(r.pidFile()) // stale now
	return nil
}

func (r *RabbitMQ) waitGone() error {
	pid := r.pid
	err := pollUntil(serverStopTimeout, "node process gone and port closed", func() bool {
		return processGone(pid) && !portOpen(r.port)
	})
	if err == nil {
		r.pid = 0
	}
	return err
}

func (r *RabbitMQ) cleanup(t testing.TB) {
	if r.pid != 0 {
		if err := r.stop(); err != nil {
			t.Logf("testenv: rabbitmq cleanup: %v; killing it", err)
			if err := r.kill(); err != nil {
				t.Errorf("testenv: rabbitmq cleanup: %v", err)
			}
		}
	}
}

// rabbitMQScripts returns the rabbitmq-server and rabbitmqctl scripts to run,
// preferring Debian's real ones over the /usr/sbin wrappers (see the notes at
// the top), or "" when RabbitMQ is not installed.
func rabbitMQScripts() (server, ctl string) {
	for _, dir := range []string{"/usr/lib/rabbitmq/bin", "/usr/local/sbin", "/usr/sbin", "/opt/rabbitmq/sbin"} {
		s, c := filepath.Join(dir, "rabbitmq-server"), filepath.Join(dir, "rabbitmqctl")
		if isExecutable(s) && isExecutable(c) {
			return s, c
		}
	}
	return "", ""
}

// osUser is the account a server runs as: its own system user when the tests
// run as root (PostgreSQL refuses root; RabbitMQ's files belong to rabbitmq),
// the current user otherwise.
type osUser struct {
	cred *syscall.Credential // nil: the current user
}

func serverUser(name string) (osUser, error) {
	if os.Geteuid() != 0 {
		return osUser{}, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return osUser{}, fmt.Errorf("running as root needs the %s system user: %w", name, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return osUser{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}, nil
}

func (u osUser) chown(path string) error {
	if u.cred == nil {
		return nil
	}
	return os.Chown(path, int(u.cred.Uid), int(u.cred.Gid))
}

// tempDir makes a directory under the system temporary directory (t.TempDir's
// parents are private to root) that the user owns.
func (u osUser) tempDir(prefix string) (string, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return "", err
	}
	if err := u.chown(dir); err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	return dir, nil
}

func (u osUser) writeFile(path, content string, mode os.FileMode) error {
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		return err
	}
	return u.chown(path)
}

// run runs a command as the user with exactly env, bounded by timeout, and
// returns its combined output.
func (u osUser) run(timeout time.Duration, dir string, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.cred}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A daemon that kept our output pipe open must not hold us up.
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	return out.String(), err
}

// reaper kills a server and removes its directory if the test binary exits
// without running its cleanups: a shell child blocks reading a pipe from us,
// and end of file without "done" means we are gone.
type reaper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

const reaperScript = `read -r line || true
[ "$line" = done ] && exit 0
pid=$(head -n 1 "$1" 2>/dev/null) || pid=
case "$pid" in ''|*[!0-9]*) ;; *)
	if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"; then kill -9 "$pid"; fi ;;
esac
sleep 2
rm -rf -- "$2"
`

// startReaper watches the server whose pid is in pidFile; it kills it only if
// that process's command line mentions dir, so a recycled pid is safe.
func startReaper(pidFile, dir string) (*reaper, error) {
	cmd := exec.Command("/bin/sh", "-c", reaperScript, "outbox-testenv-reaper", pidFile, dir)
	// Its own process group: a Ctrl-C aimed at go test must not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("reaper: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("reaper: %w", err)
	}
	return &reaper{cmd: cmd, stdin: stdin}, nil
}

// dismiss tells the reaper that the cleanup ran and waits for it to exit.
func (r *reaper) dismiss() {
	if r == nil {
		return
	}
	_, _ = io.WriteString(r.stdin, "done\n")
	_ = r.stdin.Close()
	_ = r.cmd.Wait()
}

// freeLocalPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeLocalPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func portOpen(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// pollUntil polls cond every serverPoll until it holds or timeout passes.
func pollUntil(timeout time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for: %s", timeout, what)
		}
		time.Sleep(serverPoll)
	}
	return nil
}

// processGone reports whether pid no longer runs. A zombie counts as gone:
// the servers are daemons whose parent is init, which may reap late.
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) STATE ...; comm may contain spaces and parentheses.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] == 'Z' || stat[i+2] == 'X'
	}
	return false
}

// processesWith returns the live processes whose command line contains s.
func processesWith(s string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(s)) && !processGone(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func readPid(path string) (int, error) {
	line := firstLine(path)
	pid, err := strconv.Atoi(line)
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("no pid in %s (%q)", path, line)
	}
	return pid, nil
}

func firstLine(path string) string {
	b, _ := os.ReadFile(path)
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

// fileTail returns the last lines of a log file, for error messages.
func fileTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

func appendFile(path, content string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(content); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
