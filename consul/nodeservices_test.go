package consul

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// nodeServicesBody is an answer of /v1/catalog/node-services/<node> with n services, in the shape
// Consul v1.22 gives it (indented, every field of a service).
func nodeServicesBody(n int) []byte {
	var b strings.Builder
	b.WriteString(`{
    "Node": {"ID": "", "Node": "bench-node-0", "Address": "10.0.0.9", "Datacenter": "dc1",
        "TaggedAddresses": null, "Meta": null, "CreateIndex": 18, "ModifyIndex": 18},
    "Services": [`)
	for i := range n {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `
        {
            "ID": "svc-%05d-0",
            "Service": "svc-%05d",
            "Tags": ["v1", "blue"],
            "Address": "10.0.1.%d",
            "Meta": {"version": "1.2.%d"},
            "Port": %d,
            "Weights": {
                "Passing": 1,
                "Warning": 1
            },
            "EnableTagOverride": false,
            "Proxy": {
                "Mode": "",
                "MeshGateway": {},
                "Expose": {}
            },
            "Connect": {},
            "PeerName": "",
            "CreateIndex": %d,
            "ModifyIndex": %d
        }`, n-i, n-i, i%250, i, 32768+i, 20+i, 20+i)
	}
	b.WriteString("\n    ]\n}")
	return []byte(b.String())
}

// The services decoded from the fields the proxy uses are those of the API's full type.
func TestNodeServiceListDecodesAsTheAPIType(t *testing.T) {
	body := nodeServicesBody(50)
	var lean nodeServiceList
	if err := json.Unmarshal(body, &lean); err != nil {
		t.Fatal(err)
	}
	var full *api.CatalogNodeServiceList
	if err := json.Unmarshal(body, &full); err != nil {
		t.Fatal(err)
	}
	got := lean.state()
	if got.address != "10.0.0.9" || len(got.services) != 50 {
		t.Fatalf("decoded node %q with %d services, want 10.0.0.9 with 50", got.address, len(got.services))
	}
	for i, s := range got.services {
		if i > 0 && got.services[i-1].ID >= s.ID {
			t.Fatalf("services not sorted by ID: %q before %q", got.services[i-1].ID, s.ID)
		}
	}
	want := map[string]serviceState{}
	for _, s := range full.Services {
		want[s.ID] = serviceState{ID: s.ID, Name: s.Service, Address: s.Address, Port: s.Port}
	}
	for _, s := range got.services {
		if want[s.ID] != s {
			t.Fatalf("service %s decoded as %+v, the API type says %+v", s.ID, s, want[s.ID])
		}
	}
	var none nodeServiceList // a node Consul does not know: null
	if err := json.Unmarshal([]byte("null"), &none); err != nil || none.state().services != nil {
		t.Fatalf("an unknown node: %+v, %v", none.state(), err)
	}
}

// The decode of a node of 200 services (the bench harness's nodes): the fields used, against the
// API's full type.
func BenchmarkDecodeNodeServices(b *testing.B) {
	body := nodeServicesBody(200)
	b.Run("used-fields", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			var l nodeServiceList
			if err := json.Unmarshal(body, &l); err != nil {
				b.Fatal(err)
			}
			_ = l.state()
		}
	})
	b.Run("api-type", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			var l *api.CatalogNodeServiceList
			if err := json.Unmarshal(body, &l); err != nil {
				b.Fatal(err)
			}
		}
	})
}
