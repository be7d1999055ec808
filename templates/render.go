package templates

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	ctdep "github.com/hashicorp/consul-template/dependency"
	cttemplate "github.com/hashicorp/consul-template/template"
	consulapi "github.com/hashicorp/consul/api"
)

// deniedFuncs are the consul-template functions a snippet may not call: they run programs
// (plugin), write files (writeToFile), read the proxy's environment (env, mustEnv, envOrDefault:
// it holds the Consul ACL token) or need Vault or Nomad, which the proxy does not configure.
// `file` is not denied: it is replaced by one that reads only files of the templates folder.
func deniedFuncs() []string {
	return []string{
		"plugin", "writeToFile",
		"env", "mustEnv", "envOrDefault",
		"secret", "secrets", "pkiCert",
		"nomad*",
	}
}

// RenderError is a template that could not be rendered: the file is gone or unreadable, it does not
// parse, it calls an unknown or denied function, it fails, it waits for data Consul does not have,
// or Consul did not answer. Render returns it (or a context error when the caller gave up).
type RenderError struct {
	// Template is the template's path relative to the folder.
	Template string
	// Reason says why, as a phrase that follows the template's name.
	Reason string
	// Unavailable says that Consul did not answer (every address unreachable or failing): the
	// template itself may be fine and rendering again later may succeed.
	Unavailable bool
	// Err is the underlying error, if any.
	Err error
}

func (e *RenderError) Error() string { return fmt.Sprintf("template %q %s", e.Template, e.Reason) }

func (e *RenderError) Unwrap() error { return e.Err }

// ConsulUnavailable reports whether Consul did not answer (Unavailable), for callers that do not
// import this package.
func (e *RenderError) ConsulUnavailable() bool { return e.Unavailable }

// errTimeout is the cause of a Render's context when its own timeout elapsed.
var errTimeout = errors.New("template render timeout")

// consulDown is a Consul agent that did not answer: the next address is tried.
type consulDown struct {
	addr string
	err  error
}

func (e *consulDown) Error() string { return fmt.Sprintf("%s: %v", e.addr, e.err) }
func (e *consulDown) Unwrap() error { return e.err }

// Render renders the template at rel (a path Resolve returned) once, in process, with the
// consul-template library against Consul, and returns the text. Nothing is written to disk.
//
// The template is parsed before Consul is asked anything. Its dependencies are then fetched
// round by round (a template whose queries depend on earlier results needs several) until it
// renders with complete data, as consul-template does: `key` waits until the key exists,
// `service` returns the instances Consul has, maybe none. Consul's addresses are tried in turn,
// starting with the one that answered last, when one does not answer.
//
// Render fails with a *RenderError when the file cannot be read, does not parse, calls an unknown
// or denied function, fails, waits longer than the timeout for data Consul does not have, or when
// no Consul address answers (Unavailable). When ctx ends first it returns ctx's error, wrapped; a
// blocking query it started then ends within the timeout. (The library's Consul client has no
// request timeout: a query sent to an agent that accepts connections but never answers ends only
// when the agent answers or the connection drops, although Render itself returns at its timeout.)
func (r *Renderer) Render(ctx context.Context, rel string) (string, error) {
	start := time.Now()
	contents, reason := r.read(rel)
	if reason != "" {
		return "", &RenderError{Template: rel, Reason: reason}
	}
	if contents == "" {
		return "", nil
	}
	tmpl, err := cttemplate.NewTemplate(&cttemplate.NewTemplateInput{
		Contents:         contents,
		ErrFatal:         true,
		FunctionDenylist: deniedFuncs(),
		ExtFuncMap:       map[string]any{"file": r.fileFunc},
	})
	if err != nil {
		return "", &RenderError{Template: rel, Reason: "cannot be loaded: " + err.Error(), Err: err}
	}
	// A first pass without data: parse errors and unknown functions are found before Consul is asked.
	if _, err := tmpl.Execute(&cttemplate.ExecuteInput{Brain: cttemplate.NewBrain()}); err != nil {
		return "", executeError(rel, err)
	}
	if len(r.addrs) == 0 {
		return "", &RenderError{Template: rel, Reason: "cannot be rendered: no Consul address is configured", Unavailable: true}
	}

	ctx, cancel := context.WithTimeoutCause(ctx, r.timeout, errTimeout)
	defer cancel()
	n := len(r.addrs)
	first := int(r.next.Load()) % n
	var downs []string
	var lastErr error
	for i := 0; i < n; i++ {
		idx := (first + i) % n
		addr := r.addrs[idx]
		out, rounds, err := r.renderWith(ctx, tmpl, rel, addr, n)
		if err == nil {
			r.next.Store(int32(idx))
			r.logger.Debug("template rendered", "template", rel, "consul", addr, "rounds", rounds,
				"bytes", len(out), "duration", time.Since(start).Round(time.Millisecond))
			return out, nil
		}
		var down *consulDown
		if !errors.As(err, &down) {
			return "", err
		}
		r.logger.Warn("Consul did not answer a template's query", "template", rel, "consul", addr, "error", down.err.Error())
		downs = append(downs, down.Error())
		lastErr = err
		if ctx.Err() != nil {
			if context.Cause(ctx) != errTimeout {
				return "", fmt.Errorf("render template %q: %w", rel, ctx.Err())
			}
			break
		}
	}
	return "", &RenderError{Template: rel, Unavailable: true, Err: lastErr,
		Reason: "cannot be rendered: Consul did not answer: " + strings.Join(downs, "; ")}
}

// renderWith renders tmpl against the Consul agent at addr: execute, fetch what is missing,
// remember it, execute again, until nothing is missing. A *consulDown says to try another agent.
func (r *Renderer) renderWith(ctx context.Context, tmpl *cttemplate.Template, rel, addr string, addrs int) (string, int, error) {
	clients := ctdep.NewClientSet()
	if err := clients.CreateConsulClient(&ctdep.CreateConsulClientInput{
		Address: addr,
		// One connection per query, closed after it: nothing lingers after a Render.
		TransportDisableKeepAlives:   true,
		TransportDialTimeout:         max(r.timeout/time.Duration(addrs), 100*time.Millisecond),
		TransportTLSHandshakeTimeout: r.timeout,
	}); err != nil {
		return "", 0, &RenderError{Template: rel, Unavailable: true, Err: err,
			Reason: fmt.Sprintf("cannot be rendered: Consul client for %s: %v", addr, err)}
	}
	defer clients.Stop()

	brain := cttemplate.NewBrain()
	for round := 1; ; round++ {
		if err := ctx.Err(); err != nil {
			return "", round, r.ctxError(ctx, rel, addr, nil)
		}
		res, err := tmpl.Execute(&cttemplate.ExecuteInput{Brain: brain})
		if err != nil {
			return "", round, executeError(rel, err)
		}
		missing := res.Missing.List()
		if len(missing) == 0 {
			return string(res.Output), round, nil
		}
		if err := r.fetchAll(ctx, clients, brain, missing, rel, addr); err != nil {
			return "", round, err
		}
	}
}

// fetchState is one dependency being fetched. answered says that Consul answered that it does
// not have the data yet (a key that does not exist): the fetch waits for it.
type fetchState struct {
	dep      ctdep.Dependency
	answered atomic.Bool
}

type fetchResult struct {
	st   *fetchState
	data any
	err  error
}

// fetchAll fetches the missing dependencies in parallel and remembers their data in brain. Each
// fetch runs in its own goroutine, which ends by itself when its query returns (bounded by the
// deadline of ctx): the channel has room for every result, so none ever blocks.
func (r *Renderer) fetchAll(ctx context.Context, clients *ctdep.ClientSet, brain *cttemplate.Brain,
	missing []ctdep.Dependency, rel, addr string) error {
	for _, d := range missing {
		if d.Type() != ctdep.TypeConsul {
			return &RenderError{Template: rel, Reason: fmt.Sprintf("uses %s, which is not available in templates", d)}
		}
	}
	results := make(chan fetchResult, len(missing))
	pending := make(map[*fetchState]bool, len(missing))
	for _, d := range missing {
		st := &fetchState{dep: d}
		pending[st] = true
		go func() {
			data, err := fetchOne(ctx, clients, st)
			results <- fetchResult{st: st, data: data, err: err}
		}()
	}
	for len(pending) > 0 {
		select {
		case res := <-results:
			if res.err != nil {
				if ctx.Err() != nil {
					return r.ctxError(ctx, rel, addr, pending)
				}
				return fetchError(rel, addr, res.st.dep, res.err)
			}
			delete(pending, res.st)
			brain.Remember(res.st.dep, res.data)
		case <-ctx.Done():
			return r.ctxError(ctx, rel, addr, pending)
		}
	}
	return nil
}

// fetchOne queries Consul for one dependency until it has data. A dependency that blocks on
// missing data (`key` of a key that does not exist) is asked again with a blocking query, which
// returns when the data changes or at the deadline of ctx.
func fetchOne(ctx context.Context, clients *ctdep.ClientSet, st *fetchState) (data any, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("query %s failed: %v", st.dep, p)
		}
	}()
	var index uint64
	for {
		deadline, _ := ctx.Deadline()
		wait := time.Until(deadline)
		if wait <= 0 {
			// The deadline passed: ctx ends at once, if its timer has not fired yet.
			<-ctx.Done()
		}
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		began := time.Now()
		// A read from scratch is consistent, as the proxy's own reads are (see consul.fresh).
		data, meta, err := st.dep.Fetch(clients, &ctdep.QueryOptions{WaitIndex: index, WaitTime: wait, RequireConsistent: index == 0})
		if err != nil {
			return nil, err
		}
		if meta == nil {
			return nil, fmt.Errorf("query %s: no response metadata", st.dep)
		}
		if data != nil || !meta.BlockOnNil {
			return data, nil
		}
		st.answered.Store(true)
		if meta.LastIndex > index {
			index = meta.LastIndex
		} else {
			// Consul answered at once with no newer index: do not ask it in a tight loop.
			index = 0
			select {
			case <-ctx.Done():
			case <-time.After(max(0, 100*time.Millisecond-time.Since(began))):
			}
		}
	}
}

// ctxError is the error of a render whose context ended while pending dependencies were fetched.
func (r *Renderer) ctxError(ctx context.Context, rel, addr string, pending map[*fetchState]bool) error {
	if context.Cause(ctx) != errTimeout {
		return fmt.Errorf("render template %q: %w", rel, ctx.Err())
	}
	var waiting, silent []string
	for st := range pending {
		if st.answered.Load() {
			waiting = append(waiting, st.dep.String())
		} else {
			silent = append(silent, st.dep.String())
		}
	}
	sort.Strings(waiting)
	sort.Strings(silent)
	switch {
	case len(waiting) > 0:
		return &RenderError{Template: rel, Err: ctx.Err(),
			Reason: "waits for data Consul does not have: " + strings.Join(waiting, ", ")}
	case len(silent) > 0:
		return &RenderError{Template: rel, Unavailable: true, Err: ctx.Err(),
			Reason: fmt.Sprintf("cannot be rendered: Consul at %s did not answer within %v: %s",
				addr, r.timeout, strings.Join(silent, ", "))}
	default:
		return &RenderError{Template: rel, Err: ctx.Err(),
			Reason: fmt.Sprintf("did not render within %v", r.timeout)}
	}
}

// fetchError sorts a failed query: an agent that did not answer (connection refused, reset,
// timed out) or answered with a server error is a *consulDown, so the next address is tried;
// any other answer (an ACL refusal, a bad query) is the template's fault.
func fetchError(rel, addr string, d ctdep.Dependency, err error) error {
	var status consulapi.StatusError
	if errors.As(err, &status) {
		if status.Code >= 500 || status.Code == 429 {
			return &consulDown{addr: addr, err: err}
		}
		return &RenderError{Template: rel, Err: err,
			Reason: fmt.Sprintf("fails: Consul refused %s: %s", d, strings.TrimSpace(status.Body))}
	}
	var urlErr *url.Error
	var netErr net.Error
	if errors.As(err, &urlErr) || errors.As(err, &netErr) {
		return &consulDown{addr: addr, err: err}
	}
	return &RenderError{Template: rel, Err: err, Reason: fmt.Sprintf("fails: query %s: %v", d, err)}
}

var (
	// text/template names positions "template: :LINE:" or "template: :LINE:COL: executing \"\" at"
	// (the template has no name); what follows is the message.
	tmplPosRe   = regexp.MustCompile(`template: :(\d+(?::\d+)?): (?:executing "[^"]*" at )?`)
	deniedRe    = regexp.MustCompile(`error calling ([A-Za-z0-9_]+): function is disabled`)
	undefFuncRe = regexp.MustCompile(`function "([^"]+)" not defined`)
)

// executeError turns an error of consul-template's Execute ("parse: template: :3: ..." or
// "execute: template: :1:3: executing ...") into a RenderError that says what is wrong and where.
func executeError(rel string, err error) error {
	msg := err.Error()
	phase := "fails"
	switch {
	case strings.HasPrefix(msg, "parse: "):
		msg, phase = strings.TrimPrefix(msg, "parse: "), "does not parse"
	case strings.HasPrefix(msg, "execute: "):
		msg = strings.TrimPrefix(msg, "execute: ")
	}
	msg = tmplPosRe.ReplaceAllString(msg, "line $1: ")
	switch {
	case deniedRe.MatchString(msg):
		name := deniedRe.FindStringSubmatch(msg)[1]
		return &RenderError{Template: rel, Err: err,
			Reason: fmt.Sprintf("calls %s, which is denied in templates (%s)", name, msg)}
	case undefFuncRe.MatchString(msg):
		name := undefFuncRe.FindStringSubmatch(msg)[1]
		return &RenderError{Template: rel, Err: err,
			Reason: fmt.Sprintf("does not parse: unknown function %s (%s)", name, msg)}
	}
	return &RenderError{Template: rel, Err: err, Reason: phase + ": " + msg}
}

// fileFunc is the `file` function of templates: the contents of another file of the templates
// folder, under the same rules as Resolve.
func (r *Renderer) fileFunc(p string) (string, error) {
	contents, reason := r.read(p)
	if reason != "" {
		return "", fmt.Errorf("file %q %s", p, reason)
	}
	return contents, nil
}
