// Package inbox lets a consumer drop the duplicates that at-least-once
// delivery allows. The consumer records each message id it processes in its
// own database, in the same transaction as the work the message causes; a
// message whose id is already recorded is a duplicate and is skipped. Create
// the table from the consumer's code with schema.NewInboxMigrator (its Up,
// as examples/edupulse/consumer does at start).
package inbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// Tx is the method Claim needs from a pgx transaction (the same as outbox.Tx).
type Tx = outbox.Tx

// SQLTx is the method ClaimSQL needs from a database/sql transaction.
type SQLTx = outbox.SQLTx

// Inbox records processed message ids in one table for one consumer name,
// so several consumers can share a table without seeing each other's ids.
type Inbox struct {
	table    ident.Table
	consumer string
	claim    string
	purge    string
}

// New returns an inbox on schema.table for the named consumer.
func New(schema, table, consumer string) (*Inbox, error) {
	t := ident.Table{Schema: schema, Name: table}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("inbox: %w", err)
	}
	return &Inbox{
		table:    t,
		consumer: consumer,
		claim:    fmt.Sprintf(`INSERT INTO %s (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`, t.Quoted()),
		purge: fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid IN (
  SELECT ctid FROM %[1]s WHERE consumer = $1 AND processed_at < $2 LIMIT $3)`, t.Quoted()),
	}, nil
}

// ErrNoMessageID is returned for a delivery without a message id.
var ErrNoMessageID = errors.New("inbox: message has no message_id")

// Claim records messageID as processed within tx. It returns true the first
// time and false for a duplicate, which the caller should acknowledge
// without processing. The record exists only if tx commits, so a consumer
// that crashes before commit processes the message again.
func (i *Inbox) Claim(ctx context.Context, tx Tx, messageID string) (bool, error) {
	return i.record(messageID, func() (int64, error) {
		tag, err := tx.Exec(ctx, i.claim, i.consumer, messageID)
		return tag.RowsAffected(), err
	})
}

// ClaimSQL is Claim for a database/sql transaction.
func (i *Inbox) ClaimSQL(ctx context.Context, tx SQLTx, messageID string) (bool, error) {
	return i.record(messageID, func() (int64, error) {
		res, err := tx.ExecContext(ctx, i.claim, i.consumer, messageID)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	})
}

// record checks messageID and runs the claim insert with exec, the caller's
// transaction's own method, which returns the rows it inserted.
func (i *Inbox) record(messageID string, exec func() (int64, error)) (bool, error) {
	if messageID == "" {
		return false, ErrNoMessageID
	}
	n, err := exec()
	if err != nil {
		return false, fmt.Errorf("inbox: record %s: %w", messageID, err)
	}
	return n == 1, nil
}

// Purge deletes this consumer's records processed before cutoff, at most
// limit rows, and returns how many it deleted. Keep records longer than any
// duplicate can arrive (the relay's retries, a replay).
func (i *Inbox) Purge(ctx context.Context, db Tx, cutoff time.Time, limit int) (int64, error) {
	tag, err := db.Exec(ctx, i.purge, i.consumer, cutoff, limit)
	if err != nil {
		return 0, fmt.Errorf("inbox: purge: %w", err)
	}
	return tag.RowsAffected(), nil
}
