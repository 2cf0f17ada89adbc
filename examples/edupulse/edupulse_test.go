package edupulse_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/examples/edupulse"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/schema"
)

var (
	lessonID     = uuid.MustParse("0195a3b0-0000-7000-8000-000000000001")
	authorID     = uuid.MustParse("0195a3b0-0000-7000-8000-000000000002")
	learnerID    = uuid.MustParse("0195a3b0-0000-7000-8000-000000000003")
	submissionID = uuid.MustParse("0195a3b0-0000-7000-8000-000000000004")
	at           = time.Date(2025, 3, 1, 9, 30, 0, 0, time.UTC)
)

// The JSON below is the wire contract documented on each payload type;
// consumers in other languages depend on these names.
func TestPayloadJSON(t *testing.T) {
	t.Parallel()
	tests := []struct {
		eventType string
		payload   any
		want      string
		summary   string
	}{
		{
			edupulse.TypeLessonPublished,
			edupulse.LessonPublished{SchemaVersion: 1, LessonID: lessonID, CourseID: "math-101", Title: "Fractions with Pizza", AuthorID: authorID, QuestionCount: 10, PublishedAt: at},
			`{"schema_version":1,"lesson_id":"0195a3b0-0000-7000-8000-000000000001","course_id":"math-101","title":"Fractions with Pizza","author_id":"0195a3b0-0000-7000-8000-000000000002","question_count":10,"published_at":"2025-03-01T09:30:00Z"}`,
			`lesson 00000001 "Fractions with Pizza" in math-101 (10 questions)`,
		},
		{
			edupulse.TypeQuizSubmitted,
			edupulse.QuizSubmitted{SchemaVersion: 1, SubmissionID: submissionID, LessonID: lessonID, LessonTitle: "Fractions with Pizza", LearnerID: learnerID, Score: 8, MaxScore: 10, Passed: true, SubmittedAt: at},
			`{"schema_version":1,"submission_id":"0195a3b0-0000-7000-8000-000000000004","lesson_id":"0195a3b0-0000-7000-8000-000000000001","lesson_title":"Fractions with Pizza","learner_id":"0195a3b0-0000-7000-8000-000000000003","score":8,"max_score":10,"passed":true,"submitted_at":"2025-03-01T09:30:00Z"}`,
			`learner 00000003 scored 8/10 on "Fractions with Pizza" (passed)`,
		},
		{
			edupulse.TypeBadgeAwarded,
			edupulse.BadgeAwarded{SchemaVersion: 1, LearnerID: learnerID, Badge: edupulse.BadgeLessonAce, LessonID: lessonID, SubmissionID: submissionID, AwardedAt: at},
			`{"schema_version":1,"learner_id":"0195a3b0-0000-7000-8000-000000000003","badge":"lesson-ace","lesson_id":"0195a3b0-0000-7000-8000-000000000001","submission_id":"0195a3b0-0000-7000-8000-000000000004","awarded_at":"2025-03-01T09:30:00Z"}`,
			`learner 00000003 earned lesson-ace on lesson 00000001`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.eventType, func(t *testing.T) {
			got, err := json.Marshal(tt.payload)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("JSON:\n got %s\nwant %s", got, tt.want)
			}
			summary, err := edupulse.Summarize(tt.eventType, got)
			if err != nil || summary != tt.summary {
				t.Errorf("Summarize = %q, %v; want %q", summary, err, tt.summary)
			}
		})
	}
}

func TestSummarizeRefusesNewerSchema(t *testing.T) {
	t.Parallel()
	if _, err := edupulse.Summarize(edupulse.TypeLessonPublished, []byte(`{"schema_version":2}`)); err == nil {
		t.Error("schema_version 2 was accepted")
	}
}

func TestPublishLessonWritesLessonAndEventInOneTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, store, schemaName := setup(t)

	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	l, err := store.PublishLesson(ctx, tx, "req-1", edupulse.NewLesson{CourseID: "math-101", Title: "Fractions with Pizza", AuthorID: authorID, QuestionCount: 10})
	if err != nil {
		t.Fatal(err)
	}
	// Until the commit, other sessions (the relay) see neither row.
	if lessons, events := count(t, db, schemaName); lessons != 0 || events != 0 {
		t.Fatalf("before commit: %d lessons, %d events visible; want none", lessons, events)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if lessons, events := count(t, db, schemaName); lessons != 1 || events != 1 {
		t.Fatalf("after commit: %d lessons, %d events; want 1 and 1", lessons, events)
	}

	var (
		eventType, key, corr string
		payload              []byte
		headers              map[string]string
	)
	err = db.QueryRow(ctx, "SELECT event_type, partition_key, correlation_id, payload, headers FROM "+
		pgx.Identifier{schemaName, "outbox"}.Sanitize()).Scan(&eventType, &key, &corr, &payload, &headers)
	if err != nil {
		t.Fatal(err)
	}
	if eventType != edupulse.TypeLessonPublished || key != l.LessonID.String() || corr != "req-1" ||
		headers[edupulse.HeaderSchemaVersion] != "1" {
		t.Errorf("outbox row: type %q key %q correlation %q headers %v", eventType, key, corr, headers)
	}
	var got edupulse.LessonPublished
	if err := json.Unmarshal(payload, &got); err != nil {
		t.Fatal(err)
	}
	if got != l {
		t.Errorf("payload %+v, want %+v", got, l)
	}
}

func TestRolledBackRequestLeavesNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, store, schemaName := setup(t)

	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l, err := store.PublishLesson(ctx, tx, "req-1", edupulse.NewLesson{CourseID: "bio-110", Title: "The Water Cycle", AuthorID: authorID, QuestionCount: 5})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.SubmitQuiz(ctx, tx, "req-1", edupulse.Submission{LessonID: l.LessonID, LearnerID: learnerID, Score: 5}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if lessons, events := count(t, db, schemaName); lessons != 0 || events != 0 {
		t.Errorf("after rollback: %d lessons, %d events; want none", lessons, events)
	}
}

func TestPerfectScoreAwardsBadgeOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, store, schemaName := setup(t)

	var l edupulse.LessonPublished
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) (err error) {
		l, err = store.PublishLesson(ctx, tx, "req-1", edupulse.NewLesson{CourseID: "code-120", Title: "What Is a Variable?", AuthorID: authorID, QuestionCount: 5})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, wantBadge := range []bool{true, false} {
		err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
			q, badge, err := store.SubmitQuiz(ctx, tx, "req-2", edupulse.Submission{LessonID: l.LessonID, LearnerID: learnerID, Score: 5})
			if err != nil {
				return err
			}
			if !q.Passed || q.MaxScore != 5 || q.LessonTitle != l.Title {
				t.Errorf("submission %d: %+v", i, q)
			}
			if (badge != nil) != wantBadge {
				t.Errorf("submission %d: badge %+v, want one: %v", i, badge, wantBadge)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	rows, err := db.Query(ctx, "SELECT event_type, partition_key FROM "+pgx.Identifier{schemaName, "outbox"}.Sanitize()+" ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var typ, key string
		err := r.Scan(&typ, &key)
		return typ + " " + key, err
	})
	if err != nil {
		t.Fatal(err)
	}
	learner := learnerID.String()
	want := []string{
		edupulse.TypeLessonPublished + " " + l.LessonID.String(),
		edupulse.TypeQuizSubmitted + " " + learner,
		edupulse.TypeBadgeAwarded + " " + learner,
		edupulse.TypeQuizSubmitted + " " + learner,
	}
	if len(got) != len(want) {
		t.Fatalf("events %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("event %d: %q, want %q", i, got[i], want[i])
		}
	}
}

// setup creates a schema of the test's own holding the outbox table and the
// EduPulse tables, dropped at cleanup.
func setup(t *testing.T) (*pgxpool.Pool, *edupulse.Store, string) {
	t.Helper()
	ctx := context.Background()
	dsn := os.Getenv("TEST_DATABASE_URL")
	if dsn == "" {
		dsn = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	}
	db, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)

	suffix := make([]byte, 6)
	_, _ = rand.Read(suffix)
	schemaName := "edupulse_test_" + hex.EncodeToString(suffix)
	if _, err := db.Exec(ctx, "CREATE SCHEMA "+schemaName); err != nil {
		t.Fatalf("create schema (is PostgreSQL up at TEST_DATABASE_URL?): %v", err)
	}
	t.Cleanup(func() {
		if _, err := db.Exec(context.Background(), "DROP SCHEMA "+schemaName+" CASCADE"); err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})

	sqlDB := stdlib.OpenDBFromPool(db)
	defer sqlDB.Close()
	mig, err := schema.NewMigrator(sqlDB, schemaName, "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mig.Up(ctx); err != nil {
		t.Fatalf("migrate outbox: %v", err)
	}

	w, err := outbox.NewWriter(schemaName, "outbox")
	if err != nil {
		t.Fatal(err)
	}
	store, err := edupulse.NewStore(schemaName, w)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.CreateTables(ctx, db); err != nil {
		t.Fatal(err)
	}
	return db, store, schemaName
}

// count returns how many lessons and outbox events another session sees.
func count(t *testing.T, db *pgxpool.Pool, schemaName string) (lessons, events int) {
	t.Helper()
	err := db.QueryRow(context.Background(), "SELECT (SELECT count(*) FROM "+pgx.Identifier{schemaName, "lessons"}.Sanitize()+
		"), (SELECT count(*) FROM "+pgx.Identifier{schemaName, "outbox"}.Sanitize()+")").Scan(&lessons, &events)
	if err != nil {
		t.Fatal(err)
	}
	return lessons, events
}
