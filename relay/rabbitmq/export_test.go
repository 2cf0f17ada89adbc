package rabbitmq

import "github.com/outbox-relay/outbox-relay/relay"

// SkipChecks turns off p's checks before publishing, so a test can show
// what happens when the broker refuses a message the checks did not foresee.
func SkipChecks(p *Publisher) { p.skipChecks = true }

// SocketWrites returns how many writes reached p's socket to the broker.
func SocketWrites(p *Publisher) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wire.mu.Lock()
	defer p.wire.mu.Unlock()
	return p.wire.writes
}

// CloudEventsJSON renders m as a structured CloudEvent, or says why m
// cannot be one.
func CloudEventsJSON(m *relay.Message, source string) ([]byte, error) {
	if err := cloudEventsValid(m); err != nil {
		return nil, err
	}
	return cloudEventsJSON(m, source), nil
}

// Table is table: decoded headers as the field table that is published.
var Table = table
