package testenv

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// ConsulFront is a reverse proxy on 127.0.0.1 in front of a Consul agent that records every read
// (GET) sent through it, so that a test can tell which reads a client made.
type ConsulFront struct {
	Addr string // host:port to give the client instead of the agent's

	mu    sync.Mutex
	reads []ConsulRead
}

// ConsulRead is one GET sent through a ConsulFront.
type ConsulRead struct {
	Path  string
	Index string // the query's index parameter: empty for a read that does not block
}

// String is "path?index=N", or the path of a read that does not block.
func (r ConsulRead) String() string {
	if r.Index == "" {
		return r.Path
	}
	return r.Path + "?index=" + r.Index
}

// Blocking reports whether the read is a blocking query (it waits from a non-zero index).
func (r ConsulRead) Blocking() bool { return r.Index != "" && r.Index != "0" }

// Under reports whether the read is of path or of a path under it (path ends with "/").
func (r ConsulRead) Under(path string) bool {
	return r.Path == path || strings.HasSuffix(path, "/") && strings.HasPrefix(r.Path, path)
}

// StartConsulFront starts a front for agent, closed when the test ends.
func StartConsulFront(t testing.TB, agent *Consul) *ConsulFront {
	t.Helper()
	target, err := url.Parse(agent.URL())
	if err != nil {
		t.Fatal(err)
	}
	f := &ConsulFront{}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ErrorLog = log.New(io.Discard, "", 0) // clients cancel their blocking queries when they stop
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			f.mu.Lock()
			f.reads = append(f.reads, ConsulRead{Path: r.URL.Path, Index: r.URL.Query().Get("index")})
			f.mu.Unlock()
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	f.Addr = srv.Listener.Addr().String()
	return f
}

// Take returns the reads recorded since the last call, in the order they came.
func (f *ConsulFront) Take() []ConsulRead {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.reads
	f.reads = nil
	return out
}
