package proxy

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// What a watch of Consul observes is applied to HAProxy and never written back to KV; an
// observation that changes nothing causes no reload.
func TestObservedChangesReachHAProxyOnly(t *testing.T) {
	c := testenv.StartConsul(t)
	c.RegisterService("books-ms", "b1", "127.0.0.1", 9001)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := consul.NewStore(client, "docker-flow")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, hap := startController(ctx, t, client, store)
	books := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	if _, err := p.Reconfigure(ctx, books); err != nil {
		t.Fatal(err)
	}
	api, _ := capi.NewClient(&capi.Config{Address: c.Addr})
	kvIndex := func() uint64 {
		_, meta, err := api.KV().List("docker-flow/", nil)
		if err != nil {
			t.Fatal(err)
		}
		return meta.LastIndex
	}
	reloads := func() int {
		info, err := hap.ShowProc(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.Reloads
	}
	kvBefore := kvIndex()

	two := []route.Instance{{Address: "127.0.0.1", Port: 9001}, {Address: "127.0.0.1", Port: 9002}}
	if err := p.UpdateInstances(ctx, "books-ms", two); err != nil {
		t.Fatal(err)
	}
	if served := string(hap.Config()); strings.Count(served, "    server ") != 2 {
		t.Fatalf("after two instances were observed HAProxy serves:\n%s", served)
	}
	r := reloads()
	if err := p.UpdateInstances(ctx, "books-ms", two); err != nil {
		t.Fatal(err)
	}
	if err := p.UpdateInstances(ctx, "not-routed", two); err != nil {
		t.Fatal(err)
	}
	if reloads() != r {
		t.Fatal("observing the same instances, or those of a service no route uses, reloaded HAProxy")
	}

	if kvIndex() != kvBefore {
		t.Fatal("observed instances were written back to KV")
	}

	// Another replica replaces books-ms by other in KV.
	other := route.Route{ServiceName: "other", ServicePath: []string{"/other"}, PathType: route.PathBeg}
	if err := store.Put(ctx, other); err != nil {
		t.Fatal(err)
	}
	if err := store.Delete(ctx, "books-ms"); err != nil {
		t.Fatal(err)
	}
	kvAfterOthers := kvIndex()
	if err := p.SyncFromKV(ctx); err != nil {
		t.Fatal(err)
	}
	served := string(hap.Config())
	if !strings.Contains(served, "backend other-be") || strings.Contains(served, "books-ms") {
		t.Fatalf("after KV changed HAProxy serves:\n%s", served)
	}
	if kvIndex() != kvAfterOthers {
		t.Fatal("syncing from KV wrote to KV")
	}
	r = reloads()
	if err := p.SyncFromKV(ctx); err != nil {
		t.Fatal(err)
	}
	if reloads() != r {
		t.Fatal("syncing an unchanged route table reloaded HAProxy")
	}
}

// listCounter is the real store, counting reads of the whole route table.
type listCounter struct {
	*consul.Store
	lists atomic.Int32
}

func (l *listCounter) List(ctx context.Context) ([]route.Route, []error, error) {
	l.lists.Add(1)
	return l.Store.List(ctx)
}

// A watch that reports the table served (this replica's own write) costs no read of KV; a table
// that differs is read again from KV and served.
func TestSyncFromKVSeenReadsKVOnlyWhenTheTableDiffers(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := &listCounter{Store: consul.NewStore(client, "docker-flow")}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, hap := startController(ctx, t, client, store)
	books := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	if _, err := p.Reconfigure(ctx, books); err != nil {
		t.Fatal(err)
	}
	read, _, err := store.Store.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := store.lists.Load()
	if err := p.SyncFromKVSeen(ctx, read); err != nil {
		t.Fatal(err)
	}
	if n := store.lists.Load() - before; n != 0 {
		t.Fatalf("the table served, seen by a watch, was read %d times from KV", n)
	}

	// Another replica adds a route: the table seen differs, KV is read and the route served.
	other := route.Route{ServiceName: "other", ServicePath: []string{"/other"}, PathType: route.PathBeg}
	if err := store.Put(ctx, other); err != nil {
		t.Fatal(err)
	}
	if err := p.SyncFromKVSeen(ctx, []route.Route{books, other}); err != nil {
		t.Fatal(err)
	}
	if n := store.lists.Load() - before; n != 1 {
		t.Fatalf("a table that differs was read %d times from KV, want 1", n)
	}
	if served := string(hap.Config()); !strings.Contains(served, "backend other-be") {
		t.Fatalf("after another replica's write HAProxy serves:\n%s", served)
	}
	// An empty table seen while routes are served: read again too (it may be older than them).
	if err := p.SyncFromKVSeen(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if n := store.lists.Load() - before; n != 2 {
		t.Fatalf("an empty table seen was read %d times from KV, want 2", n)
	}
	if served := string(hap.Config()); !strings.Contains(served, "backend books-ms-be") {
		t.Fatalf("an older empty table removed routes:\n%s", served)
	}
}

// startController loads the route table of store into a controller and starts its HAProxy on a
// free port of 127.0.0.1 (stopped when the test ends).
func startController(ctx context.Context, t *testing.T, client *consul.Client, store Store) (*Proxy, *haproxy.Process) {
	t.Helper()
	hap := haproxy.NewProcess(haproxy.Options{Binary: testenv.HAProxyBin(t), Dir: t.TempDir()})
	s := haproxy.DefaultSettings()
	s.BindAddress, s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	p := New(catalogOf(client), store, hap, s, nil)
	cfg, err := p.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := hap.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hap.Stop(context.Background()) })
	return p, hap
}
