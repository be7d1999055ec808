package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
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

// readCounter is the real store, counting reads of the whole route table and of some folders.
type readCounter struct {
	*consul.Store
	tables, folders atomic.Int32
	lastFolders     atomic.Value // []string
}

func (r *readCounter) Table(ctx context.Context) (route.KVTable, error) {
	r.tables.Add(1)
	return r.Store.Table(ctx)
}

func (r *readCounter) Folders(ctx context.Context, services []string) (route.KVTable, error) {
	r.folders.Add(1)
	r.lastFolders.Store(slices.Clone(services))
	return r.Store.Folders(ctx, services)
}

// A watch's news of KV is read folder by folder: the folders this replica wrote cost no read, a
// folder another replica wrote or deleted is read alone and served, a snapshot older than this
// replica's own write changes nothing, and many folders changed at once are read as one table.
func TestSyncFromKVSeenReadsOnlyTheFoldersThatChanged(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := &readCounter{Store: consul.NewStore(client, "docker-flow")}
	other := consul.NewStore(client, "docker-flow") // another replica's
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, hap := startController(ctx, t, client, store)
	// seen is what a watch sees: the folders' versions, at the index of the prefix.
	seen := func() (map[string]route.KVVersion, uint64) {
		t.Helper()
		table, err := store.Store.Table(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, meta, err := client.API().KV().List("docker-flow/", nil)
		if err != nil {
			t.Fatal(err)
		}
		return table.Versions, meta.LastIndex
	}
	sync := func(versions map[string]route.KVVersion, index uint64) (tables, folders int32) {
		t.Helper()
		t0, f0 := store.tables.Load(), store.folders.Load()
		if err := p.SyncFromKVSeen(ctx, versions, index); err != nil {
			t.Fatal(err)
		}
		return store.tables.Load() - t0, store.folders.Load() - f0
	}
	serves := func(backend string) bool { return strings.Contains(string(hap.Config()), "backend "+backend+"\n") }

	books := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	if _, err := p.Reconfigure(ctx, books); err != nil {
		t.Fatal(err)
	}
	before, beforeIndex := seen()
	if tables, folders := sync(before, beforeIndex); tables+folders != 0 {
		t.Fatalf("this replica's own write, seen by a watch, cost %d table and %d folder reads", tables, folders)
	}

	// Another replica adds a route: that folder alone is read, and served.
	if err := other.Put(ctx, route.Route{ServiceName: "other", ServicePath: []string{"/other"}, PathType: route.PathBeg}); err != nil {
		t.Fatal(err)
	}
	if tables, folders := sync(seen()); tables != 0 || folders != 1 || !slices.Equal(store.lastFolders.Load().([]string), []string{"other"}) {
		t.Fatalf("another replica's route: %d table and %d folder reads of %v; want the folder other only", tables, folders, store.lastFolders.Load())
	}
	if !serves("other-be") {
		t.Fatalf("after another replica's write HAProxy serves:\n%s", hap.Config())
	}

	// This replica writes books-ms again; a snapshot older than that write and than the folder
	// other changes nothing and reads nothing.
	books.ServicePath, books.TimeoutServer = []string{"/api/v2/books"}, 120
	if _, err := p.Reconfigure(ctx, books); err != nil {
		t.Fatal(err)
	}
	if tables, folders := sync(before, beforeIndex); tables+folders != 0 {
		t.Fatalf("an older snapshot: %d table and %d folder reads", tables, folders)
	}
	if !serves("other-be") || !strings.Contains(string(hap.Config()), "/api/v2/books") {
		t.Fatalf("an older snapshot changed what HAProxy serves:\n%s", hap.Config())
	}

	// Another replica deletes a route: it is read and no longer served.
	if err := other.Delete(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	if tables, folders := sync(seen()); tables != 0 || folders != 1 || serves("other-be") {
		t.Fatalf("a deleted route: %d table and %d folder reads; HAProxy serves:\n%s", tables, folders, hap.Config())
	}

	// A key of books-ms deleted by hand: the folder is read again, and the route as KV has it now
	// is served (the proxy's own server timeout).
	if !strings.Contains(string(hap.Config()), "timeout server 120s") {
		t.Fatalf("the route's timeout is not served:\n%s", hap.Config())
	}
	if _, err := client.API().KV().Delete("docker-flow/books-ms/timeoutserver", nil); err != nil {
		t.Fatal(err)
	}
	if tables, folders := sync(seen()); tables != 0 || folders != 1 || strings.Contains(string(hap.Config()), "timeout server 120s") {
		t.Fatalf("a key deleted by hand: %d table and %d folder reads, want 1 folder; HAProxy serves:\n%s", tables, folders, hap.Config())
	}

	// Many routes written at once by another replica: one read of the whole table.
	for i := range maxFolderReads + 1 {
		if err := other.Put(ctx, route.Route{ServiceName: fmt.Sprintf("bulk-%03d", i), ServicePath: []string{fmt.Sprintf("/bulk-%03d", i)}, PathType: route.PathBeg}); err != nil {
			t.Fatal(err)
		}
	}
	if tables, folders := sync(seen()); tables != 1 || folders != 0 || !serves("bulk-000-be") || !serves(fmt.Sprintf("bulk-%03d-be", maxFolderReads)) {
		t.Fatalf("%d routes written at once: %d table and %d folder reads", maxFolderReads+1, tables, folders)
	}
	if tables, folders := sync(seen()); tables+folders != 0 {
		t.Fatalf("the same table seen again: %d table and %d folder reads", tables, folders)
	}
}

// startController loads the route table of store into a controller and starts its HAProxy on a
// free port of 127.0.0.1 (stopped when the test ends).
func startController(ctx context.Context, t *testing.T, client *consul.Client, store Store) (*Proxy, *haproxy.Process) {
	t.Helper()
	return startControllerWith(ctx, t, catalogOf(client), store, haproxy.DefaultSettings(), nil)
}

// startControllerWith is startController with a catalog, settings (bound to a free port of
// 127.0.0.1 here) and a logger of the test's (nil: the default).
func startControllerWith(ctx context.Context, t *testing.T, catalog Catalog, store Store, s haproxy.Settings,
	log *slog.Logger) (*Proxy, *haproxy.Process) {
	t.Helper()
	hap := haproxy.NewProcess(haproxy.Options{Binary: testenv.HAProxyBin(t), Dir: t.TempDir(), Logger: log})
	s.BindAddress, s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	p := New(catalog, store, hap, s, log)
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
