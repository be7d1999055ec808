// Package templates reads custom HAProxy snippets (frontend and backend parts of a route) from one
// folder and renders them in process with the consul-template library against Consul.
//
// A snippet is a consul-template template: `{{range service "books-ms" "any"}}`, `key`,
// `keyOrDefault`, `tree`, `services`, ... are available. Functions that run programs, write files,
// read the environment or need Vault or Nomad are denied; `file` reads only files of the folder.
package templates

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

const (
	// MaxSize is the largest template file accepted, in bytes.
	MaxSize = 1 << 20
	// maxPathLen bounds the length of a template path given by a user.
	maxPathLen = 1024
	// DefaultTimeout bounds one Render when New is given no timeout.
	DefaultTimeout = 5 * time.Second
)

// Renderer reads snippet templates from one folder and renders them against Consul.
// It is safe for concurrent use.
type Renderer struct {
	dir     string
	addrs   []string
	timeout time.Duration
	logger  *slog.Logger

	// next is the index in addrs of the agent that answered last: a Render starts there.
	next atomic.Int32
}

// New returns a Renderer of the templates in dir. dir may not exist yet: then every Resolve fails
// with a message that says so. consulAddrs are Consul HTTP addresses (host:port), tried in turn when
// one is unreachable. timeout bounds one Render (DefaultTimeout when it is not positive).
func New(dir string, consulAddrs []string, timeout time.Duration, logger *slog.Logger) *Renderer {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	var addrs []string
	for _, a := range consulAddrs {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	return &Renderer{dir: dir, addrs: addrs, timeout: timeout, logger: logger}
}

// Dir is the templates folder the Renderer reads.
func (r *Renderer) Dir() string { return r.dir }

// Resolve checks a path given by a user (param is the request parameter's name, for the error):
// relative to the folder, or absolute but inside it; after cleaning and resolving symlinks it must
// stay inside the folder and name a regular readable file no larger than MaxSize. It returns the
// path relative to the folder, with '/' separators (what the KV store keeps). A refusal is a
// *route.ParamError that names the reason; it never holds the file's contents.
func (r *Renderer) Resolve(param, p string) (string, error) {
	rel, _, reason := r.locate(p)
	if reason != "" {
		if p != "" {
			reason = fmt.Sprintf("%q %s", p, reason)
		}
		return "", &route.ParamError{Param: param, Reason: reason}
	}
	return rel, nil
}

// locate is Resolve's check. It returns the path relative to the folder and the file's real path,
// or the reason of a refusal: a phrase that follows the path's name ("is outside the templates
// folder").
func (r *Renderer) locate(p string) (rel, real string, reason string) {
	switch {
	case p == "":
		return "", "", "is empty: name a file of the templates folder"
	case len(p) > maxPathLen:
		return "", "", fmt.Sprintf("is longer than %d bytes", maxPathLen)
	case !utf8.ValidString(p):
		return "", "", "is not valid UTF-8"
	case strings.ContainsFunc(p, unicode.IsControl):
		return "", "", "contains a control character (a newline, a tab, ...)"
	case hasDotDot(p):
		return "", "", "contains '..': name a file inside the templates folder"
	}
	if r.dir == "" {
		return "", "", "cannot be used: no templates folder is configured"
	}
	dirAbs, err := filepath.Abs(r.dir)
	if err != nil {
		return "", "", fmt.Sprintf("cannot be used: the templates folder %s: %v", r.dir, err)
	}
	dirReal, err := filepath.EvalSymlinks(dirAbs)
	if err != nil {
		if os.IsNotExist(err) {
			return "", "", fmt.Sprintf("cannot be used: the templates folder %s does not exist", r.dir)
		}
		return "", "", fmt.Sprintf("cannot be used: the templates folder %s cannot be read", r.dir)
	}
	if st, err := os.Stat(dirReal); err != nil || !st.IsDir() {
		return "", "", fmt.Sprintf("cannot be used: the templates folder %s is not a folder", r.dir)
	}

	if filepath.IsAbs(p) {
		clean := filepath.Clean(p)
		var ok bool
		if rel, ok = inside(dirAbs, clean); !ok {
			if rel, ok = inside(dirReal, clean); !ok {
				return "", "", "is outside the templates folder"
			}
		}
	} else {
		rel = filepath.Clean(p)
	}
	if rel == "." {
		return "", "", "names the templates folder, not a file in it"
	}

	real, err = filepath.EvalSymlinks(filepath.Join(dirReal, rel))
	if err != nil {
		if os.IsNotExist(err) {
			return "", "", "does not exist in the templates folder"
		}
		return "", "", "cannot be read in the templates folder"
	}
	if _, ok := inside(dirReal, real); !ok {
		return "", "", "is outside the templates folder (a symbolic link leads out of it)"
	}
	st, err := os.Stat(real)
	switch {
	case err != nil:
		return "", "", "cannot be read in the templates folder"
	case st.IsDir():
		return "", "", "is a folder, not a template file"
	case !st.Mode().IsRegular():
		return "", "", "is not a regular file"
	case st.Size() > MaxSize:
		return "", "", "is larger than 1 MiB"
	}
	f, err := os.Open(real)
	if err != nil {
		return "", "", "cannot be read (" + permissionOr(err) + ")"
	}
	_ = f.Close()
	return filepath.ToSlash(rel), real, ""
}

// read returns the contents of the template at rel (checked again: the folder may have changed
// since Resolve) or the reason it cannot be read.
func (r *Renderer) read(rel string) (string, string) {
	_, real, reason := r.locate(rel)
	if reason != "" {
		return "", reason
	}
	f, err := os.Open(real)
	if err != nil {
		return "", fmt.Sprintf("cannot be read (%s)", permissionOr(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return "", "cannot be read"
	}
	if len(b) > MaxSize {
		return "", "is larger than 1 MiB"
	}
	return string(b), ""
}

// hasDotDot says whether one element of p is "..".
func hasDotDot(p string) bool {
	for _, e := range strings.Split(filepath.ToSlash(p), "/") {
		if e == ".." {
			return true
		}
	}
	return false
}

// inside returns target relative to dir when target is dir or below it. Both are clean and absolute.
func inside(dir, target string) (string, bool) {
	rel, err := filepath.Rel(dir, target)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return "", false
	}
	return rel, true
}

func permissionOr(err error) string {
	if os.IsPermission(err) {
		return "permission denied"
	}
	return "it cannot be opened"
}
