// Command producer simulates EduPulse Live's users: authors publish lessons,
// learners submit quizzes and sometimes earn badges. Every request is one
// transaction that writes the domain rows and their events to the outbox
// together; the relay publishes the events after the commit.
//
//	go run ./examples/edupulse/producer -rate 5 -count 100
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/examples/edupulse"
	"github.com/outbox-relay/outbox-relay/outbox"
)

const (
	localDSN    = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	maxFailures = 5 // consecutive failed requests before giving up
)

func main() { os.Exit(run()) }

func run() int {
	dsn := flag.String("dsn", "", "PostgreSQL URL (default $OUTBOX_RELAY_POSTGRES_DSN, else "+localDSN+")")
	rate := flag.Float64("rate", 5, "events per second")
	count := flag.Int("count", 0, "stop after this many events, 0 = until SIGINT/SIGTERM (a quiz that earns a badge writes two, so one more may be written)")
	domain := flag.String("schema", "edupulse", "schema of the lessons, quiz_submissions and badges tables")
	outboxSchema := flag.String("outbox-schema", "public", "schema of the outbox table (the relay's postgres.schema)")
	outboxTable := flag.String("outbox-table", "outbox", "outbox table (the relay's postgres.table)")
	flag.Parse()
	if *rate <= 0 || *count < 0 || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "producer: -rate must be positive, -count 0 or more, and no arguments")
		return 2
	}

	var w *outbox.Writer // nil: outbox.Write, to public.outbox
	if *outboxSchema != "public" || *outboxTable != "outbox" {
		var err error
		if w, err = outbox.NewWriter(*outboxSchema, *outboxTable); err != nil {
			fmt.Fprintln(os.Stderr, "producer:", err)
			return 2
		}
	}
	store, err := edupulse.NewStore(*domain, w)
	if err != nil {
		fmt.Fprintln(os.Stderr, "producer:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	p := &producer{
		store: store,
		log:   log.New(os.Stdout, "", log.Ltime|log.Lmicroseconds),
		by:    map[string]int{},
	}
	if err := p.run(ctx, cmp.Or(*dsn, os.Getenv("OUTBOX_RELAY_POSTGRES_DSN"), localDSN), *rate, *count); err != nil {
		fmt.Fprintln(os.Stderr, "producer:", err)
		return 1
	}
	return 0
}

type producer struct {
	store   *edupulse.Store
	pool    *pgxpool.Pool
	log     *log.Logger
	lessons []edupulse.LessonPublished // the latest few, for learners to take quizzes on

	written, txs int
	by           map[string]int // events written by type
}

func (p *producer) run(ctx context.Context, dsn string, rate float64, count int) error {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	p.pool = pool
	if err := p.store.CreateTables(ctx, pool); err != nil {
		return err
	}

	// Pace by events, not requests, so -rate means what the relay sees.
	interval := time.Duration(float64(time.Second) / rate)
	next := time.Now()
	failures := 0
	for count == 0 || p.written < count {
		if !sleepUntil(ctx, next) {
			break
		}
		n, err := p.request(ctx)
		if err != nil {
			// A blip (database restart) passes; a missing table does not.
			if failures++; failures == maxFailures {
				return fmt.Errorf("%d requests in a row failed, the last: %w", failures, err)
			}
			p.log.Printf("request failed: %v", err)
			next = time.Now().Add(time.Second)
			continue
		}
		failures = 0
		next = next.Add(time.Duration(n) * interval)
		if now := time.Now(); next.Before(now.Add(-time.Second)) {
			next = now // after a stall, go on at the rate instead of bursting
		}
	}
	p.log.Printf("wrote %d events in %d transactions (%s=%d %s=%d %s=%d)", p.written, p.txs,
		edupulse.TypeLessonPublished, p.by[edupulse.TypeLessonPublished],
		edupulse.TypeQuizSubmitted, p.by[edupulse.TypeQuizSubmitted],
		edupulse.TypeBadgeAwarded, p.by[edupulse.TypeBadgeAwarded])
	return nil
}

// request simulates one user request, one transaction, and returns how many
// events it wrote.
func (p *producer) request(ctx context.Context) (int, error) {
	// A request in flight completes even after SIGINT: cancelling it midway
	// could leave a commit whose outcome we never learn.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	corr := uuid.NewString()
	if len(p.lessons) == 0 || rand.IntN(4) == 0 {
		return p.publishLesson(ctx, corr)
	}
	return p.submitQuiz(ctx, corr)
}

func (p *producer) publishLesson(ctx context.Context, corr string) (int, error) {
	c := courses[rand.IntN(len(courses))]
	author := authors[rand.IntN(len(authors))]
	in := edupulse.NewLesson{
		CourseID:      c.id,
		Title:         c.titles[rand.IntN(len(c.titles))],
		AuthorID:      personID(author),
		QuestionCount: 5 + rand.IntN(6),
	}
	var l edupulse.LessonPublished
	err := pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		var err error
		l, err = p.store.PublishLesson(ctx, tx, corr, in)
		return err
	})
	if err != nil {
		return 0, err
	}
	if p.lessons = append(p.lessons, l); len(p.lessons) > 6 {
		p.lessons = p.lessons[1:]
	}
	p.record(edupulse.TypeLessonPublished)
	p.log.Printf("%s published %q in %s (%d questions) -> %s  corr=%s",
		author, l.Title, l.CourseID, l.QuestionCount, edupulse.TypeLessonPublished, corr)
	return 1, nil
}

func (p *producer) submitQuiz(ctx context.Context, corr string) (int, error) {
	lesson := p.lessons[rand.IntN(len(p.lessons))]
	learner := learners[rand.IntN(len(learners))]
	// Skewed high so perfect scores, and so badges, come up now and then.
	score := lesson.QuestionCount - min(rand.IntN(5), lesson.QuestionCount)
	in := edupulse.Submission{LessonID: lesson.LessonID, LearnerID: personID(learner), Score: score}
	var (
		q     edupulse.QuizSubmitted
		badge *edupulse.BadgeAwarded
	)
	err := pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		var err error
		q, badge, err = p.store.SubmitQuiz(ctx, tx, corr, in)
		return err
	})
	if err != nil {
		return 0, err
	}
	types := []string{edupulse.TypeQuizSubmitted}
	earned := ""
	if badge != nil {
		types = append(types, edupulse.TypeBadgeAwarded)
		earned = " and earned " + badge.Badge
	}
	p.record(types...)
	p.log.Printf("%s scored %d/%d on %q%s -> %s  corr=%s",
		learner, q.Score, q.MaxScore, q.LessonTitle, earned, strings.Join(types, " + "), corr)
	return len(types), nil
}

// record counts one committed transaction and its events.
func (p *producer) record(eventTypes ...string) {
	p.txs++
	p.written += len(eventTypes)
	for _, t := range eventTypes {
		p.by[t]++
	}
}

// sleepUntil waits for t and reports false if ctx ended first.
func sleepUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return ctx.Err() == nil
	}
}

// personID gives each simulated person a stable id across runs, so badges
// earned in an earlier demo stay earned.
func personID(name string) uuid.UUID {
	return uuid.NewSHA1(uuid.NameSpaceURL, []byte("https://edupulse.example/people/"+name))
}

var (
	authors  = []string{"ms-okafor", "mr-lindqvist", "dr-tanaka"}
	learners = []string{"amara", "bruno", "chen", "dalia", "emeka", "freya"}
	courses  = []struct {
		id     string
		titles []string
	}{
		{"math-101", []string{"Fractions with Pizza", "Negative Numbers on a Number Line", "Percentages in the Shop"}},
		{"bio-110", []string{"Photosynthesis in Five Minutes", "How Cells Divide", "The Water Cycle"}},
		{"code-120", []string{"Loops Explained with Dominoes", "What Is a Variable?", "Debugging Like a Detective"}},
	}
)
