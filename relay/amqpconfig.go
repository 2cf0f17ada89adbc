package relay

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// urlStart is where a URL of a list begins: a comma followed by a scheme,
// so that a comma inside a password does not split a URL.
var urlStart = regexp.MustCompile(`,\s*[A-Za-z][A-Za-z0-9+.-]*://`)

// SplitURLs returns the broker URLs of amqp.url: one URL, or several (the
// nodes of a cluster) separated by commas.
func SplitURLs(s string) []string {
	var out []string
	for {
		loc := urlStart.FindStringIndex(s)
		if loc == nil {
			break
		}
		out = append(out, strings.TrimSpace(s[:loc[0]]))
		s = s[loc[0]+1:]
	}
	if s = strings.TrimSpace(s); s != "" || len(out) > 0 {
		out = append(out, s)
	}
	return out
}

// URLs returns the broker URLs of amqp.url, in the order they are tried.
func (c AMQPConfig) URLs() []string { return SplitURLs(c.URL) }

// validateURLs checks every URL of amqp.url.
func validateURLs(bad func(string, string, ...any), raw string) {
	urls := SplitURLs(raw)
	if len(urls) == 0 {
		bad("amqp.url", "required: a broker URL such as amqp://user:pass@host:5672/vhost, or several separated by commas (env OUTBOX_RELAY_AMQP_URL)")
		return
	}
	for i, s := range urls {
		if u, err := url.Parse(s); err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") {
			which := ""
			if len(urls) > 1 {
				which = fmt.Sprintf(" (URL %d of %d)", i+1, len(urls))
			}
			bad("amqp.url", "must be an amqp:// or amqps:// URL%s, got %q", which, RedactURL(s))
		}
	}
}

// UnmarshalYAML accepts amqp.url as one URL or as a list of URLs (the nodes
// of a cluster), kept as the comma-separated string that the environment
// variable also takes. Unknown keys are reported by the config loader before
// decoding.
func (c *AMQPConfig) UnmarshalYAML(n *yaml.Node) error {
	type plain AMQPConfig
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			v := n.Content[i+1]
			if n.Content[i].Value != "url" || v.Kind != yaml.SequenceNode {
				continue
			}
			urls := make([]string, 0, len(v.Content))
			for _, item := range v.Content {
				if item.Kind != yaml.ScalarNode || item.Value == "" {
					return errors.New("amqp.url: a list must hold URLs, one per item")
				}
				urls = append(urls, item.Value)
			}
			n.Content[i+1] = &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: strings.Join(urls, ","), Line: v.Line, Column: v.Column}
		}
	}
	return n.Decode((*plain)(c))
}

// validSource checks amqp.cloudevents_source: CloudEvents requires a
// non-empty URI-reference.
func validSource(s string) error {
	if s == "" {
		return errors.New("must be set: a URI-reference naming the producer, such as //edupulse/lessons or urn:edupulse:lessons")
	}
	if strings.ContainsAny(s, " \t\r\n") {
		return fmt.Errorf("must be a URI-reference without spaces, got %q", s)
	}
	if _, err := url.Parse(s); err != nil {
		return fmt.Errorf("must be a URI-reference: %v", err)
	}
	return nil
}
