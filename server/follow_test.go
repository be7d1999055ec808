package server

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
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
	before := reloads(t, p)
	e.backend("books-ms", "books-4")
	eventually(t, 5*time.Second, "the fourth instance receives traffic with no API call", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] > 0
	})
	if r := reloads(t, p); r != before {
		t.Fatalf("adding an instance reloaded HAProxy %d times; the runtime API should have done it", r-before)
	}
	e.consul.DeregisterService("books-4")
	eventually(t, 5*time.Second, "the deregistered instance receives no more traffic", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] == 0
	})
	if r := reloads(t, p); r != before {
		t.Fatalf("removing an instance reloaded HAProxy %d times", r-before)
	}
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

// waitServers waits until the served config holds n server lines (bounded).
func (p *running) waitServers(t *testing.T, n int) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("%d servers in the config", n), func() bool {
		return strings.Count(p.config(t), "    server ") == n
	})
}

func TestScalingUnderLoadLosesNoRequest(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	// Four more instances, running all along; scaling registers and deregisters them.
	for i := 2; i <= 5; i++ {
		e.backend("books-ms", fmt.Sprintf("books-%d", i))
		e.consul.DeregisterService(fmt.Sprintf("books-%d", i))
	}
	p.waitServers(t, 1)

	stop := make(chan struct{})
	done := make(chan [2]int64)
	var firstErr error
	go func() {
		sent, failed, err := load(p.http+"/api/v1/books", stop, 120*time.Second, 2_000_000)
		firstErr = err
		done <- [2]int64{sent, failed}
	}()
	for round := 0; round < 10; round++ {
		for i := 2; i <= 5; i++ {
			port := e.portOf(fmt.Sprintf("books-%d", i))
			e.consul.RegisterService("books-ms", fmt.Sprintf("books-%d", i), "127.0.0.1", port)
		}
		p.waitServers(t, 5)
		for i := 2; i <= 5; i++ {
			e.consul.DeregisterService(fmt.Sprintf("books-%d", i))
		}
		p.waitServers(t, 1)
	}
	close(stop)
	res := <-done
	if res[1] != 0 {
		t.Fatalf("%d of %d requests failed while scaling 1 to 5 to 1 ten times; first: %v", res[1], res[0], firstErr)
	}
	t.Logf("%d requests, none failed, while scaling 1 to 5 to 1 ten times", res[0])
}

func TestConsulOutageUnderLoadLosesNoRequest(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20 s outage")
	}
	e := newPersistentEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)

	stop := make(chan struct{})
	done := make(chan [2]int64)
	var firstErr error
	go func() {
		sent, failed, err := load(p.http+"/api/v1/books", stop, 120*time.Second, 5_000_000)
		firstErr = err
		done <- [2]int64{sent, failed}
	}()
	e.consul.Stop()
	time.Sleep(2 * time.Second)
	code, body := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "since") {
		t.Errorf("health during the outage: %d %s; want 503 saying since when", code, body)
	}
	time.Sleep(18 * time.Second)
	e.consul.Start()
	registered := time.Now()
	e.backend("books-ms", "books-2") // a new instance, registered once Consul is back
	// How long Consul itself takes to list it is logged apart from the proxy's part.
	api, err := capi.NewClient(&capi.Config{Address: e.consul.Addr})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "Consul's catalog lists the new instance", func() bool {
		entries, _, err := api.Health().Service("books-ms", "", true, nil)
		return err == nil && len(entries) == 2
	})
	listed := time.Now()
	eventually(t, 5*time.Second-time.Since(registered), "the new instance is served within 5 s of its registration", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 6)["books-2"] > 0
	})
	t.Logf("Consul listed the new instance %s after its registration; the proxy served it %s later",
		listed.Sub(registered).Round(time.Millisecond), time.Since(listed).Round(time.Millisecond))
	close(stop)
	res := <-done
	if res[1] != 0 {
		t.Fatalf("%d of %d requests failed during a 20 s Consul outage; first: %v", res[1], res[0], firstErr)
	}
}
