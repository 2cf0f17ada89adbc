package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/relay"
)

// Set by the linker (see Makefile): -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = ""
)

// cliEnv is what every subcommand gets: its streams and environment.
type cliEnv struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	environ        []string
	stopSignals    func() // restores default signal handling

	configPath string // --config
	entered    bool   // a command's action started (see run)
}

// configError is a bad configuration: exit 2, one line per problem.
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }

func (e *configError) lines() []string {
	var out []string
	for _, err := range config.Problems(e.err) {
		out = append(out, err.Error())
	}
	return out
}

// loadConfig loads and validates the configuration. With only set, just the
// keys under those prefixes must be valid (migrate needs no broker).
func (c *cliEnv) loadConfig(only ...string) (config.File, error) {
	f, err := config.Load(c.configPath, c.environ)
	var unknown *config.UnknownKeysError
	if errors.As(err, &unknown) {
		// The rest of the file was read: name its bad values too, at once.
		err = errors.Join(err, filterErrors(f.Validate(), only))
	}
	if err != nil {
		return f, &configError{err}
	}
	if err := filterErrors(f.Validate(), only); err != nil {
		return f, &configError{err}
	}
	return f, nil
}

func filterErrors(err error, prefixes []string) error {
	if err == nil || len(prefixes) == 0 {
		return err
	}
	var keep []error
	for _, err := range config.Problems(err) {
		var fe *relay.FieldError
		if !errors.As(err, &fe) || slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(fe.Key, p) }) {
			keep = append(keep, err)
		}
	}
	return errors.Join(keep...)
}

func newLogger(cfg config.Log, w io.Writer) *zap.Logger {
	level, _ := zapcore.ParseLevel(cfg.Level)
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	if cfg.Format == "console" {
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	} else {
		enc = zapcore.NewJSONEncoder(encCfg)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), level))
}

// openDB opens a database/sql handle through pgx for goose, whose lock is
// a session advisory lock: a pooler in transaction mode would leave it on
// a server connection that other clients then use, so that is refused.
func openDB(ctx context.Context, pg relay.PostgresConfig) (*sql.DB, func(), error) {
	if pg.Pooler == relay.PoolerTransaction {
		return nil, nil, &configError{fmt.Errorf("migrations %w", relay.ErrPoolerNeedsSession)}
	}
	poolCfg, err := relay.PoolConfig(pg)
	if err != nil {
		return nil, nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, nil, fmt.Errorf("postgres.dsn: %s", relay.Redact(err.Error()))
	}
	if pooled, err := relay.TransactionPooled(ctx, pool, poolCfg.ConnConfig); err != nil || pooled {
		pool.Close()
		if err == nil {
			err = &configError{fmt.Errorf("migrations need a database session of their own: %w (two connections were handed the same server session); set OUTBOX_RELAY_POSTGRES_DSN to PostgreSQL itself or a session-mode pool for this command", relay.ErrTransactionPooler)}
		}
		return nil, nil, err
	}
	db := stdlib.OpenDBFromPool(pool)
	return db, func() { db.Close(); pool.Close() }, nil
}

// writeJSON prints v as indented JSON, what every --json prints.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// confirm asks question on stderr (like rm -i, so that stdout holds only
// the result) and reads the answer; anything but y or yes declines.
func (c *cliEnv) confirm(question, declined string) error {
	fmt.Fprintf(c.stderr, "%s [y/N] ", question)
	answer, err := bufio.NewReader(c.stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read answer: %w", err)
	}
	switch strings.ToLower(strings.TrimSpace(answer)) {
	case "y", "yes":
		return nil
	}
	if errors.Is(err, io.EOF) {
		fmt.Fprintln(c.stderr)
	}
	return fmt.Errorf("not confirmed: %s", declined)
}

// buildCommit is the linker-set commit or the VCS revision Go recorded.
func buildCommit() string {
	if commit != "" {
		return commit
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "unknown"
}
