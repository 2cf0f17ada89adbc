package config

import (
	"net"
	"regexp"
	"strconv"
)

// Kubernetes injects, into every pod of a namespace (unless the pod sets
// enableServiceLinks: false), variables named after each Service: for a
// Service called outbox-relay (or outbox-relay-something) they start with
// our prefix. They are recognised by both name and value, so that a
// mistyped key (OUTBOX_RELAY_BATCH_SIZE, or OUTBOX_RELAY_PORT=9464) is
// still an error.
var serviceLinkShapes = []struct {
	name  *regexp.Regexp
	value func(string) bool
}{
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?SERVICE_HOST$`), isIP},
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?SERVICE_PORT(?:_[A-Z0-9_]+)?$`), isPort},
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?$`), isServiceURL},
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PROTO$`), isProto},
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PORT$`), isPort},
	{regexp.MustCompile(`^OUTBOX_RELAY_(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_ADDR$`), isIP},
}

// ServiceLinkName reports whether name has the shape of a Kubernetes
// service-link variable of a Service named after the relay (whatever its
// value), for documentation that names them.
func ServiceLinkName(name string) bool {
	for _, s := range serviceLinkShapes {
		if s.name.MatchString(name) {
			return true
		}
	}
	return false
}

// serviceLink reports whether name=value is a Kubernetes service-link
// variable of a Service named after the relay.
func serviceLink(name, value string) bool {
	for _, s := range serviceLinkShapes {
		if s.name.MatchString(name) && s.value(value) {
			return true
		}
	}
	return false
}

func isIP(s string) bool { return net.ParseIP(s) != nil }

func isPort(s string) bool {
	n, err := strconv.ParseUint(s, 10, 16)
	return err == nil && n > 0
}

func isProto(s string) bool { return s == "tcp" || s == "udp" || s == "sctp" }

// isServiceURL matches tcp://10.0.0.11:9464 (IPv6 hosts in brackets).
func isServiceURL(s string) bool {
	m := serviceURL.FindStringSubmatch(s)
	if m == nil {
		return false
	}
	host, port, err := net.SplitHostPort(m[2])
	return err == nil && isIP(host) && isPort(port)
}

var serviceURL = regexp.MustCompile(`^(tcp|udp|sctp)://(.+)$`)
