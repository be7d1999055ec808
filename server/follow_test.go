package server

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestNewInstanceIsServedWithoutAnyCall(t *testing.T) {
	e := newEnv(t)
	for _, n := range []string{"books-1", "books-2", "books-3"} {
		e.backend("books-ms", n)
	}
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	if got := backendsReached(t, p.http+"/api/v1/books", 9); len(got) != 3 {
		t.Fatalf("reached %v, want three instances", got)
	}
	e.backend("books-ms", "books-4")
	eventually(t, 5*time.Second, "the fourth instance receives traffic with no API call", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] > 0
	})
	e.consul.DeregisterService("books-4")
	eventually(t, 5*time.Second, "the deregistered instance receives no more traffic", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] == 0
	})
}

func TestReplicasConvergeWithinASecond(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	first := e.startProxy("docker-flow")
	second := e.startProxy("docker-flow")
	first.reconfigure(t, booksQuery)
	start := time.Now()
	eventually(t, time.Second, "the second replica routes the path", func() bool {
		code, _, err := tryGet(httpClient, second.http+"/api/v1/books", nil)
		return err == nil && code == http.StatusOK
	})
	t.Logf("the second replica served the route %s after the reconfigure answered", time.Since(start).Round(time.Millisecond))

	code, r := second.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms")
	if code != http.StatusOK {
		t.Fatalf("remove on the second: %d %+v", code, r)
	}
	eventually(t, time.Second, "the first replica stops routing the path", func() bool {
		code, _, err := tryGet(httpClient, first.http+"/api/v1/books", nil)
		return err == nil && code == http.StatusServiceUnavailable
	})
	if strings.Contains(first.config(t), "books-ms") {
		t.Fatal("the first replica's config still holds books-ms")
	}
}
