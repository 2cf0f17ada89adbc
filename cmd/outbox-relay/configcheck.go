package main

import (
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/relay"
)

// configCheck validates the whole configuration, as run would, and prints
// it with the secrets redacted.
func (c *cliEnv) configCheck(asJSON bool) error {
	f, err := c.loadConfig()
	if err != nil {
		return err
	}
	var doc yaml.Node
	if err := doc.Encode(f); err != nil {
		return fmt.Errorf("print configuration: %w", err)
	}
	for _, key := range config.SecretKeys {
		redactAt(&doc, strings.Split(key, "."))
	}
	if asJSON {
		var v map[string]any
		if err := doc.Decode(&v); err != nil {
			return fmt.Errorf("print configuration: %w", err)
		}
		return writeJSON(c.stdout, v)
	}
	out, err := yaml.Marshal(&doc)
	if err != nil {
		return fmt.Errorf("print configuration: %w", err)
	}
	_, err = c.stdout.Write(out)
	return err
}

// redactAt hides the passwords in the value at path, a string or a list of
// them, whatever its form (URL or key=value DSN).
func redactAt(n *yaml.Node, path []string) {
	if len(path) == 0 {
		switch n.Kind {
		case yaml.ScalarNode:
			n.Value = relay.Redact(n.Value)
		case yaml.SequenceNode:
			for _, item := range n.Content {
				redactAt(item, nil)
			}
		}
		return
	}
	if n.Kind != yaml.MappingNode {
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == path[0] {
			redactAt(n.Content[i+1], path[1:])
		}
	}
}
