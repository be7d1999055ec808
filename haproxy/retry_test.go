package haproxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// closingInstance accepts connections, reads a request's head and closes the connection without
// answering, as an instance does whose process stops while the request reaches it.
func closingInstance(t *testing.T) route.Instance {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				r := bufio.NewReader(c)
				for {
					l, err := r.ReadString('\n')
					if err != nil || l == "\r\n" {
						return
					}
				}
			}()
		}
	}()
	return route.Instance{Address: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port}
}

// One of a route's two instances closes every connection without answering. Without
// RetryEmptyResponse, the requests HAProxy sends it fail (502). With it, every GET and HEAD is
// sent again to the other instance and answered; a POST is never sent twice, and fails when it
// went to the closing instance.
func TestRetryEmptyResponse(t *testing.T) {
	for _, retry := range []bool{false, true} {
		t.Run(fmt.Sprintf("RetryEmptyResponse=%v", retry), func(t *testing.T) {
			s, p := runtimeSetup(t, 0, time.Hour)
			s.RetryEmptyResponse = retry
			be := newRoute("app", []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, "good")}, closingInstance(t)}, "/app")
			be.Route.SkipCheck = true // HAProxy's checks would take the closing instance out
			startForTest(ctxFor(t, 30*time.Second), t, p, Render(s, []route.Backend{be}))

			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			codes := func(method string, n int) map[int]int {
				out := map[int]int{}
				for range n {
					req, _ := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d/app", s.HTTPPort), strings.NewReader("x"))
					resp, err := c.Do(req)
					if err != nil {
						t.Fatalf("%s /app: %v", method, err)
					}
					resp.Body.Close()
					out[resp.StatusCode]++
				}
				return out
			}
			gets, heads, posts := codes(http.MethodGet, 10), codes(http.MethodHead, 4), codes(http.MethodPost, 4)
			t.Logf("GET %v, HEAD %v, POST %v", gets, heads, posts)
			if !retry {
				if gets[http.StatusBadGateway] == 0 {
					t.Fatalf("without retries no GET failed (%v): the closing instance got none", gets)
				}
				return
			}
			if gets[http.StatusOK] != 10 || heads[http.StatusOK] != 4 {
				t.Fatalf("GET answered %v and HEAD %v, want every one 200", gets, heads)
			}
			if posts[http.StatusBadGateway] == 0 {
				t.Fatalf("POST answered %v: a POST was sent again after the instance closed its connection", posts)
			}
		})
	}
}
