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
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	serverStartTimeout = 90 * time.Second // generous: the machine is shared
	serverStopTimeout  = 60 * time.Second
	serverPoll         = 50 * time.Millisecond
)

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

// freeLocalPort returns a TCP port on 127.0.0.1 that was free a moment ago,
// below the kernel's ephemeral range: a private server binds it seconds
// later (RabbitMQ boots in about 5 s), and a port from that range (what
// listening on port 0 hands out) can meanwhile become the local port of
// any outgoing connection on the machine. That happened: a cluster node
// failed to boot with eaddrinuse. Ports handed out in this process are
// not handed out again.
func freeLocalPort(t testing.TB) int {
	t.Helper()
	lo, hi := 10000, ephemeralLow()
	for range 200 {
		port := lo + mrand.IntN(hi-lo)
		portsMu.Lock()
		taken := portsGiven[port]
		portsGiven[port] = true
		portsMu.Unlock()
		if taken {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		_ = l.Close()
		return port
	}
	t.Fatalf("testenv: no free port between %d and %d after 200 tries", lo, hi)
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// ephemeralLow is the first port of the kernel's ephemeral range (32768 if
// it cannot be read, Linux's default).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				return n
			}
		}
	}
	return 32768
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
