package server

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Two replicas that write the same route at the same moment end in one state: the route in KV,
// served by both.
func TestReplicasWritingOneRouteAtOnceConverge(t *testing.T) {
	e := newEnv(t)
	e.backend("race", "race-1")
	first := e.startProxy("docker-flow")
	second := e.startProxy("docker-flow")
	for i := 0; i < 10; i++ {
		var wg sync.WaitGroup
		for _, p := range []struct {
			r    *running
			path string
		}{{first, fmt.Sprintf("/first-%d", i)}, {second, fmt.Sprintf("/second-%d", i)}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, r := p.r.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=race&servicePath="+p.path)
				if code != http.StatusOK {
					t.Errorf("reconfigure %s: %d %+v", p.path, code, r)
				}
			}()
		}
		wg.Wait()
		var inKV string
		eventually(t, 5*time.Second, "both replicas serve the path that KV holds", func() bool {
			inKV, _ = e.kvGet("docker-flow/race/path")
			line := "acl url_race path_beg -- " + inKV + "\n"
			return strings.Contains(first.config(t), line) && strings.Contains(second.config(t), line)
		})
		for _, p := range []*running{first, second} {
			if code, body := get(t, p.http+inKV, nil); code != http.StatusOK || !strings.HasPrefix(body, "race-1 ") {
				t.Fatalf("round %d: GET %s: %d %q", i, inKV, code, body)
			}
		}
	}
}
