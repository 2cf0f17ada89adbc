// Package edupulse is a worked example of the transactional outbox for
// EduPulse Live, a social learning platform: authors publish lessons, learners
// submit quizzes and earn badges. Each change is written together with its
// event in one transaction (store.go); the relay publishes the events to the
// edupulse.events exchange, where the search indexer (consumer/) reads them.
//
// Run the whole thing with scripts/demo.sh (or `make demo`).
package edupulse

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
)

// Event types: the routing keys on the edupulse.events exchange. Consumers
// bind with lesson.#, quiz.# and badge.#, so new event types of an existing
// family reach them without a new binding.
const (
	TypeLessonPublished = "lesson.published"
	TypeQuizSubmitted   = "quiz.submitted"
	TypeBadgeAwarded    = "badge.awarded"
)

// SchemaVersion is the version of every payload below. Adding a field keeps
// it; renaming, removing or changing the meaning of one bumps it, so a
// consumer can refuse what it would misread instead of indexing garbage.
const SchemaVersion = 1

// HeaderSchemaVersion carries SchemaVersion as an AMQP header, so routing and
// tooling can look at it without decoding the body.
const HeaderSchemaVersion = "schema-version"

// BadgeLessonAce is awarded once per learner and lesson for a perfect score.
const BadgeLessonAce = "lesson-ace"

// PassPercent is the score, in percent of the maximum, that passes a quiz.
const PassPercent = 70

// LessonPublished is the payload of lesson.published; its partition key is
// the lesson id. On the wire:
//
//	{"schema_version":1,"lesson_id":"…","course_id":"math-101",
//	 "title":"Fractions with Pizza","author_id":"…","question_count":10,
//	 "published_at":"2025-03-01T09:30:00Z"}
type LessonPublished struct {
	SchemaVersion int       `json:"schema_version"`
	LessonID      uuid.UUID `json:"lesson_id"`
	CourseID      string    `json:"course_id"`
	Title         string    `json:"title"`
	AuthorID      uuid.UUID `json:"author_id"`
	QuestionCount int       `json:"question_count"`
	PublishedAt   time.Time `json:"published_at"`
}

// QuizSubmitted is the payload of quiz.submitted; its partition key is the
// learner id, so with ordering on a learner's submissions and the badges they
// earn arrive in the order they happened. The lesson title is copied in so
// the indexer needs no lookup. On the wire:
//
//	{"schema_version":1,"submission_id":"…","lesson_id":"…",
//	 "lesson_title":"Fractions with Pizza","learner_id":"…","score":8,
//	 "max_score":10,"passed":true,"submitted_at":"2025-03-01T09:31:00Z"}
type QuizSubmitted struct {
	SchemaVersion int       `json:"schema_version"`
	SubmissionID  uuid.UUID `json:"submission_id"`
	LessonID      uuid.UUID `json:"lesson_id"`
	LessonTitle   string    `json:"lesson_title"`
	LearnerID     uuid.UUID `json:"learner_id"`
	Score         int       `json:"score"`
	MaxScore      int       `json:"max_score"`
	Passed        bool      `json:"passed"`
	SubmittedAt   time.Time `json:"submitted_at"`
}

// BadgeAwarded is the payload of badge.awarded; its partition key is the
// learner id (see QuizSubmitted). On the wire:
//
//	{"schema_version":1,"learner_id":"…","badge":"lesson-ace",
//	 "lesson_id":"…","submission_id":"…","awarded_at":"2025-03-01T09:31:00Z"}
type BadgeAwarded struct {
	SchemaVersion int       `json:"schema_version"`
	LearnerID     uuid.UUID `json:"learner_id"`
	Badge         string    `json:"badge"`
	LessonID      uuid.UUID `json:"lesson_id"`
	SubmissionID  uuid.UUID `json:"submission_id"`
	AwardedAt     time.Time `json:"awarded_at"`
}

// ErrUnknownEvent is returned by Summarize for an event type it does not know.
var ErrUnknownEvent = errors.New("unknown event type")

// Summarize decodes an event body by its type and describes it in one line.
// It refuses payloads of a newer schema version than this code knows.
func Summarize(eventType string, body []byte) (string, error) {
	var v struct {
		SchemaVersion int `json:"schema_version"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return "", fmt.Errorf("%s: %w", eventType, err)
	}
	if v.SchemaVersion > SchemaVersion {
		return "", fmt.Errorf("%s: schema version %d is newer than %d", eventType, v.SchemaVersion, SchemaVersion)
	}
	switch eventType {
	case TypeLessonPublished:
		var e LessonPublished
		if err := json.Unmarshal(body, &e); err != nil {
			return "", fmt.Errorf("%s: %w", eventType, err)
		}
		return fmt.Sprintf("lesson %s %q in %s (%d questions)", short(e.LessonID), e.Title, e.CourseID, e.QuestionCount), nil
	case TypeQuizSubmitted:
		var e QuizSubmitted
		if err := json.Unmarshal(body, &e); err != nil {
			return "", fmt.Errorf("%s: %w", eventType, err)
		}
		result := "failed"
		if e.Passed {
			result = "passed"
		}
		return fmt.Sprintf("learner %s scored %d/%d on %q (%s)", short(e.LearnerID), e.Score, e.MaxScore, e.LessonTitle, result), nil
	case TypeBadgeAwarded:
		var e BadgeAwarded
		if err := json.Unmarshal(body, &e); err != nil {
			return "", fmt.Errorf("%s: %w", eventType, err)
		}
		return fmt.Sprintf("learner %s earned %s on lesson %s", short(e.LearnerID), e.Badge, short(e.LessonID)), nil
	}
	return "", fmt.Errorf("%w %q", ErrUnknownEvent, eventType)
}

// short abbreviates an id for humans. It keeps the last 8 hex digits: the
// first ones of a UUIDv7 are a timestamp, shared by ids made close together.
func short(id uuid.UUID) string { s := id.String(); return s[len(s)-8:] }

// headers are the AMQP headers every EduPulse event carries.
func headers() map[string]string {
	return map[string]string{HeaderSchemaVersion: strconv.Itoa(SchemaVersion)}
}
