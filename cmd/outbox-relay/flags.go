package main

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

func (l *stringList) Type() string { return "string" }

func (l *stringList) Set(v string) error {
	if v == "" {
		return errors.New("must not be empty")
	}
	*l = append(*l, v)
	return nil
}

// idList is a repeatable UUID flag.
type idList []uuid.UUID

func (l *idList) String() string { return fmt.Sprint([]uuid.UUID(*l)) }

func (l *idList) Type() string { return "uuid" }

func (l *idList) Set(v string) error {
	id, err := uuid.Parse(v)
	if err != nil {
		return fmt.Errorf("%q is not a UUID", v)
	}
	*l = append(*l, id)
	return nil
}

// ageFlag is a positive age: a Go duration or days (7d, 1d12h).
type ageFlag struct {
	d   time.Duration
	set bool
}

func (a *ageFlag) Type() string { return "age" }

func (a *ageFlag) String() string {
	if !a.set {
		return ""
	}
	return a.d.String()
}

func (a *ageFlag) Set(v string) error {
	d, err := parseAge(v)
	if err != nil {
		return err
	}
	a.d, a.set = d, true
	return nil
}

var daysPrefix = regexp.MustCompile(`^(\d+)d(.*)$`)

// parseAge parses a positive duration, accepting a leading number of days
// ("7d", "1d12h") besides everything time.ParseDuration takes.
func parseAge(s string) (time.Duration, error) {
	bad := fmt.Errorf("%q is not a positive duration such as 30m, 72h or 7d", s)
	var days time.Duration
	rest := s
	if m := daysPrefix.FindStringSubmatch(s); m != nil {
		n, err := strconv.Atoi(m[1])
		if err != nil || n > 100000 {
			return 0, bad
		}
		days, rest = time.Duration(n)*24*time.Hour, m[2]
	}
	var d time.Duration
	if rest != "" {
		var err error
		if d, err = time.ParseDuration(rest); err != nil {
			return 0, bad
		}
	}
	if days+d <= 0 || (rest == "" && days == 0) {
		return 0, bad
	}
	return days + d, nil
}
