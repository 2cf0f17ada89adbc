package deploytest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/config"
)

const (
	unitFile = "deploy/systemd/outbox-relay.service"
	envFile  = "deploy/systemd/outbox-relay.env"
)

// unit parses a systemd unit file: section → key → values (keys may repeat).
func unit(t *testing.T, rel string) map[string]map[string][]string {
	t.Helper()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(read(t, rel)))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			out[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a key=value line in a section: %q", rel, n, line)
			}
			out[section][strings.TrimSpace(k)] = append(out[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return out
}

func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	u := unit(t, unitFile)
	svc := u["Service"]
	if svc == nil || u["Unit"] == nil || u["Install"] == nil {
		t.Fatalf("%s: want [Unit], [Service] and [Install] sections", unitFile)
	}
	one := func(k string) string {
		if len(svc[k]) != 1 {
			t.Errorf("%s: want exactly one %s=, got %q", unitFile, k, svc[k])
			return ""
		}
		return svc[k][0]
	}
	for k, want := range map[string]string{
		"Type": "simple", "Restart": "on-failure", "KillSignal": "SIGTERM",
		"NoNewPrivileges": "yes", "ProtectSystem": "strict",
	} {
		if got := one(k); got != want {
			t.Errorf("%s: %s=%s, want %s", unitFile, k, got, want)
		}
	}
	if user := one("User"); user == "" || user == "root" || user == "0" {
		t.Errorf("%s: User=%q, want a dedicated unprivileged user", unitFile, user)
	}
	argv := strings.Fields(one("ExecStart"))
	if len(argv) < 4 || !filepath.IsAbs(argv[0]) || filepath.Base(argv[0]) != "outbox-relay" ||
		argv[1] != "run" || argv[2] != "--config" {
		t.Fatalf("%s: ExecStart=%q, want /path/outbox-relay run --config FILE", unitFile, argv)
	}
	if one("EnvironmentFile") == "" {
		t.Errorf("%s: no EnvironmentFile", unitFile)
	}
	if svc["ProcSubset"] != nil {
		t.Errorf("%s: ProcSubset hides /proc/stat, which the process metrics read", unitFile)
	}

	// The installed config is config.example.yaml (see the unit's comment),
	// with the environment file's values on top.
	environ := envFileVars(t, envFile)
	f := parseConfig(t, "config.example.yaml with "+envFile, read(t, "config.example.yaml"), environ)
	validate(t, unitFile, f)
	if stop := duration(t, one("TimeoutStopSec")); stop <= f.Relay.ShutdownTimeout+5*time.Second {
		t.Errorf("%s: TimeoutStopSec=%s must exceed relay.shutdown_timeout (%s) + 5s", unitFile, stop, f.Relay.ShutdownTimeout)
	}
}

// envFileVars reads an EnvironmentFile: KEY=VALUE lines, comments, blanks.
func envFileVars(t *testing.T, rel string) []string {
	t.Helper()
	var environ []string
	names := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(read(t, rel)))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s:%d: not KEY=VALUE: %q", rel, n, line)
		}
		if !strings.HasPrefix(k, config.EnvPrefix) || !mustKeys()[k] {
			t.Errorf("%s:%d: %s is not a configuration variable", rel, n, k)
		}
		names[k] = true
		environ = append(environ, k+"="+v)
	}
	for _, k := range []string{"OUTBOX_RELAY_POSTGRES_DSN", "OUTBOX_RELAY_AMQP_URL"} {
		if !names[k] {
			t.Errorf("%s: no %s", rel, k)
		}
	}
	return environ
}

// TestSystemdAnalyzeVerify runs `systemd-analyze verify` on the unit, with
// ExecStart pointing at an executable that exists here, where the tool is
// installed.
func TestSystemdAnalyzeVerify(t *testing.T) {
	t.Parallel()
	tool, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(read(t, unitFile), "/usr/local/bin/outbox-relay", self)
	path := filepath.Join(t.TempDir(), "outbox-relay.service")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(tool, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
}
