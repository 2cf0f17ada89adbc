package relay

import (
	"net/url"
	"regexp"
)

// RedactURL hides the password of a URL-shaped DSN or broker URL, for logs
// and error messages.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return Redact(raw)
	}
	return u.Redacted()
}

var passwordKV = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)
var urlUserinfo = regexp.MustCompile(`(://[^:/@\s]*:)[^@\s]*@`)

// Redact removes passwords from free text that may quote a DSN: key=value
// "password=..." pairs and "user:pass@" URL userinfo.
func Redact(s string) string {
	s = passwordKV.ReplaceAllString(s, "${1}xxxxx")
	return urlUserinfo.ReplaceAllString(s, "${1}xxxxx@")
}
