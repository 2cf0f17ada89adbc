package schema

import (
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// SQLMigration is one migration's Up section as plain SQL.
type SQLMigration struct {
	Version int64
	Name    string // the file name, e.g. 00001_create_outbox.sql
	SQL     string
}

// UpSQL returns the outbox migrations' Up sections rendered for t, in
// version order and without goose's annotations, for teams whose schema
// changes go through Flyway, Atlas or Liquibase rather than `migrate up`.
func UpSQL(t ident.Table) ([]SQLMigration, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	fsys, err := render(t, outboxDir)
	if err != nil {
		return nil, err
	}
	names, err := fs.Glob(fsys, "*.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []SQLMigration
	for _, name := range names {
		data, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		prefix, _, _ := strings.Cut(name, "_")
		v, err := strconv.ParseInt(prefix, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("migration %s: no version number: %w", name, err)
		}
		out = append(out, SQLMigration{Version: v, Name: name, SQL: upSection(string(data))})
	}
	return out, nil
}

// upSection keeps the lines between "-- +goose Up" and "-- +goose Down",
// dropping goose's own annotations (StatementBegin/End).
func upSection(src string) string {
	var b strings.Builder
	in := false
	for _, line := range strings.SplitAfter(src, "\n") {
		switch trimmed := strings.TrimSpace(line); {
		case strings.HasPrefix(trimmed, "-- +goose Up"):
			in = true
		case strings.HasPrefix(trimmed, "-- +goose Down"):
			in = false
		case in && !strings.HasPrefix(trimmed, "-- +goose"):
			b.WriteString(line)
		}
	}
	return strings.TrimSpace(b.String()) + "\n"
}
