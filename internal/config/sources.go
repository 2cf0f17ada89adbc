package config

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/outbox-relay/outbox-relay/relay"
)

// ConfigEnv names the configuration file when no --config is given.
const ConfigEnv = EnvPrefix + "CONFIG"

// FileSuffix turns a secret's variable into one naming a file that holds
// it, the convention of Docker and Kubernetes secrets:
// OUTBOX_RELAY_POSTGRES_DSN_FILE=/run/secrets/dsn.
const FileSuffix = "_FILE"

// SecretKeys are the keys whose values carry passwords: they can be read
// from files (FileSuffix) and are redacted wherever the config is printed.
var SecretKeys = []string{"postgres.dsn", "amqp.url"}

// ConfigPath is the file to load: path if given, else $OUTBOX_RELAY_CONFIG.
func ConfigPath(path string, environ []string) string {
	if path != "" {
		return path
	}
	v, _ := lookup(environ, ConfigEnv)
	return strings.TrimSpace(v)
}

func lookup(environ []string, name string) (string, bool) {
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v, true
		}
	}
	return "", false
}

// resolveEnv prepares environ for applyEnv: it drops OUTBOX_RELAY_CONFIG
// (not a key), replaces each secret's _FILE variable by the file's content
// (one trailing newline trimmed), and treats a blank value (spaces only, as
// a templated manifest leaves behind) as empty: a string key becomes empty
// (so a required one is reported missing), any other key is left out.
func resolveEnv(environ []string) ([]string, error) {
	kinds := map[string]string{}
	for _, k := range Keys() {
		kinds[k.Env] = k.Kind
	}
	secretFiles := map[string]string{}
	for _, key := range SecretKeys {
		secretFiles[envName(key)+FileSuffix] = key
	}
	var out []string
	var errs []error
	for _, kv := range environ {
		name, value, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, EnvPrefix) {
			continue
		}
		if name == ConfigEnv {
			continue
		}
		if key, ok := secretFiles[name]; ok {
			target := strings.TrimSuffix(name, FileSuffix)
			if _, both := lookup(environ, target); both {
				errs = append(errs, &relay.FieldError{Key: key, Problem: fmt.Sprintf("both %s and %s are set; set one", target, name)})
				continue
			}
			secret, err := readSecret(strings.TrimSpace(value))
			if err != nil {
				errs = append(errs, &relay.FieldError{Key: key, Problem: fmt.Sprintf("from %s: %v", name, err)})
				continue
			}
			name, value = target, secret
		}
		if strings.TrimSpace(value) == "" {
			if kind, known := kinds[name]; known && kind != "string" {
				continue
			}
			value = ""
		}
		out = append(out, name+"="+value)
	}
	return out, errors.Join(errs...)
}

// readSecret reads a secret file, dropping the newline editors and
// `echo` leave at its end.
func readSecret(path string) (string, error) {
	if path == "" {
		return "", fmt.Errorf("no file named")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("cannot read the secret file: %w", err)
	}
	s := strings.TrimSuffix(string(data), "\n")
	return strings.TrimSuffix(s, "\r"), nil
}

// ExtraEnv lists the variables that are not keys but are read:
// OUTBOX_RELAY_CONFIG and the secrets' _FILE forms.
func ExtraEnv() []string {
	out := []string{ConfigEnv}
	for _, key := range SecretKeys {
		out = append(out, envName(key)+FileSuffix)
	}
	return out
}
