package testenv

import (
	"cmp"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// RabbitMQ is a private RabbitMQ node in a temporary directory, with its own
// node name, AMQP port, distribution port, Erlang cookie and no plugins. Its
// lifecycle methods must be called from the test goroutine, one at a time:
// Start keeps the node's name, port and data (durable queues and persistent
// messages survive); Stop is SIGTERM, the equivalent of rabbitmqctl stop;
// Kill sends SIGKILL to the node's Erlang VM. Stop and Kill return once the
// process is gone and the AMQP port closed.
type RabbitMQ struct {
	*serverHome // port is AMQP's
	serverControl
	node     string // e.g. rt1a2b3c4d@localhost
	distPort int    // Erlang distribution
	tlsPort  int    // AMQPS, 0 without RabbitMQOptions.TLS
	tls      *TLS
	server   string // rabbitmq-server script
	ctl      string // rabbitmqctl script
	pid      int    // of the running beam.smp, 0 when stopped
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
	r.serverControl = serverControl{kind: "rabbitmq", proc: r}
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
