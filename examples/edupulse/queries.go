package edupulse

import "strings"

// queries are the Store's SQL, rendered once for its schema.
type queries struct {
	createTables     string
	insertLesson     string
	lessonForQuiz    string
	insertSubmission string
	insertBadge      string
}

// newQueries renders every statement for schema, an already quoted identifier.
func newQueries(schema string) queries {
	r := strings.NewReplacer("{{schema}}", schema)
	return queries{
		createTables:     r.Replace(createTables),
		insertLesson:     r.Replace(insertLesson),
		lessonForQuiz:    r.Replace(lessonForQuiz),
		insertSubmission: r.Replace(insertSubmission),
		insertBadge:      r.Replace(insertBadge),
	}
}

// createTables runs as one implicit transaction (simple protocol, no
// parameters), so a failure leaves nothing half created.
const createTables = `
CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{schema}}.lessons (
    id             uuid        PRIMARY KEY,
    course_id      text        NOT NULL,
    title          text        NOT NULL,
    author_id      uuid        NOT NULL,
    question_count integer     NOT NULL CHECK (question_count > 0),
    published_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {{schema}}.quiz_submissions (
    id           uuid        PRIMARY KEY,
    lesson_id    uuid        NOT NULL REFERENCES {{schema}}.lessons (id),
    learner_id   uuid        NOT NULL,
    score        integer     NOT NULL,
    max_score    integer     NOT NULL,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    CHECK (score BETWEEN 0 AND max_score)
);

CREATE TABLE IF NOT EXISTS {{schema}}.badges (
    learner_id    uuid        NOT NULL,
    badge         text        NOT NULL,
    lesson_id     uuid        NOT NULL REFERENCES {{schema}}.lessons (id),
    submission_id uuid        NOT NULL REFERENCES {{schema}}.quiz_submissions (id),
    awarded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (learner_id, badge, lesson_id)
);`

const insertLesson = `INSERT INTO {{schema}}.lessons (id, course_id, title, author_id, question_count)
VALUES ($1, $2, $3, $4, $5)
RETURNING published_at`

const lessonForQuiz = `SELECT title, question_count FROM {{schema}}.lessons WHERE id = $1`

const insertSubmission = `INSERT INTO {{schema}}.quiz_submissions (id, lesson_id, learner_id, score, max_score)
VALUES ($1, $2, $3, $4, $5)
RETURNING submitted_at`

// insertBadge returns no row when the learner already has the badge.
const insertBadge = `INSERT INTO {{schema}}.badges (learner_id, badge, lesson_id, submission_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
RETURNING awarded_at`
