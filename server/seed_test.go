package server

import (
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// A new replica reads the route table and the catalog once, as it loads them: its watches of
// Consul start from those reads (blocking queries only, from their indexes), and still see what
// changes afterwards.
func TestANewReplicaReadsConsulOnce(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	e.backend("go-demo", "demo-1")
	first := e.startProxy("docker-flow")
	first.reconfigure(t, booksQuery)
	first.reconfigure(t, "serviceName=go-demo&servicePath=/demo")

	front := testenv.StartConsulFront(t, e.consul)
	second := e.startProxyWith("docker-flow", func(c *Config) { c.ConsulAddresses = []string{front.Addr} })
	if got := backendsReached(t, second.http+"/api/v1/books", 4); got["books-1"] != 4 {
		t.Fatalf("the new replica's route reached %v, want books-1 4 times", got)
	}
	time.Sleep(time.Second) // the watches run their first queries
	reads := front.Take()
	// Paths read whole (no index): once by the load; the watches' queries block.
	whole := map[string]int{}
	for _, r := range reads {
		if !r.Blocking() {
			whole[r.Path]++
		}
	}
	for _, path := range []string{"/v1/kv/docker-flow/", "/v1/catalog/nodes", "/v1/catalog/node-services/" + testenv.ConsulNode} {
		if whole[path] != 1 {
			t.Errorf("the new replica read %s whole %d times, want once (its load); reads: %v", path, whole[path], reads)
		}
	}

	e.backend("books-ms", "books-2")
	eventually(t, 5*time.Second, "the new replica sends traffic to an instance registered after its start", func() bool {
		return backendsReached(t, second.http+"/api/v1/books", 8)["books-2"] > 0
	})
}
