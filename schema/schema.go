// Package schema holds the outbox table's goose migrations, embedded in the
// binary. The SQL files are templates: every object name is rendered from the
// configured schema and table, validated and quoted, before goose sees it.
package schema

import (
	"bytes"
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"strings"
	"testing/fstest"
	"text/template"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

//go:embed migrations/*.sql inbox/*.sql
var migrations embed.FS

// The two sets of migrations: the outbox table, and the consumer-side inbox
// table of package inbox.
const (
	outboxDir = "migrations"
	inboxDir  = "inbox"
)

// VersionTableSuffix names goose's bookkeeping table, kept next to the outbox
// table: public.outbox → public.outbox_schema_version.
const VersionTableSuffix = "schema_version"

// Migrator applies one set of migrations (the outbox's, or the inbox's) to
// one schema-qualified table.
type Migrator struct {
	provider *goose.Provider
	db       *sql.DB
	table    ident.Table
}

// NewMigrator renders the migrations for schema.table. db is used as given and
// not closed by the Migrator.
func NewMigrator(db *sql.DB, schemaName, table string) (*Migrator, error) {
	return newMigrator(db, schemaName, table, outboxDir)
}

// NewInboxMigrator is NewMigrator for a consumer's inbox table (package inbox).
func NewInboxMigrator(db *sql.DB, schemaName, table string) (*Migrator, error) {
	return newMigrator(db, schemaName, table, inboxDir)
}

func newMigrator(db *sql.DB, schemaName, table, dir string) (*Migrator, error) {
	t := ident.Table{Schema: schemaName, Name: table}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	fsys, err := render(t, dir)
	if err != nil {
		return nil, err
	}
	// Relays started together with migrate.auto must not race: a session
	// advisory lock, one per table, serialises them.
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(lockID(dir+" "+t.String())),
		lock.WithLockTimeout(1, 300), // try every second, for 5 minutes
	)
	if err != nil {
		return nil, fmt.Errorf("goose locker: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, fsys,
		goose.WithTableName(t.Schema+"."+t.Name+"_"+VersionTableSuffix),
		goose.WithDisableGlobalRegistry(true),
		goose.WithSessionLocker(locker),
	)
	if err != nil {
		return nil, fmt.Errorf("goose provider: %w", err)
	}
	return &Migrator{provider: p, db: db, table: t}, nil
}

// lockID derives a migration lock id from a name (FNV-1a, 64 bits).
func lockID(name string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte("outbox-relay migrate " + name))
	return int64(h.Sum64() &^ (1 << 63))
}

// Render returns the outbox migrations rendered for table t, as goose reads them.
func Render(t ident.Table) (fs.FS, error) { return render(t, outboxDir) }

func render(t ident.Table, dir string) (fs.FS, error) {
	data := templateData{t}
	out := fstest.MapFS{}
	err := fs.WalkDir(migrations, dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		src, err := migrations.ReadFile(path)
		if err != nil {
			return err
		}
		tmpl, err := template.New(path).Option("missingkey=error").Parse(string(src))
		if err != nil {
			return fmt.Errorf("parse %s: %w", path, err)
		}
		var buf bytes.Buffer
		if err := tmpl.Execute(&buf, data); err != nil {
			return fmt.Errorf("render %s: %w", path, err)
		}
		out[strings.TrimPrefix(path, dir+"/")] = &fstest.MapFile{Data: buf.Bytes()}
		return nil
	})
	return out, err
}

// templateData is what the migration templates call: {{.Table}},
// {{.Func "uuid_v7"}}, {{.Local "pending"}}, {{.ChannelLiteral}}.
type templateData struct{ t ident.Table }

func (d templateData) Table() string              { return d.t.Quoted() }
func (d templateData) Func(suffix string) string  { return d.t.Derived(suffix) }
func (d templateData) Local(suffix string) string { return d.t.Local(suffix) }
func (d templateData) ChannelLiteral() string {
	return "'" + strings.ReplaceAll(d.t.Channel(), "'", "''") + "'"
}

// Up applies all pending migrations, creating the schema first if needed.
func (m *Migrator) Up(ctx context.Context) ([]*goose.MigrationResult, error) {
	// CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
	// the schema exists; a least-privilege migration role may lack it.
	var exists bool
	if err := m.db.QueryRowContext(ctx, "SELECT to_regnamespace($1) IS NOT NULL", ident.Quote(m.table.Schema)).Scan(&exists); err != nil {
		return nil, fmt.Errorf("look up schema %s: %w", m.table.Schema, err)
	}
	if !exists {
		// Concurrent creators can both pass IF NOT EXISTS and collide on
		// the catalog's unique index; the loser finds the schema there.
		_, err := m.db.ExecContext(ctx, "CREATE SCHEMA IF NOT EXISTS "+ident.Quote(m.table.Schema))
		var pgErr *pgconn.PgError
		if err != nil && !(errors.As(err, &pgErr) && (pgErr.Code == "23505" || pgErr.Code == "42P06")) {
			return nil, fmt.Errorf("create schema %s: %w", m.table.Schema, err)
		}
	}
	return m.provider.Up(ctx)
}

// DownTo rolls back to version (0 removes the outbox table entirely).
func (m *Migrator) DownTo(ctx context.Context, version int64) ([]*goose.MigrationResult, error) {
	return m.provider.DownTo(ctx, version)
}

// Down rolls back the most recent migration.
func (m *Migrator) Down(ctx context.Context) (*goose.MigrationResult, error) {
	return m.provider.Down(ctx)
}

// Status reports each migration and whether it is applied.
func (m *Migrator) Status(ctx context.Context) ([]*goose.MigrationStatus, error) {
	return m.provider.Status(ctx)
}

// Version returns the current applied version.
func (m *Migrator) Version(ctx context.Context) (int64, error) {
	return m.provider.GetDBVersion(ctx)
}

// Latest is the newest migration version this binary carries.
func (m *Migrator) Latest() int64 {
	srcs := m.provider.ListSources()
	if len(srcs) == 0 {
		return 0
	}
	return srcs[len(srcs)-1].Version
}
