package server

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// An instance stops (as a container that docker-compose scale takes away) while requests flow,
// and the catalog drops it only 300 ms later (as the registrar does once the engine reports the
// container's death). Its connections are refused meanwhile, and HAProxy's health checks (every
// 2 s, three failures) have not seen it yet: HAProxy tries each refused connection again at once
// on another instance, and no request fails for it (without `option redispatch` such requests
// waited some 3 s and got a 503). One loss is left, and counted apart: a connection that the
// kernel had accepted for the instance just before it closed its port is reset after HAProxy sent
// the request on it (a 502, which HAProxy does not retry without retry-on empty-response): at most
// the requests in flight at that instant; none with --retry-empty-response.
func TestInstanceThatStopsCostsNoRequest(t *testing.T) {
	t.Run("default", func(t *testing.T) { testInstanceThatStops(t, false) })
	t.Run("RetryEmptyResponse", func(t *testing.T) { testInstanceThatStops(t, true) })
}

func testInstanceThatStops(t *testing.T, retryEmpty bool) {
	e := newEnv(t)
	var stopping *http.Server
	for _, n := range []string{"books-1", "books-2", "books-3"} {
		srv := e.backend("books-ms", n)
		if n == "books-2" {
			stopping = srv.Config
		}
	}
	p := e.startProxyWith("docker-flow", func(c *Config) { c.RetryEmptyResponse = retryEmpty })
	p.reconfigure(t, booksQuery)
	if got := backendsReached(t, p.http+"/api/v1/books", 9); len(got) != 3 {
		t.Fatalf("reached %v, want three instances", got)
	}

	// Four clients, new connections (as curl), for 2 s at most and 20,000 requests in all.
	const clients = 4
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var sent, failed, reset atomic.Int64
	var mu sync.Mutex
	var failures []string
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for ctx.Err() == nil && sent.Add(1) <= 20000 {
				code, body, err := tryGet(httpClient, p.http+"/api/v1/books", nil)
				if err == nil && code == http.StatusBadGateway && strings.Contains(body, "invalid or incomplete response") {
					reset.Add(1)
					continue
				}
				if err != nil || code != http.StatusOK {
					failed.Add(1)
					mu.Lock()
					if len(failures) < 5 {
						failures = append(failures, fmt.Sprintf("%d %q %v", code, strings.TrimSpace(body), err))
					}
					mu.Unlock()
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := stopping.Shutdown(sctx); err != nil { // in-flight requests end, then the port is closed
		t.Errorf("stopping books-2: %v", err)
	}
	scancel()
	time.Sleep(300 * time.Millisecond)
	e.consul.DeregisterService("books-2")
	wg.Wait()

	if n := sent.Load(); n < 100 {
		t.Fatalf("only %d requests were sent", n)
	}
	if f := failed.Load(); f > 0 {
		t.Fatalf("%d of %d requests failed while an instance stopped before the catalog dropped it; the first: %v", f, sent.Load(), failures)
	}
	if r := reset.Load(); retryEmpty && r > 0 {
		t.Fatalf("%d of %d requests were sent on connections the stopping instance reset, and not sent again", r, sent.Load())
	} else if r > clients {
		t.Fatalf("%d of %d requests were sent on connections the stopping instance reset: more than the %d in flight when it closed its port", r, sent.Load(), clients)
	}
	if got := backendsReached(t, p.http+"/api/v1/books", 6); got["books-2"] > 0 || len(got) != 2 {
		t.Fatalf("after the catalog dropped books-2 the requests reached %v", got)
	}
	t.Logf("%d requests: none refused, %d sent on a connection the stopping instance reset", sent.Load(), reset.Load())
}
