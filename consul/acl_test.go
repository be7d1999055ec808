package consul

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// A token that may not read every node gets lists without them from Consul, with no error: the
// client logs it, naming the endpoint, once however often it reads that endpoint.
func TestAnswersCutShortByACLsAreLogged(t *testing.T) {
	c := testenv.StartConsulACL(t)
	admin, err := api.NewClient(&api.Config{Address: c.Addr, Token: testenv.ManagementToken})
	if err != nil {
		t.Fatal(err)
	}
	policy, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{Name: "proxy", Rules: `
		key_prefix "" { policy = "write" }
		service_prefix "" { policy = "read" }
		node "visible-node" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	token, _, err := admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, node := range []string{"visible-node", "hidden-node"} {
		_, err := admin.Catalog().Register(&api.CatalogRegistration{Node: node, Address: "127.0.0.1", SkipNodeUpdate: true,
			Service: &api.AgentService{ID: "books-" + node, Service: "books-ms", Address: "127.0.0.1", Port: 9001 + i}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}

	t.Setenv("CONSUL_HTTP_TOKEN", token.SecretID)
	logs := &testenv.LogBuffer{}
	client, err := New([]string{c.Addr}, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 3 {
		inst, err := client.Instances(ctx, "books-ms", HealthAny)
		if err != nil {
			t.Fatal(err)
		}
		if len(inst) != 1 || inst[0].Port != 9001 {
			t.Fatalf("instances seen through the token: %+v, want the one on visible-node", inst)
		}
	}
	out := logs.String()
	if n := strings.Count(out, "ACLs hide part of an answer"); n != 1 || !strings.Contains(out, "endpoint=/v1/health/service/") {
		t.Fatalf("the filtered answers were logged %d times, want once naming /v1/health/service/:\n%s", n, out)
	}

	// A token that may read every node sees both, and nothing is logged.
	t.Setenv("CONSUL_HTTP_TOKEN", testenv.ManagementToken)
	logs = &testenv.LogBuffer{}
	client, err = New([]string{c.Addr}, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if inst, err := client.Instances(ctx, "books-ms", HealthAny); err != nil || len(inst) != 2 {
		t.Fatalf("instances seen through the management token: %+v %v, want both", inst, err)
	}
	if strings.Contains(logs.String(), "ACLs hide") {
		t.Fatalf("an answer that ACLs did not cut short was logged as one:\n%s", logs.String())
	}
}

func TestEndpointOf(t *testing.T) {
	for path, want := range map[string]string{
		"/v1/catalog/node-services/host-1": "/v1/catalog/node-services/",
		"/v1/health/service/books-ms":      "/v1/health/service/",
		"/v1/health/state/any":             "/v1/health/state/",
		"/v1/catalog/nodes":                "/v1/catalog/nodes",
		"/v1/kv/docker-flow/":              "/v1/kv/docker-flow/",
	} {
		if got := endpointOf(path); got != want {
			t.Errorf("endpointOf(%q) = %q, want %q", path, got, want)
		}
	}
}
