package deploytest

import (
	"fmt"
	"net"
	"net/url"
	"path"
	"sort"
	"strings"
	"testing"
	"time"
)

const composeFile = "deploy/compose/docker-compose.yml"

// TestCompose checks the docker compose stack against the code and the
// other shipped files: its services refer to each other and to files that
// exist, the relay's configuration is valid and reaches the stack's own
// servers, and Prometheus and Grafana are wired to the relay, the rules and
// the dashboard.
func TestCompose(t *testing.T) {
	t.Parallel()
	docs := yamlDocs(t, composeFile)
	if len(docs) != 1 {
		t.Fatalf("%s: %d documents, want 1", composeFile, len(docs))
	}
	services := mapping(docs[0], "services")
	dir := path.Dir(composeFile)
	for _, want := range []string{"postgres", "rabbitmq", "migrate", "relay", "prometheus", "grafana"} {
		if services[want] == nil {
			t.Errorf("%s: no service %s", composeFile, want)
		}
	}
	checkComposeRefs(t, services, dir)
	port := checkComposeRelay(t, services, dir)
	checkComposePrometheus(t, services, dir, port)
	checkComposeGrafana(t, services, dir)
}

// checkComposeRefs checks that every dependency is a service of the file,
// and every bind mount and build context exists.
func checkComposeRefs(t *testing.T, services map[string]any, dir string) {
	t.Helper()
	for name, svc := range services {
		for _, dep := range dependsOn(svc) {
			if services[dep] == nil {
				t.Errorf("%s: service %s depends on %s, which is not in the file", composeFile, name, dep)
			}
		}
		for src := range bindMounts(svc) {
			if !exists(t, path.Join(dir, src)) {
				t.Errorf("%s: service %s mounts %s, which does not exist", composeFile, name, src)
			}
		}
		if ctx := str(svc, "build", "context"); ctx != "" {
			df := str(svc, "build", "dockerfile")
			if df == "" {
				df = "Dockerfile"
			}
			if !exists(t, path.Join(dir, ctx, df)) {
				t.Errorf("%s: service %s builds %s/%s, which does not exist", composeFile, name, ctx, df)
			}
		}
	}
}

// checkComposeRelay checks the relay service: its configuration and
// environment make a valid configuration whose hosts are services here; it
// starts after the migration, which runs `migrate up` against the same
// table, and has time to drain. It returns the relay's metrics port.
func checkComposeRelay(t *testing.T, services map[string]any, dir string) (port string) {
	t.Helper()
	names := make([]string, 0, len(services))
	for name := range services {
		names = append(names, name)
	}
	sort.Strings(names)
	relay := services["relay"]
	cfgText, environ := relayConfig(t, relay, dir, "run")
	cfg := parseConfig(t, composeFile+" relay", cfgText, environ)
	validate(t, composeFile+" relay", cfg)
	for _, raw := range []string{cfg.Postgres.DSN, cfg.AMQP.URL} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Errorf("relay: %v", err)
			continue
		}
		if services[u.Hostname()] == nil {
			t.Errorf("relay connects to %s, which is not a service (%s)", u.Hostname(), strings.Join(names, ", "))
		}
	}
	port = addrPort(t, cfg.Metrics.Addr)
	if port != metricsPort(t) {
		t.Errorf("relay.yaml: metrics.addr %q, the default port is %s", cfg.Metrics.Addr, metricsPort(t))
	}
	if !publishes(relay, port) {
		t.Errorf("relay does not publish its metrics port %s", port)
	}
	if cond := str(relay, "depends_on", "migrate", "condition"); cond != "service_completed_successfully" {
		t.Errorf("relay must start after migrate completed successfully, depends_on.migrate.condition = %q", cond)
	}
	if grace := str(relay, "stop_grace_period"); grace == "" || duration(t, grace) <= cfg.Relay.ShutdownTimeout+5*time.Second {
		t.Errorf("relay: stop_grace_period %q must exceed relay.shutdown_timeout (%s) + 5s", grace, cfg.Relay.ShutdownTimeout)
	}
	if get(relay, "read_only") != true || !contains(strs(list(relay, "cap_drop")), "ALL") {
		t.Errorf("relay: want read_only: true and cap_drop: [ALL]")
	}

	// migrate runs `migrate up` against the same table.
	mText, mEnv := relayConfig(t, services["migrate"], dir, "migrate")
	mcfg := parseConfig(t, composeFile+" migrate", mText, mEnv)
	if mcfg.Postgres != cfg.Postgres {
		t.Errorf("migrate and relay disagree on postgres: %+v vs %+v", mcfg.Postgres, cfg.Postgres)
	}
	if img, rimg := str(services["migrate"], "image"), str(relay, "image"); img != rimg {
		t.Errorf("migrate runs image %q, relay %q", img, rimg)
	}
	return port
}

// checkComposePrometheus checks that Prometheus scrapes the relay service on
// its metrics port and loads the alerting rules, which are mounted next to
// its configuration.
func checkComposePrometheus(t *testing.T, services map[string]any, dir, port string) {
	t.Helper()
	prom := services["prometheus"]
	mounts := bindMounts(prom)
	promCfgSrc := sourceOf(mounts, "/etc/prometheus/prometheus.yml")
	if promCfgSrc == "" {
		t.Fatalf("prometheus: no bind mount of /etc/prometheus/prometheus.yml")
	}
	promCfg := yamlDocs(t, path.Join(dir, promCfgSrc))[0]
	scraped := false
	for _, sc := range list(promCfg, "scrape_configs") {
		for _, st := range list(sc, "static_configs") {
			for _, target := range strs(list(st, "targets")) {
				host, p, err := net.SplitHostPort(target)
				if err != nil || services[host] == nil {
					t.Errorf("prometheus target %s is not a service:port of %s", target, composeFile)
					continue
				}
				if host == "relay" && p == port && str(sc, "job_name") == "outbox-relay" {
					scraped = true
				}
			}
		}
	}
	if !scraped {
		t.Errorf("prometheus does not scrape relay:%s as job outbox-relay", port)
	}
	rules := strs(list(promCfg, "rule_files"))
	if len(rules) == 0 {
		t.Error("prometheus loads no rule files")
	}
	for _, r := range rules {
		target := r
		if !path.IsAbs(r) {
			target = path.Join("/etc/prometheus", r)
		}
		src := sourceOf(mounts, target)
		if src == "" {
			t.Errorf("prometheus rule file %s is not mounted", target)
		} else if path.Clean(path.Join(dir, src)) != "deploy/prometheus/alerts.yml" {
			t.Errorf("prometheus rule file %s comes from %s, want deploy/prometheus/alerts.yml", target, src)
		}
	}
}

// checkComposeGrafana checks that Grafana's data source is the prometheus
// service, and the dashboard file is mounted where the provider looks.
func checkComposeGrafana(t *testing.T, services map[string]any, dir string) {
	t.Helper()
	graf := services["grafana"]
	gm := bindMounts(graf)
	prov := sourceOf(gm, "/etc/grafana/provisioning")
	if prov == "" {
		t.Fatal("grafana: no bind mount of /etc/grafana/provisioning")
	}
	for _, rel := range files(t, path.Join(dir, prov, "datasources"), ".yml", ".yaml") {
		for _, ds := range list(yamlDocs(t, rel)[0], "datasources") {
			u, err := url.Parse(str(ds, "url"))
			if err != nil || services[u.Hostname()] == nil {
				t.Errorf("%s: data source url %q is not a service", rel, str(ds, "url"))
			}
		}
	}
	dashTarget := ""
	for target, src := range invert(gm) {
		if path.Clean(path.Join(dir, src)) == "deploy/grafana/outbox-relay-dashboard.json" {
			dashTarget = target
		}
	}
	if dashTarget == "" {
		t.Fatal("grafana: deploy/grafana/outbox-relay-dashboard.json is not mounted")
	}
	provided := false
	for _, rel := range files(t, path.Join(dir, prov, "dashboards"), ".yml", ".yaml") {
		for _, p := range list(yamlDocs(t, rel)[0], "providers") {
			if str(p, "options", "path") == path.Dir(dashTarget) {
				provided = true
			}
		}
	}
	if !provided {
		t.Errorf("grafana: no dashboard provider reads %s", path.Dir(dashTarget))
	}
}

// relayConfig returns the relay configuration file a service mounts at the
// path its command passes to --config, and its environment with compose
// defaults expanded. The command must start with first.
func relayConfig(t *testing.T, svc any, dir, first string) (string, []string) {
	t.Helper()
	cmd := strs(list(svc, "command"))
	if len(cmd) == 0 || cmd[0] != first {
		t.Fatalf("command %q, want %s ...", cmd, first)
	}
	if first == "migrate" && (len(cmd) < 2 || cmd[1] != "up") {
		t.Errorf("command %q, want migrate up", cmd)
	}
	configPath := ""
	for i, a := range cmd {
		if a == "--config" && i+1 < len(cmd) {
			configPath = cmd[i+1]
		}
	}
	src := sourceOf(bindMounts(svc), configPath)
	if src == "" {
		t.Fatalf("--config %q is not a bind-mounted file", configPath)
	}
	var environ []string
	for k, v := range mapping(svc, "environment") {
		if strings.HasPrefix(k, "OUTBOX_RELAY_") && !mustKeys()[k] {
			t.Errorf("%s is not a configuration variable", k)
		}
		environ = append(environ, k+"="+expandDefaults(fmt.Sprint(v)))
	}
	return read(t, path.Join(dir, src)), environ
}

// dependsOn lists a service's dependencies (list or map form).
func dependsOn(svc any) []string {
	switch d := get(svc, "depends_on").(type) {
	case []any:
		return strs(d)
	case map[string]any:
		out := make([]string, 0, len(d))
		for k := range d {
			out = append(out, k)
		}
		return out
	}
	return nil
}

// bindMounts maps the relative host paths a service bind-mounts (short
// syntax, ./ or ../) to their container paths.
func bindMounts(svc any) map[string]string {
	out := map[string]string{}
	for _, v := range strs(list(svc, "volumes")) {
		parts := strings.Split(v, ":")
		if len(parts) < 2 || !strings.HasPrefix(parts[0], ".") {
			continue
		}
		out[parts[0]] = parts[1]
	}
	return out
}

func sourceOf(mounts map[string]string, target string) string {
	for src, tgt := range mounts {
		if tgt == target {
			return src
		}
	}
	return ""
}

func invert(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[v] = k
	}
	return out
}

// publishes reports whether a service publishes container port p.
func publishes(svc any, p string) bool {
	for _, spec := range list(svc, "ports") {
		s := fmt.Sprint(spec)
		if strings.HasSuffix(s, ":"+p) || s == p {
			return true
		}
	}
	return false
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
