package deploytest

import (
	"fmt"
	"path"
	"strings"
	"testing"
	"time"
)

// k8sObject is one manifest of deploy/k8s.
type k8sObject struct {
	file string
	doc  map[string]any
}

func (o k8sObject) kind() string { return str(o.doc, "kind") }
func (o k8sObject) name() string { return str(o.doc, "metadata", "name") }
func (o k8sObject) String() string {
	return fmt.Sprintf("%s: %s %s", o.file, o.kind(), o.name())
}

func k8sObjects(t *testing.T) []k8sObject {
	t.Helper()
	var objs []k8sObject
	for _, rel := range files(t, "deploy/k8s", ".yaml", ".yml") {
		for _, doc := range yamlDocs(t, rel) {
			o := k8sObject{file: rel, doc: doc}
			if o.kind() == "" || str(doc, "apiVersion") == "" {
				t.Errorf("%s: a document without apiVersion or kind", rel)
				continue
			}
			objs = append(objs, o)
		}
	}
	if len(objs) == 0 {
		t.Fatal("no manifests under deploy/k8s")
	}
	return objs
}

// TestK8sManifests checks the Kubernetes examples against the code: the
// kustomization, the relay's ConfigMap, every relay container (sidecar,
// standalone Deployment, migration Job) and the PodMonitor.
func TestK8sManifests(t *testing.T) {
	t.Parallel()
	objs := k8sObjects(t)
	byKind := map[string]map[string]k8sObject{}
	for _, o := range objs {
		if byKind[o.kind()] == nil {
			byKind[o.kind()] = map[string]k8sObject{}
		}
		byKind[o.kind()][o.name()] = o
	}
	checkKustomization(t, objs)

	// The relay's configuration file, strictly parsed.
	cm, ok := byKind["ConfigMap"]["outbox-relay-config"]
	if !ok {
		t.Fatal("no ConfigMap outbox-relay-config")
	}
	cfgText := str(cm.doc, "data", "config.yaml")
	cfg := parseConfig(t, cm.String()+" config.yaml", cfgText, nil)
	port := addrPort(t, cfg.Metrics.Addr)
	if port != metricsPort(t) {
		t.Errorf("%s: metrics.addr %q, but the default port is %s", cm, cfg.Metrics.Addr, metricsPort(t))
	}
	checkRelayPods(t, objs, byKind, cfgText, cfg.Relay.ShutdownTimeout, port)
	checkPodMonitors(t, byKind, port)
}

// checkKustomization checks that kustomization.yaml names files that exist,
// and no Secret: applying the example must never overwrite real credentials
// with placeholders.
func checkKustomization(t *testing.T, objs []k8sObject) {
	t.Helper()
	for _, o := range objs {
		if o.kind() != "Kustomization" {
			continue
		}
		for _, r := range strs(list(o.doc, "resources")) {
			rel := path.Join(path.Dir(o.file), r)
			if !exists(t, rel) {
				t.Errorf("%s: resource %s does not exist", o, r)
				continue
			}
			for _, doc := range yamlDocs(t, rel) {
				if str(doc, "kind") == "Secret" {
					t.Errorf("%s: resource %s is the placeholder Secret %s; leave it out of what kubectl apply -k applies", o, r, str(doc, "metadata", "name"))
				}
			}
		}
	}
}

// checkRelayPods checks every Deployment and Job that runs the relay: each
// relay container, the sidecar's shape, the grace period and the scrape
// annotation; and that the examples hold a sidecar, a standalone Deployment
// probed for readiness and a migration Job.
func checkRelayPods(t *testing.T, objs []k8sObject, byKind map[string]map[string]k8sObject, cfgText string, shutdownTimeout time.Duration, port string) {
	t.Helper()
	relays, readiness, sidecars := 0, 0, 0
	for _, o := range objs {
		if o.kind() != "Deployment" && o.kind() != "Job" {
			continue
		}
		pod := get(o.doc, "spec", "template", "spec")
		// The kubelet's service-link variables are of no use to the pod.
		if get(pod, "enableServiceLinks") != false {
			t.Errorf("%s: the pod should set enableServiceLinks: false", o)
		}
		others := 0
		for _, c := range list(pod, "containers") {
			if !strings.Contains(str(c, "image"), "outbox-relay") {
				others++
				continue
			}
			relays++
			readiness += checkRelayContainer(t, o, pod, c, byKind, cfgText, port)
		}
		for _, c := range list(pod, "initContainers") {
			if !strings.Contains(str(c, "image"), "outbox-relay") {
				continue
			}
			// `run` never exits: as a plain init container it would hold
			// the application back forever.
			if str(c, "restartPolicy") != "Always" {
				t.Errorf("%s: init container %s runs the relay without restartPolicy: Always (a native sidecar)", o, str(c, "name"))
			}
			relays++
			sidecars++
			readiness += checkRelayContainer(t, o, pod, c, byKind, cfgText, port)
		}
		if others > 0 && len(list(pod, "containers")) > others {
			t.Errorf("%s: the relay beside the application should be a native sidecar (an init container with restartPolicy: Always), so that Jobs complete", o)
		}
		if o.kind() == "Deployment" && others == 0 {
			checkDisruptionBudget(t, o, byKind)
		}
		if o.kind() == "Deployment" {
			grace, _ := get(pod, "terminationGracePeriodSeconds").(int)
			min := shutdownTimeout + 5*time.Second
			if time.Duration(grace)*time.Second <= min {
				t.Errorf("%s: terminationGracePeriodSeconds %d must exceed relay.shutdown_timeout (%s) + 5s for the metrics server",
					o, grace, shutdownTimeout)
			}
			ann := mapping(o.doc, "spec", "template", "metadata", "annotations")
			if p, ok := ann["prometheus.io/port"]; ok && p != port {
				t.Errorf("%s: prometheus.io/port %v, the relay serves metrics on %s", o, p, port)
			}
		}
	}
	if relays < 3 {
		t.Errorf("found %d relay containers; want the sidecar, the standalone Deployment and the migration Job", relays)
	}
	if sidecars == 0 {
		t.Error("no relay runs as a native sidecar (an init container with restartPolicy: Always)")
	}
	if readiness == 0 {
		t.Error("no relay container probes /readyz (the standalone Deployment should)")
	}
}

// checkPodMonitors checks that each PodMonitor scrapes a named port of the
// pods it selects.
func checkPodMonitors(t *testing.T, byKind map[string]map[string]k8sObject, port string) {
	t.Helper()
	for _, pm := range byKind["PodMonitor"] {
		sel := mapping(pm.doc, "spec", "selector", "matchLabels")
		for _, ep := range list(pm.doc, "spec", "podMetricsEndpoints") {
			want := str(ep, "port")
			found := false
			for _, d := range byKind["Deployment"] {
				labels := mapping(d.doc, "spec", "template", "metadata", "labels")
				if !matches(labels, sel) {
					continue
				}
				pod := get(d.doc, "spec", "template", "spec")
				for _, c := range append(list(pod, "containers"), list(pod, "initContainers")...) {
					for _, p := range list(c, "ports") {
						if str(p, "name") == want && fmt.Sprint(get(p, "containerPort")) == port {
							found = true
						}
					}
				}
			}
			if !found {
				t.Errorf("%s: no Deployment it selects has a container port %q = %s", pm, want, port)
			}
		}
	}
}

// checkRelayContainer checks one outbox-relay container and reports whether
// it has a readiness probe.
func checkRelayContainer(t *testing.T, o k8sObject, pod, c any, byKind map[string]map[string]k8sObject,
	cfgText, port string) int {
	t.Helper()
	name := fmt.Sprintf("%s container %s", o, str(c, "name"))
	args := strs(list(c, "args"))
	if len(args) == 0 {
		t.Errorf("%s: no args", name)
		return 0
	}
	switch {
	case o.kind() == "Job":
		if len(args) < 2 || args[0] != "migrate" || args[1] != "up" {
			t.Errorf("%s: args %q, want migrate up", name, args)
		}
	case args[0] != "run":
		t.Errorf("%s: args %q, want run", name, args)
	}

	// --config names the mounted ConfigMap key.
	configPath := ""
	for i, a := range args {
		if a == "--config" && i+1 < len(args) {
			configPath = args[i+1]
		}
	}
	mounts := containerMounts(t, name, pod, c, byKind)
	if mounts[configPath] != "configmap/config.yaml" {
		t.Errorf("%s: --config %q is not the mounted config.yaml of the ConfigMap (mounts: %v)", name, configPath, mounts)
	}
	f := parseConfig(t, name, cfgText, containerEnviron(t, name, c, byKind, mounts))
	if o.kind() == "Job" {
		if f.Postgres.DSN == "" {
			t.Errorf("%s: no OUTBOX_RELAY_POSTGRES_DSN", name)
		}
	} else {
		validate(t, name, f)
	}
	ready := 0
	if o.kind() != "Job" {
		ready = checkProbes(t, name, c, port)
	}
	checkContainerLimits(t, name, c)
	return ready
}

// containerMounts returns the files container c of pod mounts, by path: a
// ConfigMap key as "configmap/key", a Secret's directory (path ending in /)
// as "secret/name". Every mount must be read-only.
func containerMounts(t *testing.T, name string, pod, c any, byKind map[string]map[string]k8sObject) map[string]string {
	t.Helper()
	mounts := map[string]string{} // mount path of a file → "configmap/key" or "secret/name"
	for _, m := range list(c, "volumeMounts") {
		vol := findVolume(pod, str(m, "name"))
		if vol == nil {
			t.Errorf("%s: volumeMount %s has no volume", name, str(m, "name"))
			continue
		}
		if cmName := str(vol, "configMap", "name"); cmName != "" {
			cm, ok := byKind["ConfigMap"][cmName]
			if !ok {
				t.Errorf("%s: ConfigMap %s is not in deploy/k8s", name, cmName)
				continue
			}
			for key := range mapping(cm.doc, "data") {
				p := path.Join(str(m, "mountPath"), key)
				if sub := str(m, "subPath"); sub != "" {
					if sub != key {
						continue
					}
					p = str(m, "mountPath")
				}
				mounts[p] = "configmap/" + key
			}
		}
		if s := str(vol, "secret", "secretName"); s != "" {
			mounts[str(m, "mountPath")+"/"] = "secret/" + s
		}
		if get(m, "readOnly") != true {
			t.Errorf("%s: volumeMount %s should be readOnly", name, str(m, "name"))
		}
	}
	return mounts
}

// containerEnviron returns container c's environment as KEY=VALUE, Secret
// references resolved: real variables, from Secret keys that the example
// has; a CA file named in the DSN must be in one of mounts.
func containerEnviron(t *testing.T, name string, c any, byKind map[string]map[string]k8sObject, mounts map[string]string) []string {
	t.Helper()
	var environ []string
	for _, e := range list(c, "env") {
		env := str(e, "name")
		value := str(e, "value")
		if strings.HasPrefix(env, "OUTBOX_RELAY_") {
			if _, ok := mustKeys()[env]; !ok {
				t.Errorf("%s: %s is not a configuration variable", name, env)
			}
		}
		if ref := mapping(e, "valueFrom", "secretKeyRef"); ref != nil {
			sec, ok := byKind["Secret"][str(ref, "name")]
			if !ok {
				t.Errorf("%s: %s: Secret %s is not in deploy/k8s", name, env, str(ref, "name"))
				continue
			}
			v, ok := mapping(sec.doc, "stringData")[str(ref, "key")].(string)
			if !ok {
				t.Errorf("%s: %s: Secret %s has no key %s", name, env, str(ref, "name"), str(ref, "key"))
				continue
			}
			value = v
		}
		environ = append(environ, env+"="+value)
		// A CA file named in the DSN must be in a mounted Secret.
		if env == "OUTBOX_RELAY_POSTGRES_DSN" {
			if ca := queryParam(value, "sslrootcert"); ca != "" && !mountedUnder(mounts, ca) {
				t.Errorf("%s: the DSN's sslrootcert %s is not in a mounted Secret (mounts: %v)", name, ca, mounts)
			}
		}
	}
	return environ
}

// checkProbes checks that a long-running relay container exposes the
// metrics port and probes /healthz and /readyz on it; it returns 1 if the
// container has a readiness probe.
func checkProbes(t *testing.T, name string, c any, port string) (ready int) {
	t.Helper()
	portName := ""
	for _, p := range list(c, "ports") {
		if fmt.Sprint(get(p, "containerPort")) == port {
			portName = str(p, "name")
		}
	}
	if portName == "" {
		t.Errorf("%s: no containerPort %s (metrics.addr)", name, port)
	}
	probes := map[string]string{"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
	for probe, want := range probes {
		p := mapping(c, probe)
		if p == nil {
			if probe == "livenessProbe" {
				t.Errorf("%s: no livenessProbe", name)
			}
			continue
		}
		if got := str(p, "httpGet", "path"); got != want {
			t.Errorf("%s: %s path %q, want %s", name, probe, got, want)
		}
		if got := fmt.Sprint(get(p, "httpGet", "port")); got != port && got != portName {
			t.Errorf("%s: %s port %s, want %s or %q", name, probe, got, port, portName)
		}
		if probe == "readinessProbe" {
			ready = 1
		}
	}
	return ready
}

// checkContainerLimits checks a relay container's resources and security
// context.
func checkContainerLimits(t *testing.T, name string, c any) {
	t.Helper()
	for _, k := range []string{"requests", "limits"} {
		for _, r := range []string{"cpu", "memory"} {
			if get(c, "resources", k, r) == nil {
				t.Errorf("%s: no resources.%s.%s", name, k, r)
			}
		}
	}
	sc := mapping(c, "securityContext")
	if sc["runAsNonRoot"] != true || sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false {
		t.Errorf("%s: securityContext must set runAsNonRoot, readOnlyRootFilesystem and allowPrivilegeEscalation: false; got %v", name, sc)
	}
	if uid, _ := sc["runAsUser"].(int); uid == 0 {
		t.Errorf("%s: securityContext.runAsUser must be a non-zero number, got %v", name, sc["runAsUser"])
	}
	if drop := strs(list(sc, "capabilities", "drop")); len(drop) != 1 || drop[0] != "ALL" {
		t.Errorf("%s: securityContext.capabilities.drop = %v, want [ALL]", name, drop)
	}
}

// checkDisruptionBudget checks that a standalone relay Deployment of several
// replicas has a PodDisruptionBudget selecting its pods, and only them, that
// still lets a node drain.
func checkDisruptionBudget(t *testing.T, d k8sObject, byKind map[string]map[string]k8sObject) {
	t.Helper()
	replicas, _ := get(d.doc, "spec", "replicas").(int)
	if replicas < 2 {
		return
	}
	labels := mapping(d.doc, "spec", "template", "metadata", "labels")
	found := false
	for _, pdb := range byKind["PodDisruptionBudget"] {
		if !matches(labels, mapping(pdb.doc, "spec", "selector", "matchLabels")) {
			continue
		}
		found = true
		if minAvail, ok := get(pdb.doc, "spec", "minAvailable").(int); ok && minAvail >= replicas {
			t.Errorf("%s: minAvailable %d of %d replicas blocks every drain", pdb, minAvail, replicas)
		}
		for _, o := range byKind["Job"] {
			if matches(mapping(o.doc, "spec", "template", "metadata", "labels"), mapping(pdb.doc, "spec", "selector", "matchLabels")) {
				t.Errorf("%s: also selects the pods of %s", pdb, o)
			}
		}
	}
	if !found {
		t.Errorf("%s: %d replicas and no PodDisruptionBudget selecting its pods", d, replicas)
	}
}

func findVolume(pod any, name string) map[string]any {
	for _, v := range list(pod, "volumes") {
		if str(v, "name") == name {
			return v.(map[string]any)
		}
	}
	return nil
}

func mountedUnder(mounts map[string]string, file string) bool {
	for p, what := range mounts {
		if strings.HasPrefix(what, "secret/") && strings.HasPrefix(file, p) {
			return true
		}
	}
	return false
}

func matches(labels, selector map[string]any) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func mustKeys() map[string]bool {
	_, byEnv := keys()
	out := map[string]bool{}
	for e := range byEnv {
		out[e] = true
	}
	return out
}
