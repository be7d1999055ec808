// Package consul talks to Consul: the catalog, for the instances behind each route, and the KV
// store, which keeps the route table. Every call takes a context and fails over between the agents
// it was given.
package consul

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// ErrUnavailable means that no Consul agent of the list answered. The API maps it to HTTP 503.
// Errors of this package wrap it; test with errors.Is.
var ErrUnavailable = errors.New("consul unavailable")

// DefaultRequestTimeout bounds one request to one agent, unless the caller's context ends sooner.
const DefaultRequestTimeout = 10 * time.Second

// Client talks to a list of Consul agents: every call goes to the current agent and moves on to the
// next one of the list when that agent cannot be reached or answers with a server error (5xx).
// A Client is safe for concurrent use.
type Client struct {
	agents  []agent
	current atomic.Int64 // index in agents of the agent that answered last
	logger  *slog.Logger
	timeout time.Duration // per request and agent

	filteredMu sync.Mutex
	filtered   map[string]time.Time // endpoint -> when an answer's filtering by ACLs was last logged
}

type agent struct {
	addr string // as given to New, for messages
	api  *api.Client
}

// New returns a client of the agents at addresses ("host:port", "http://host:port" or
// "https://host:port"), as listed in CONSUL_ADDRESS, and checks that one of them answers and knows
// a cluster leader. The other settings, the ACL token among them (CONSUL_HTTP_TOKEN), come from the
// environment as api.DefaultConfig reads it.
func New(addresses []string, logger *slog.Logger) (*Client, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{logger: logger, timeout: DefaultRequestTimeout, filtered: map[string]time.Time{}}
	for _, a := range addresses {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if err := checkAddress(a); err != nil {
			return nil, err
		}
		cfg := api.DefaultConfig()
		cfg.Address = a
		if isLoopback(a) {
			// Consul gzips every answer that the client accepts gzipped. Over loopback that is CPU
			// spent twice for nothing: at 10,000 routes the table is 6 MB of JSON, compressed by
			// Consul and decompressed here at the load and after every change of it.
			cfg.Transport.DisableCompression = true
		}
		hc, err := api.NewHttpClient(cfg.Transport, cfg.TLSConfig)
		if err != nil {
			return nil, fmt.Errorf("consul agent %s: %w", a, err)
		}
		hc.Transport = bodySink{base: aclFilterTransport{base: serverErrorTransport{base: hc.Transport}, filtered: c.filteredByACLs}}
		cfg.HttpClient = hc
		ac, err := api.NewClient(cfg)
		if err != nil {
			return nil, fmt.Errorf("consul agent %s: %w", a, err)
		}
		c.agents = append(c.agents, agent{addr: a, api: ac})
	}
	if len(c.agents) == 0 {
		return nil, errors.New("consul: no agent address given")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(len(c.agents))*c.timeout)
	defer cancel()
	if err := c.Ping(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// isLoopback reports whether the agent address a (as checkAddress accepts it) names this host:
// localhost or an address of 127.0.0.0/8 or ::1.
func isLoopback(a string) bool {
	if !strings.Contains(a, "://") {
		a = "http://" + a
	}
	u, err := url.Parse(a)
	if err != nil {
		return false
	}
	host := u.Hostname()
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkAddress rejects an agent address that cannot be a Consul HTTP API.
func checkAddress(a string) error {
	s := a
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("consul agent address %q: %w", a, err)
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("consul agent address %q: scheme %q is not http or https", a, u.Scheme)
	case u.Hostname() == "":
		return fmt.Errorf("consul agent address %q: no host", a)
	}
	return nil
}

// API returns the API client of the current agent, for calls this package does not wrap. It does
// not fail over by itself. Its HTTP client turns a 5xx answer into a transport error.
func (c *Client) API() *api.Client {
	return c.agents[c.current.Load()].api
}

// errNoLeader is an agent that answers but knows no cluster leader: it can serve nothing.
var errNoLeader = errors.New("no cluster leader")

// Ping checks that an agent answers and knows a cluster leader.
func (c *Client) Ping(ctx context.Context) error {
	err := c.do(ctx, func(ctx context.Context, a *api.Client) error {
		leader, err := a.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return err
		}
		if leader == "" {
			return errNoLeader
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("consul status leader: %w", err)
	}
	return nil
}

// fresh is the options of a read that does not block (a read from scratch): it asks Consul for a
// consistent answer. In the default mode Consul's leader answers from its state as it is, and a
// server that has just won an election on its restart holds only its last snapshot until it has
// replayed its log: for that moment it answers no node, no service and no key. A consistent read
// waits until the leader has replayed its log (a blocking query needs no such care: it waits for
// an index above the one it holds). It costs a round of the leader's heartbeats to its peers.
func fresh(ctx context.Context) *api.QueryOptions {
	return (&api.QueryOptions{RequireConsistent: true}).WithContext(ctx)
}

// from is the options of a read from index: a blocking query for at most wait, or, from 0, a read
// from scratch (fresh).
func from(ctx context.Context, index uint64, wait time.Duration) *api.QueryOptions {
	if index == 0 {
		return fresh(ctx)
	}
	return (&api.QueryOptions{WaitIndex: index, WaitTime: wait}).WithContext(ctx)
}

// do runs call against the current agent and, while the agent cannot serve it, against the next
// ones of the list, each time with the per-request timeout. It stays on the first agent that serves
// the call. An error the agent answers with (4xx, a failed transaction) is returned as is; when no
// agent serves the call the error wraps ErrUnavailable and names each agent's error.
func (c *Client) do(ctx context.Context, call func(ctx context.Context, a *api.Client) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	n := int64(len(c.agents))
	start := c.current.Load()
	failures := make([]string, 0, n)
	for i := range n {
		idx := (start + i) % n
		a := c.agents[idx]
		reqCtx, cancel := context.WithTimeout(ctx, c.timeout)
		err := call(reqCtx, a.api)
		timedOut := reqCtx.Err() != nil
		cancel()
		if err == nil {
			if idx != start && c.current.CompareAndSwap(start, idx) {
				c.logger.Info("consul: now using another agent", "agent", a.addr, "previous", c.agents[start].addr)
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("consul agent %s: %w", a.addr, ctx.Err())
		}
		if !timedOut && !agentFailed(err) {
			return err
		}
		failures = append(failures, a.addr+": "+err.Error())
		if i+1 < n {
			c.logger.Warn("consul: agent failed, trying the next one", "agent", a.addr, "error", err)
		}
	}
	return fmt.Errorf("%w: %s", ErrUnavailable, strings.Join(failures, "; "))
}

// agentFailed tells an agent that could not serve a request (unreachable, a broken connection, a
// 5xx, no leader) from an answer about the request itself.
func agentFailed(err error) bool {
	var urlErr *url.Error
	var netErr net.Error
	var srvErr *serverError
	var statusErr api.StatusError
	switch {
	case errors.As(err, &srvErr), errors.As(err, &urlErr), errors.As(err, &netErr):
		return true
	case errors.Is(err, errNoLeader), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return true
	case errors.As(err, &statusErr):
		return statusErr.Code >= 500
	}
	return false
}

// serverError is an agent's 5xx answer, turned into a transport error so that the api package
// reports it the same way for every endpoint (its transaction call hides the status code).
type serverError struct {
	status string
	body   string
}

func (e *serverError) Error() string {
	return fmt.Sprintf("server error %s: %q", e.status, e.body)
}

// aclFilterTransport tells filtered about every answer that Consul's ACLs cut short: Consul drops
// from a list what the token may not read (nodes, services, keys), with no error, and says so only
// in a header. An instance on a node the token may not read is then missing from its route.
type aclFilterTransport struct {
	base     http.RoundTripper
	filtered func(path string)
}

func (t aclFilterTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err == nil && resp.Header.Get("X-Consul-Results-Filtered-By-ACLs") == "true" {
		t.filtered(req.URL.Path)
	}
	return resp, err
}

// filteredLogEvery is how often an answer cut short by ACLs is logged, per endpoint: the watches
// read the same endpoints again after every change.
const filteredLogEvery = 10 * time.Minute

// filteredByACLs logs, at most once per filteredLogEvery and endpoint, that Consul's ACLs hid part
// of an answer from the proxy's token (CONSUL_HTTP_TOKEN).
func (c *Client) filteredByACLs(path string) {
	endpoint := endpointOf(path)
	now := time.Now()
	c.filteredMu.Lock()
	last, seen := c.filtered[endpoint]
	due := !seen || now.Sub(last) >= filteredLogEvery
	if due {
		c.filtered[endpoint] = now
	}
	c.filteredMu.Unlock()
	if !due {
		return
	}
	c.logger.Warn("consul: its ACLs hide part of an answer from the proxy's token; routes may miss instances or settings: grant the token node, service and key read (CONSUL_HTTP_TOKEN)",
		"endpoint", endpoint)
}

// endpointOf is a request path without the name a catalog or health endpoint takes
// (/v1/catalog/node-services/<node> is /v1/catalog/node-services/), so that it names few endpoints.
func endpointOf(path string) string {
	parts := strings.SplitN(path, "/", 5) // "", "v1", "catalog", "node-services", "<node>"
	if len(parts) == 5 && (parts[2] == "catalog" || parts[2] == "health") {
		return strings.Join(parts[:4], "/") + "/"
	}
	return path
}

type serverErrorTransport struct{ base http.RoundTripper }

func (t serverErrorTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.StatusCode < 500 {
		return resp, err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	_ = resp.Body.Close()
	return nil, &serverError{status: resp.Status, body: strings.TrimSpace(string(body))}
}
