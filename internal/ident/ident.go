// Package ident validates and quotes the PostgreSQL identifiers that come from
// configuration (schema and table names), so no configured name is ever pasted
// into SQL unchecked.
package ident

import (
	"fmt"
	"regexp"

	"github.com/jackc/pgx/v5"
)

// MaxLen bounds a configured schema or table name. PostgreSQL truncates
// identifiers at 63 bytes; derived names (the pending index, the notify
// function, the goose version table, the archive's index on seq) append up
// to 15 bytes to the table name.
const MaxLen = 48

var pattern = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// Validate reports whether name is an acceptable configured identifier:
// lowercase letters, digits and underscores, not starting with a digit, at most
// MaxLen bytes. Lowercase-only keeps quoted and unquoted spellings identical,
// so psql users can type the name without quotes.
func Validate(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("must not be empty")
	case len(name) > MaxLen:
		return fmt.Errorf("%q is %d bytes, at most %d allowed", name, len(name), MaxLen)
	case !pattern.MatchString(name):
		return fmt.Errorf("%q is not a plain identifier: use lowercase letters, digits and underscores, starting with a letter or underscore", name)
	}
	return nil
}

// Table is a validated schema-qualified table name.
type Table struct {
	Schema string
	Name   string
}

// Validate checks both parts and names the failing one.
func (t Table) Validate() error {
	if err := Validate(t.Schema); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	if err := Validate(t.Name); err != nil {
		return fmt.Errorf("table: %w", err)
	}
	return nil
}

// Quoted returns the schema-qualified, quoted table name for use in SQL.
func (t Table) Quoted() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// Derived returns the quoted, schema-qualified name of an object belonging to
// the table, such as a function: "schema"."table_suffix".
func (t Table) Derived(suffix string) string {
	return pgx.Identifier{t.Schema, t.Name + "_" + suffix}.Sanitize()
}

// Local returns the quoted unqualified name of an object that PostgreSQL always
// creates in the table's schema (indexes, triggers): "table_suffix".
func (t Table) Local(suffix string) string { return pgx.Identifier{t.Name + "_" + suffix}.Sanitize() }

// Channel is the LISTEN/NOTIFY channel of the table: "schema.table".
func (t Table) Channel() string { return t.Schema + "." + t.Name }

// String returns the unquoted schema.table form, for logs and messages.
func (t Table) String() string { return t.Schema + "." + t.Name }

// Quote quotes a single identifier.
func Quote(name string) string { return pgx.Identifier{name}.Sanitize() }
