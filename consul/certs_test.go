package consul

import (
	"reflect"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

func TestCertStore(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	certs := NewCertStore(c, "docker-flow")
	routes := NewStore(c, "docker-flow")
	if certs.Prefix() != "docker-flow-certs" {
		t.Fatalf("prefix %q", certs.Prefix())
	}

	if got, skipped, err := certs.List(ctx); err != nil || len(got) != 0 || len(skipped) != 0 {
		t.Fatalf("List of an empty store: %v %v %v", got, skipped, err)
	}
	if err := certs.Put(ctx, "a.example.com.pem", []byte("PEM A")); err != nil {
		t.Fatal(err)
	}
	if err := certs.Put(ctx, "b.pem", []byte("PEM B")); err != nil {
		t.Fatal(err)
	}
	// One readable key per file, beside the route table and never inside it.
	if v, ok := rawKV(t, c, "docker-flow-certs/a.example.com.pem"); !ok || v != "PEM A" {
		t.Fatalf("key docker-flow-certs/a.example.com.pem = %q, %v", v, ok)
	}
	if rs := mustList(t, routes); len(rs) != 0 {
		t.Fatalf("certificates read as routes: %v", names(rs))
	}
	putRawKV(t, c, "docker-flow-certs/deeper/x.pem", "x")
	putRawKV(t, c, "docker-flow-certs/no-suffix", "x")
	got, skipped, err := certs.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"a.example.com.pem": []byte("PEM A"), "b.pem": []byte("PEM B")}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("List: %q, want %q", got, want)
	}
	if !reflect.DeepEqual(skipped, []string{"docker-flow-certs/deeper/x.pem", "docker-flow-certs/no-suffix"}) {
		t.Fatalf("skipped %v", skipped)
	}
	if v, ok, err := certs.Get(ctx, "b.pem"); err != nil || !ok || string(v) != "PEM B" {
		t.Fatalf("Get b.pem: %q %v %v", v, ok, err)
	}
	if err := certs.Delete(ctx, "b.pem"); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := certs.Get(ctx, "b.pem"); err != nil || ok {
		t.Fatalf("Get after Delete: %v %v", ok, err)
	}
	// Another instance name shares nothing.
	if other, _, err := NewCertStore(c, "other").List(ctx); err != nil || len(other) != 0 {
		t.Fatalf("other instance: %v %v", other, err)
	}
	// Names that are not file names never reach KV.
	for _, bad := range []string{"", "../x.pem", "a/b.pem", "x", ".hidden.pem", "a b.pem"} {
		if err := certs.Put(ctx, bad, []byte("x")); err == nil {
			t.Errorf("Put %q: no error", bad)
		}
	}
}
