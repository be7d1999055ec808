package consul

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// register puts a service registration on the agent API as JSON, untouched by any client library.
func register(t *testing.T, agent *testenv.Consul, reg map[string]any) {
	t.Helper()
	body, err := json.Marshal(reg)
	if err != nil {
		t.Fatal(err)
	}
	agent.Put("/v1/agent/service/register", string(body))
}

// waitInstances waits until the catalog (which the agent syncs to in the background) lists n
// instances of service under filter, and returns them.
func waitInstances(t *testing.T, c *Client, service string, filter HealthFilter, n int) []route.Instance {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, err := c.Instances(context.Background(), service, filter)
		if err != nil {
			t.Fatalf("Instances(%s, %s): %v", service, filter, err)
		}
		if len(got) == n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("Instances(%s, %s) = %v, want %d instances", service, filter, got, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func inst(addr string, port int) route.Instance { return route.Instance{Address: addr, Port: port} }

func TestInstances(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, logs := newClient(t, agent.Addr)
	ctx := testContext(t)

	t.Run("sorted by address and port, without duplicates", func(t *testing.T) {
		agent.RegisterService("go-demo", "go-demo-1", "10.0.0.3", 8080)
		agent.RegisterService("go-demo", "go-demo-2", "10.0.0.1", 9090)
		agent.RegisterService("go-demo", "go-demo-3", "10.0.0.1", 8080)
		agent.RegisterService("go-demo", "go-demo-3-again", "10.0.0.1", 8080)
		agent.RegisterService("go-demo", "go-demo-4", "", 7070) // the node's address
		waitInstances(t, c, "go-demo", HealthAny, 4)
		got, err := c.Instances(ctx, "go-demo", HealthPassing)
		if err != nil {
			t.Fatal(err)
		}
		want := []route.Instance{inst("10.0.0.1", 8080), inst("10.0.0.1", 9090), inst("10.0.0.3", 8080), inst("127.0.0.1", 7070)}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Instances = %v, want %v", got, want)
		}
	})

	t.Run("host names and IPv6", func(t *testing.T) {
		agent.RegisterService("hosts", "hosts-1", "go-demo_main.example", 8080)
		agent.RegisterService("hosts", "hosts-2", "2001:db8::0:1", 8080)
		got := waitInstances(t, c, "hosts", HealthPassing, 2)
		want := []route.Instance{inst("2001:db8::1", 8080), inst("go-demo_main.example", 8080)}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Instances = %v, want %v", got, want)
		}
		if hp := got[0].HostPort(); hp != "[2001:db8::1]:8080" {
			t.Errorf("HostPort = %q", hp)
		}
	})

	t.Run("health filters", func(t *testing.T) {
		for id, status := range map[string]string{"health-1": "passing", "health-2": "critical", "health-3": "warning"} {
			register(t, agent, map[string]any{
				"ID": id, "Name": "health", "Address": "10.0.1." + id[len(id)-1:], "Port": 80,
				"Check": map[string]any{"TTL": "30s", "Status": status},
			})
		}
		waitInstances(t, c, "health", HealthAny, 3)
		for filter, want := range map[HealthFilter][]route.Instance{
			HealthPassing: {inst("10.0.1.1", 80)},
			"":            {inst("10.0.1.1", 80)},
			HealthWarning: {inst("10.0.1.1", 80), inst("10.0.1.3", 80)},
			HealthAny:     {inst("10.0.1.1", 80), inst("10.0.1.2", 80), inst("10.0.1.3", 80)},
		} {
			got, err := c.Instances(ctx, "health", filter)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Instances(%q) = %v, want %v", filter, got, want)
			}
		}
		if _, err := c.Instances(ctx, "health", "healthy"); err == nil {
			t.Error("Instances with an unknown filter: no error")
		}
	})

	t.Run("invalid addresses and ports are skipped and logged", func(t *testing.T) {
		for _, reg := range []map[string]any{
			{"ID": "inject-1", "Address": "10.0.2.1\n    server evil 192.0.2.66:80", "Port": 80},
			{"ID": "inject-2", "Address": "10.0.2.2 backup", "Port": 80},
			{"ID": "inject-3", "Address": "evil#comment", "Port": 80},
			{"ID": "inject-4", "Address": "fe80::1%eth0", "Port": 80},
			{"ID": "inject-5", "Address": "10.0.2.5", "Port": 0},
			{"ID": "inject-6", "Address": "10.0.2.6", "Port": 80},
		} {
			reg["Name"] = "inject"
			register(t, agent, reg)
		}
		deadline := time.Now().Add(15 * time.Second)
		for !strings.Contains(logs.String(), "inject-5") && time.Now().Before(deadline) {
			if _, err := c.Instances(ctx, "inject", HealthAny); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		got, err := c.Instances(ctx, "inject", HealthAny)
		if err != nil {
			t.Fatal(err)
		}
		if want := []route.Instance{inst("10.0.2.6", 80)}; !reflect.DeepEqual(got, want) {
			t.Errorf("Instances = %v, want %v", got, want)
		}
		for _, id := range []string{"inject-1", "inject-2", "inject-3", "inject-4", "inject-5"} {
			if !strings.Contains(logs.String(), "id="+id) {
				t.Errorf("skipped instance %s is not logged:\n%s", id, logs)
			}
		}
	})

	t.Run("unknown service", func(t *testing.T) {
		got, err := c.Instances(ctx, "no-such-service", HealthAny)
		if err != nil || got == nil || len(got) != 0 {
			t.Errorf("Instances = %#v, %v; want an empty list", got, err)
		}
	})

	t.Run("invalid service name", func(t *testing.T) {
		for _, name := range []string{"", "a/b", "..", "a b"} {
			var pe *route.ParamError
			if _, err := c.Instances(ctx, name, HealthAny); !errors.As(err, &pe) {
				t.Errorf("Instances(%q) = %v, want a ParamError", name, err)
			}
		}
	})

	t.Run("canceled context", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err := c.Instances(cctx, "go-demo", HealthAny)
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnavailable) {
			t.Errorf("Instances with a canceled context: %v, want context.Canceled", err)
		}
	})
}

func TestParseHealthFilter(t *testing.T) {
	for in, want := range map[string]HealthFilter{"": HealthPassing, "passing": HealthPassing, " Warning ": HealthWarning, "ANY": HealthAny} {
		if got, err := ParseHealthFilter(in); err != nil || got != want {
			t.Errorf("ParseHealthFilter(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"critical", "all", "passing,warning"} {
		if _, err := ParseHealthFilter(in); err == nil {
			t.Errorf("ParseHealthFilter(%q): no error", in)
		}
	}
}

func TestValidHost(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1":             "10.0.0.1",
		"2001:DB8:0::1":        "2001:db8::1",
		"::ffff:10.0.0.1":      "::ffff:10.0.0.1",
		"go-demo":              "go-demo",
		"go-demo_main.example": "go-demo_main.example",
		"a.b-c.d1":             "a.b-c.d1",
		"1e100.net":            "1e100.net",
	} {
		if got, ok := validHost(in); !ok || got != want {
			t.Errorf("validHost(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
	for _, in := range []string{
		"", " ", "10.0.0.1 ", "10.0.0.1\n", "a b", "a#b", "a$b", "a\"b", "a/b", "a:b:c:z", "-a", "a-", "a..b",
		".a", "a.", "010.0.0.1", "10.0.0.256", "1.2.3", "fe80::1%eth0", "[::1]", "10.0.0.1:80", "é.example",
		strings.Repeat("a", 64) + ".example", strings.Repeat("abc.", 64) + "com",
	} {
		if got, ok := validHost(in); ok {
			t.Errorf("validHost(%q) = %q, accepted", in, got)
		}
	}
}
