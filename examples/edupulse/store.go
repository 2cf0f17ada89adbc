package edupulse

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// Store writes EduPulse's domain rows, each with the events that announce
// it, using the caller's transaction: a change and its events commit or roll
// back together, which is the whole point of the outbox.
type Store struct {
	outbox *outbox.Writer // nil writes to public.outbox
	q      queries
}

// NewStore returns a Store for the domain tables in schema. Events go to w,
// or to public.outbox (the relay's default) when w is nil.
func NewStore(schema string, w *outbox.Writer) (*Store, error) {
	if schema == "" {
		return nil, errors.New("edupulse: empty schema name")
	}
	return &Store{outbox: w, q: newQueries(pgx.Identifier{schema}.Sanitize())}, nil
}

// CreateTables creates the schema and its tables if they are missing.
func (s *Store) CreateTables(ctx context.Context, db *pgxpool.Pool) error {
	if _, err := db.Exec(ctx, s.q.createTables); err != nil {
		return fmt.Errorf("create edupulse tables: %w", err)
	}
	return nil
}

// NewLesson is what an author publishes.
type NewLesson struct {
	CourseID      string
	Title         string
	AuthorID      uuid.UUID
	QuestionCount int
}

// PublishLesson inserts a lesson and its lesson.published event with tx.
// Both exist only if tx commits.
func (s *Store) PublishLesson(ctx context.Context, tx pgx.Tx, correlationID string, l NewLesson) (LessonPublished, error) {
	e := LessonPublished{
		SchemaVersion: SchemaVersion,
		LessonID:      uuid.Must(uuid.NewV7()),
		CourseID:      l.CourseID,
		Title:         l.Title,
		AuthorID:      l.AuthorID,
		QuestionCount: l.QuestionCount,
	}
	err := tx.QueryRow(ctx, s.q.insertLesson, e.LessonID, e.CourseID, e.Title, e.AuthorID, e.QuestionCount).Scan(&e.PublishedAt)
	if err != nil {
		return e, fmt.Errorf("insert lesson: %w", err)
	}
	e.PublishedAt = e.PublishedAt.UTC()
	ev, err := newEvent(TypeLessonPublished, e.LessonID, correlationID, e)
	if err != nil {
		return e, err
	}
	return e, s.write(ctx, tx, ev)
}

// Submission is a learner's answer to a lesson's quiz.
type Submission struct {
	LessonID  uuid.UUID
	LearnerID uuid.UUID
	Score     int
}

// SubmitQuiz records a submission and its quiz.submitted event with tx. A
// learner's first perfect score on a lesson also awards BadgeLessonAce, and
// its badge.awarded event, in the same transaction; otherwise the returned
// badge is nil. Nothing exists unless tx commits.
func (s *Store) SubmitQuiz(ctx context.Context, tx pgx.Tx, correlationID string, sub Submission) (QuizSubmitted, *BadgeAwarded, error) {
	q := QuizSubmitted{
		SchemaVersion: SchemaVersion,
		SubmissionID:  uuid.Must(uuid.NewV7()),
		LessonID:      sub.LessonID,
		LearnerID:     sub.LearnerID,
		Score:         sub.Score,
	}
	err := tx.QueryRow(ctx, s.q.lessonForQuiz, sub.LessonID).Scan(&q.LessonTitle, &q.MaxScore)
	if errors.Is(err, pgx.ErrNoRows) {
		return q, nil, fmt.Errorf("submit quiz: lesson %s does not exist", sub.LessonID)
	} else if err != nil {
		return q, nil, fmt.Errorf("submit quiz: read lesson: %w", err)
	}
	q.Passed = q.Score*100 >= PassPercent*q.MaxScore
	err = tx.QueryRow(ctx, s.q.insertSubmission, q.SubmissionID, q.LessonID, q.LearnerID, q.Score, q.MaxScore).Scan(&q.SubmittedAt)
	if err != nil {
		return q, nil, fmt.Errorf("insert quiz submission: %w", err)
	}
	q.SubmittedAt = q.SubmittedAt.UTC()
	ev, err := newEvent(TypeQuizSubmitted, q.LearnerID, correlationID, q)
	if err != nil {
		return q, nil, err
	}
	events := []outbox.Event{ev}

	var badge *BadgeAwarded
	if q.Score == q.MaxScore {
		b := BadgeAwarded{
			SchemaVersion: SchemaVersion,
			LearnerID:     q.LearnerID,
			Badge:         BadgeLessonAce,
			LessonID:      q.LessonID,
			SubmissionID:  q.SubmissionID,
		}
		err := tx.QueryRow(ctx, s.q.insertBadge, b.LearnerID, b.Badge, b.LessonID, b.SubmissionID).Scan(&b.AwardedAt)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			// Already earned: the badge table, not this code, decides, so
			// concurrent perfect scores still award it once.
		case err != nil:
			return q, nil, fmt.Errorf("insert badge: %w", err)
		default:
			b.AwardedAt = b.AwardedAt.UTC()
			ev, err := newEvent(TypeBadgeAwarded, b.LearnerID, correlationID, b)
			if err != nil {
				return q, nil, err
			}
			events = append(events, ev)
			badge = &b
		}
	}
	return q, badge, s.write(ctx, tx, events...)
}

// newEvent builds an outbox event keyed by its aggregate, so the relay keeps
// one aggregate's events in order when ordering is on.
func newEvent(eventType string, key uuid.UUID, correlationID string, payload any) (outbox.Event, error) {
	ev, err := outbox.NewJSONEvent(eventType, payload)
	if err != nil {
		return ev, err
	}
	ev.Key = key.String()
	ev.CorrelationID = correlationID
	ev.Headers = headers()
	return ev, nil
}

func (s *Store) write(ctx context.Context, tx pgx.Tx, events ...outbox.Event) error {
	if s.outbox == nil {
		return outbox.Write(ctx, tx, events...)
	}
	return s.outbox.Write(ctx, tx, events...)
}
