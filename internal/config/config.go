// Package config loads the daemon's configuration: a YAML file (unknown keys
// are errors) overlaid with OUTBOX_RELAY_* environment variables, one per key.
package config

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/relay"
)

// EnvPrefix starts every environment override: postgres.dsn is
// OUTBOX_RELAY_POSTGRES_DSN.
const EnvPrefix = "OUTBOX_RELAY_"

// File is the whole configuration file.
//
// A key left out takes its default. A number or duration set explicitly to
// 0 (in the file or the environment) is an error when the key's default is
// not 0: 0 would silently mean the default, which is rarely what it looks
// like (retention.dispatched: 0 is not "keep nothing", amqp.confirm_timeout:
// 0 is not "wait forever"). Keys whose default is 0 (retention.dead) take 0
// as the meaning their documentation gives.
type File struct {
	relay.Config `yaml:",inline"`
	Metrics      Metrics `yaml:"metrics"`
	Log          Log     `yaml:"log"`
	Migrate      Migrate `yaml:"migrate"`

	// zeros are the keys set to 0 whose default is not 0, for Validate.
	zeros []string
	// serviceLinks are the Kubernetes service-link variables ignored.
	serviceLinks []string
}

// ServiceLinks returns the OUTBOX_RELAY_* variables that were ignored as
// Kubernetes service links (a Service named after the relay), sorted.
func (f File) ServiceLinks() []string { return f.serviceLinks }

// Metrics configures the HTTP endpoint.
type Metrics struct {
	// Addr serves /metrics, /healthz and /readyz: host:port or :port (all
	// interfaces), the port a number from 0 to 65535 (0: any free port, logged
	// at start). Default ":9464"; "off" disables the endpoint.
	Addr string `yaml:"addr"`
	// MaxEventTypes caps distinct event_type label values; further types are
	// counted as "other". Default 100; at least 1.
	MaxEventTypes int `yaml:"max_event_types"`
}

// Log configures zap.
type Log struct {
	// Level is debug, info (default), warn or error.
	Level string `yaml:"level"`
	// Format is json (default) or console.
	Format string `yaml:"format"`
}

// Migrate configures schema migration at start.
type Migrate struct {
	// Auto applies pending migrations when `run` starts. Default false:
	// migrations are an explicit step (`outbox-relay migrate up`).
	Auto bool `yaml:"auto"`
}

// WithDefaults fills zero values.
func (f File) WithDefaults() File {
	f.Config = f.Config.WithDefaults()
	f.Metrics.Addr = cmp.Or(f.Metrics.Addr, ":9464")
	f.Metrics.MaxEventTypes = cmp.Or(f.Metrics.MaxEventTypes, 100)
	f.Log.Level = cmp.Or(f.Log.Level, "info")
	f.Log.Format = cmp.Or(f.Log.Format, "json")
	return f
}

// Validate returns every problem, each a *relay.FieldError naming its key.
func (f File) Validate() error {
	var errs []error
	for _, key := range f.zeros {
		errs = append(errs, &relay.FieldError{Key: key, Problem: fmt.Sprintf(
			"0 is not allowed: it would silently mean the default (%s); leave the key out for the default, or give the value you want", defaultOf(key))})
	}
	if err := f.Config.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := validateAddr(f.Metrics.Addr); err != nil {
		errs = append(errs, &relay.FieldError{Key: "metrics.addr", Problem: err.Error()})
	}
	if f.Metrics.MaxEventTypes < 1 {
		errs = append(errs, &relay.FieldError{Key: "metrics.max_event_types", Problem: fmt.Sprintf("must be at least 1, got %d", f.Metrics.MaxEventTypes)})
	}
	switch f.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, &relay.FieldError{Key: "log.level", Problem: fmt.Sprintf("must be debug, info, warn or error, got %q", f.Log.Level)})
	}
	switch f.Log.Format {
	case "json", "console":
	default:
		errs = append(errs, &relay.FieldError{Key: "log.format", Problem: fmt.Sprintf("must be json or console, got %q", f.Log.Format)})
	}
	return errors.Join(errs...)
}

// validateAddr checks a listen address: "off", host:port or :port with a
// numeric port. Whether it is free is only known when listening.
func validateAddr(addr string) error {
	if addr == "off" {
		return nil
	}
	allowed := `must be host:port or :port (e.g. ":9464" or "127.0.0.1:9464", port 0 to 65535) or "off"`
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s, got %q", allowed, addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || strconv.FormatUint(n, 10) != port {
		return fmt.Errorf("%s, got %q (port %q)", allowed, addr, port)
	}
	if host != "" && net.ParseIP(host) == nil && !hostname.MatchString(host) {
		return fmt.Errorf("%s, got %q (host %q is neither an IP address nor a host name)", allowed, addr, host)
	}
	return nil
}

var hostname = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$`)

// defaults is File's zero value with the defaults filled in.
var defaults = File{}.WithDefaults()

// defaultOf renders the default of a key, for messages.
func defaultOf(key string) string {
	var out string
	walk(reflect.ValueOf(&defaults).Elem(), "", func(path string, v reflect.Value) {
		if path != key {
			return
		}
		if kindOf(v) == "duration" {
			out = time.Duration(v.Int()).String()
		} else {
			out = fmt.Sprint(v.Interface())
		}
	})
	return out
}

// defaultedZero reports whether v, the value of a key, is a number or
// duration set to 0 while the key's default is not 0.
func defaultedZero(key string, v reflect.Value) bool {
	if k := kindOf(v); (k != "int" && k != "duration") || v.Int() != 0 {
		return false
	}
	d := defaultOf(key)
	return d != "0" && d != "0s"
}

// noteZero records or forgets key among the explicit zeros.
func (f *File) noteZero(key string, v reflect.Value) {
	f.zeros = slices.DeleteFunc(f.zeros, func(k string) bool { return k == key })
	if defaultedZero(key, v) {
		f.zeros = append(f.zeros, key)
	}
}

// Load reads path (if empty, the file $OUTBOX_RELAY_CONFIG names, if any),
// applies the environment (KEY=VALUE strings, as os.Environ returns) and the
// defaults. It does not validate.
func Load(path string, environ []string) (File, error) {
	var (
		f        File
		parseErr error
	)
	path = ConfigPath(path, environ)
	environ, err := resolveEnv(environ)
	if err != nil {
		return f, err
	}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return f, fmt.Errorf("config file: %w", err)
		}
		if err := Parse(data, &f); err != nil {
			var unknown *UnknownKeysError
			if !errors.As(err, &unknown) {
				return f, fmt.Errorf("config file %s: %w", path, err)
			}
			for i, e := range unknown.Errs {
				unknown.Errs[i] = fmt.Errorf("config file %s: %w", path, e)
			}
			parseErr = unknown
		}
	}
	if err := applyEnv(&f, environ); err != nil {
		return f, errors.Join(parseErr, err)
	}
	f = f.WithDefaults()
	f.Config = f.Config.WithAppNames()
	return f, parseErr
}

// UnknownKeysError lists the keys of a file that are not configuration
// keys. The rest of the file was still read, so Load returns it with the
// error, and the caller can report the file's invalid values beside them.
type UnknownKeysError struct{ Errs []error }

// Error lists the unknown keys, one a line.
func (e *UnknownKeysError) Error() string { return errors.Join(e.Errs...).Error() }

// Unwrap returns one error per unknown key, for errors.Is and errors.As.
func (e *UnknownKeysError) Unwrap() []error { return e.Errs }

// Problems flattens an error of Load or Validate (errors.Join trees, an
// UnknownKeysError) into its single problems, in order, one a key.
func Problems(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, Problems(e)...)
		}
		return out
	}
	if err == nil {
		return nil
	}
	return []error{err}
}

// Parse decodes YAML strictly: unknown keys and a second document are errors.
func Parse(data []byte, f *File) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
	}
	unknown := unknownKeys(&doc)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	// Unknown keys are reported by unknownKeys, each with what is allowed;
	// the decoder reads the rest so that its values are checked too.
	dec.KnownFields(unknown == nil)
	if err := dec.Decode(f); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s (every key is listed in config.example.yaml)", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return errors.New("more than one YAML document; put everything in one")
	}
	set := setKeys(&doc)
	walk(reflect.ValueOf(f).Elem(), "", func(path string, v reflect.Value) {
		if set[path] {
			f.noteZero(path, v)
		}
		if kindOf(v) == "list" && v.Len() == 0 {
			v.SetZero() // "[]" and no list are the same
		}
	})
	if unknown != nil {
		return &UnknownKeysError{Errs: unknown}
	}
	return nil
}

// setKeys returns the dotted paths of the document's leaf keys that have a
// value (a YAML null, "key:" alone, counts as left out).
func setKeys(doc *yaml.Node) map[string]bool {
	set := map[string]bool{}
	walkMappings(doc, func(path, _ string, _, value *yaml.Node) bool {
		if value.Kind == yaml.ScalarNode && value.Tag != "!!null" {
			set[path] = true
		}
		return true
	})
	return set
}

// unknownKeys reports every key of the document that is not a configuration
// key or section, by its dotted path, with the keys allowed at that level.
func unknownKeys(doc *yaml.Node) []error {
	known := map[string]bool{}
	children := map[string][]string{}
	for _, k := range Keys() {
		parts := strings.Split(k.Path, ".")
		for i := range parts {
			p := strings.Join(parts[:i+1], ".")
			parent := strings.Join(parts[:i], ".")
			if !known[p] {
				children[parent] = append(children[parent], parts[i])
			}
			known[p] = true
		}
	}
	var errs []error
	walkMappings(doc, func(path, parent string, key, _ *yaml.Node) bool {
		if !known[path] {
			errs = append(errs, &relay.FieldError{Key: path, Problem: fmt.Sprintf(
				"unknown key (line %d); allowed here: %s", key.Line, strings.Join(children[parent], ", "))})
			return false
		}
		return true
	})
	return errs
}

// walkMappings calls fn for every key of the document's nested mappings,
// depth first, with its dotted path and its parent's path; fn returns
// whether to descend into the key's value when that is a mapping.
func walkMappings(doc *yaml.Node, fn func(path, parent string, key, value *yaml.Node) bool) {
	var visit func(n *yaml.Node, prefix string)
	visit = func(n *yaml.Node, prefix string) {
		if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
			visit(n.Content[0], prefix)
			return
		}
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			key, value := n.Content[i], n.Content[i+1]
			path := key.Value
			if prefix != "" {
				path = prefix + "." + key.Value
			}
			if fn(path, prefix, key, value) {
				visit(value, path)
			}
		}
	}
	visit(doc, "")
}

// Key is one configuration key: its dotted YAML path and environment name.
type Key struct {
	Path string // e.g. "postgres.dsn"
	Env  string // e.g. "OUTBOX_RELAY_POSTGRES_DSN"
	Kind string // string, int, bool, duration, list (of strings)
}

// Keys lists every configuration key, in declaration order.
func Keys() []Key {
	var keys []Key
	walk(reflect.ValueOf(&File{}).Elem(), "", func(path string, v reflect.Value) {
		keys = append(keys, Key{Path: path, Env: envName(path), Kind: kindOf(v)})
	})
	return keys
}

func envName(path string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(path, ".", "_"))
}

// walk calls fn for every leaf field, with its dotted yaml path.
func walk(v reflect.Value, prefix string, fn func(path string, v reflect.Value)) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		sf := t.Field(i)
		if !sf.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(sf.Tag.Get("yaml"), ",")
		fv := v.Field(i)
		if opts == "inline" {
			walk(fv, prefix, fn)
			continue
		}
		path := name
		if prefix != "" {
			path = prefix + "." + name
		}
		if fv.Kind() == reflect.Struct && fv.Type() != reflect.TypeOf(time.Duration(0)) {
			walk(fv, path, fn)
			continue
		}
		fn(path, fv)
	}
}

func kindOf(v reflect.Value) string {
	switch {
	case v.Type() == reflect.TypeOf(time.Duration(0)):
		return "duration"
	case v.Kind() == reflect.Pointer && v.Type().Elem().Kind() == reflect.Bool, v.Kind() == reflect.Bool:
		return "bool"
	case v.Kind() == reflect.Int, v.Kind() == reflect.Int32, v.Kind() == reflect.Int64:
		return "int"
	case v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.String:
		return "list"
	default:
		return "string"
	}
}

func applyEnv(f *File, environ []string) error {
	env := map[string]string{}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if ok && strings.HasPrefix(k, EnvPrefix) {
			env[k] = v
		}
	}
	var errs []error
	walk(reflect.ValueOf(f).Elem(), "", func(path string, v reflect.Value) {
		name := envName(path)
		raw, ok := env[name]
		if !ok {
			return
		}
		delete(env, name)
		if err := setValue(v, raw); err != nil {
			errs = append(errs, &relay.FieldError{Key: path, Problem: fmt.Sprintf("from %s: %v", name, err)})
			return
		}
		f.noteZero(path, v)
	})
	unknown := make([]string, 0, len(env))
	for k := range env {
		unknown = append(unknown, k)
	}
	sort.Strings(unknown)
	for _, k := range unknown {
		if serviceLink(k, env[k]) {
			f.serviceLinks = append(f.serviceLinks, k)
			continue
		}
		errs = append(errs, fmt.Errorf("%s: unknown environment variable (every key is listed in config.example.yaml; env names are OUTBOX_RELAY_ plus the key path in capitals)", k))
	}
	return errors.Join(errs...)
}

func setValue(v reflect.Value, raw string) error {
	switch kindOf(v) {
	case "duration":
		d, err := time.ParseDuration(raw)
		if err != nil {
			return fmt.Errorf("%q is not a duration such as 500ms, 10s or 5m", raw)
		}
		v.SetInt(int64(d))
	case "bool":
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return fmt.Errorf("%q is not true or false", raw)
		}
		if v.Kind() == reflect.Pointer {
			v.Set(reflect.ValueOf(&b))
		} else {
			v.SetBool(b)
		}
	case "int":
		n, err := strconv.ParseInt(raw, 10, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("%q is not an integer", raw)
		}
		v.SetInt(n)
	case "list":
		// Comma-separated in the environment: a,b,c.
		var list []string
		for _, item := range strings.Split(raw, ",") {
			if item = strings.TrimSpace(item); item != "" {
				list = append(list, item)
			}
		}
		v.Set(reflect.ValueOf(list))
	default:
		v.SetString(raw)
	}
	return nil
}
