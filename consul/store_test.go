package consul

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// rawKV reads a key the way a user does in the Consul UI; "" and false when it is absent.
func rawKV(t *testing.T, c *Client, key string) (string, bool) {
	t.Helper()
	p, _, err := c.API().KV().Get(key, nil)
	if err != nil {
		t.Fatalf("kv get %s: %v", key, err)
	}
	if p == nil {
		return "", false
	}
	return string(p.Value), true
}

func putRawKV(t *testing.T, c *Client, key, value string) {
	t.Helper()
	if _, err := c.API().KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil); err != nil {
		t.Fatalf("kv put %s: %v", key, err)
	}
}

// cleanPrefix empties a prefix when the subtest ends, so that subtests sharing it stay independent.
func cleanPrefix(t *testing.T, c *Client, prefix string) {
	t.Cleanup(func() {
		if _, err := c.API().KV().DeleteTree(prefix+"/", nil); err != nil {
			t.Errorf("kv delete-tree %s/: %v", prefix, err)
		}
	})
}

func mustList(t *testing.T, s *Store) []route.Route {
	t.Helper()
	routes, invalid, err := s.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(invalid) > 0 {
		t.Fatalf("List reported invalid routes: %v", invalid)
	}
	return routes
}

func names(routes []route.Route) []string {
	out := make([]string, len(routes))
	for i, r := range routes {
		out[i] = r.ServiceName
	}
	return out
}

func TestStore(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)

	booksMS := route.Route{
		ServiceName:   "books-ms",
		ServiceColor:  "blue",
		ServicePath:   []string{"/api/v1/books", "/api/v1/authors"},
		ServiceDomain: []string{"books.example.com", "example.org"},
		PathType:      route.PathDir,
		SkipCheck:     true,
	}
	simple := func(name string) route.Route {
		return route.Route{ServiceName: name, ServicePath: []string{"/" + name}, PathType: route.PathBeg}
	}

	t.Run("put then get and list", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "")
		if err := s.Put(ctx, booksMS); err != nil {
			t.Fatal(err)
		}
		if err := s.Put(ctx, simple("go-demo")); err != nil {
			t.Fatal(err)
		}
		got, ok, err := s.Get(ctx, "books-ms")
		if err != nil || !ok || !got.Equal(booksMS) {
			t.Errorf("Get = %+v, %v, %v; want %+v", got, ok, err, booksMS)
		}
		routes := mustList(t, s)
		if len(routes) != 2 || !routes[0].Equal(booksMS) || !routes[1].Equal(simple("go-demo")) {
			t.Errorf("List = %+v", routes)
		}
		// One readable key per field, in the original product's layout.
		for key, want := range map[string]string{
			"docker-flow/books-ms/path":      "/api/v1/books,/api/v1/authors",
			"docker-flow/books-ms/color":     "blue",
			"docker-flow/books-ms/domain":    "books.example.com,example.org",
			"docker-flow/books-ms/pathtype":  "path_dir",
			"docker-flow/books-ms/skipcheck": "true",
		} {
			if v, ok := rawKV(t, c, key); !ok || v != want {
				t.Errorf("kv %s = %q, %v; want %q", key, v, ok, want)
			}
		}
		if _, ok, err := s.Get(ctx, "books"); ok || err != nil {
			t.Errorf("Get of a missing route = %v, %v; want not found", ok, err)
		}
	})

	t.Run("put replaces the whole route", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "docker-flow")
		if err := s.Put(ctx, booksMS); err != nil {
			t.Fatal(err)
		}
		smaller := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v2/books"}, PathType: route.PathBeg}
		if err := s.Put(ctx, smaller); err != nil {
			t.Fatal(err)
		}
		if got, ok, err := s.Get(ctx, "books-ms"); err != nil || !ok || !got.Equal(smaller) {
			t.Errorf("Get = %+v, %v, %v; want %+v", got, ok, err, smaller)
		}
		for _, key := range []string{"docker-flow/books-ms/color", "docker-flow/books-ms/domain"} {
			if v, ok := rawKV(t, c, key); ok {
				t.Errorf("stale key %s = %q is still there", key, v)
			}
		}
		if v, _ := rawKV(t, c, "docker-flow/books-ms/path"); v != "/api/v2/books" {
			t.Errorf("kv path = %q", v)
		}
	})

	t.Run("an invalid route is not written", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "")
		bad := route.Route{ServiceName: "books", ServicePath: []string{"/a b"}, PathType: route.PathBeg}
		var pe *route.ParamError
		if err := s.Put(ctx, bad); !errors.As(err, &pe) {
			t.Fatalf("Put of an invalid route: %v, want a ParamError", err)
		}
		if _, ok := rawKV(t, c, "docker-flow/books/path"); ok {
			t.Error("the invalid route was written")
		}
		for _, name := range []string{"", "a/b", ".."} {
			if _, _, err := s.Get(ctx, name); !errors.As(err, &pe) {
				t.Errorf("Get(%q) = %v, want a ParamError", name, err)
			}
			if err := s.Delete(ctx, name); !errors.As(err, &pe) {
				t.Errorf("Delete(%q) = %v, want a ParamError", name, err)
			}
		}
	})

	t.Run("delete removes one route only", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "")
		for _, name := range []string{"books", "books-ms"} {
			if err := s.Put(ctx, simple(name)); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Delete(ctx, "books"); err != nil {
			t.Fatal(err)
		}
		if got := names(mustList(t, s)); !reflect.DeepEqual(got, []string{"books-ms"}) {
			t.Errorf("List after deleting books = %v, want [books-ms]", got)
		}
		if err := s.Delete(ctx, "books"); err != nil {
			t.Errorf("deleting a missing route: %v", err)
		}
	})

	t.Run("prefixes do not see each other", func(t *testing.T) {
		stores := map[string]*Store{}
		for _, p := range []string{"docker-flow", "other", "docker-flow-2"} {
			cleanPrefix(t, c, p)
			stores[p] = NewStore(c, p)
			if err := stores[p].Put(ctx, simple("svc-of-"+p)); err != nil {
				t.Fatal(err)
			}
		}
		if err := stores["other"].Put(ctx, simple("shared")); err != nil {
			t.Fatal(err)
		}
		for p, s := range stores {
			want := []string{"svc-of-" + p}
			if p == "other" {
				want = []string{"shared", "svc-of-other"}
			}
			if got := names(mustList(t, s)); !reflect.DeepEqual(got, want) {
				t.Errorf("List of %s = %v, want %v", p, got, want)
			}
		}
		if err := stores["docker-flow"].Delete(ctx, "shared"); err != nil {
			t.Fatal(err)
		}
		if _, ok, _ := stores["other"].Get(ctx, "shared"); !ok {
			t.Error("deleting under docker-flow removed other's route")
		}
	})

	t.Run("an invalid folder is reported, the others are listed", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "")
		if err := s.Put(ctx, simple("good")); err != nil {
			t.Fatal(err)
		}
		putRawKV(t, c, "docker-flow/bad/path", "/a b")
		putRawKV(t, c, "docker-flow/worse/skipcheck", "maybe")
		putRawKV(t, c, "docker-flow/worse/path", "/worse")
		putRawKV(t, c, "docker-flow/readme", "not a route")               // directly under the prefix
		putRawKV(t, c, "docker-flow/good/nested/path", "/ignored\nvalue") // deeper folder
		putRawKV(t, c, "docker-flow/folder-only/", "")                    // a folder made in the UI
		routes, invalid, err := s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(routes) != 1 || !routes[0].Equal(simple("good")) {
			t.Errorf("List = %+v, want only good", routes)
		}
		if len(invalid) != 2 || !strings.Contains(invalid[0].Error(), "docker-flow/bad/") ||
			!strings.Contains(invalid[1].Error(), "docker-flow/worse/") {
			t.Errorf("invalid = %v, want bad and worse", invalid)
		}
		if _, _, err := s.Get(ctx, "bad"); err == nil || errors.Is(err, ErrUnavailable) {
			t.Errorf("Get of an invalid route: %v, want a validation error", err)
		}
	})

	t.Run("the original product's layout", func(t *testing.T) {
		cleanPrefix(t, c, "docker-flow")
		s := NewStore(c, "")
		putRawKV(t, c, "docker-flow/go-demo/path", "/demo,/other")
		putRawKV(t, c, "docker-flow/go-demo/skipcheck", "false")
		putRawKV(t, c, "docker-flow/go-demo/color", "blue")
		putRawKV(t, c, "docker-flow/go-demo/consultemplatefepath", "")
		want := route.Route{ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"}, PathType: route.PathBeg}
		if got, ok, err := s.Get(ctx, "go-demo"); err != nil || !ok || !got.Equal(want) {
			t.Errorf("Get = %+v, %v, %v; want %+v", got, ok, err, want)
		}
		if routes := mustList(t, s); len(routes) != 1 || !routes[0].Equal(want) {
			t.Errorf("List = %+v, want %+v", routes, want)
		}
	})

	t.Run("concurrent puts all land", func(t *testing.T) {
		cleanPrefix(t, c, "concurrent")
		s := NewStore(c, "concurrent")
		var wg sync.WaitGroup
		errs := make(chan error, 50)
		for i := range 50 {
			wg.Go(func() {
				if err := s.Put(ctx, simple(fmt.Sprintf("svc-%02d", i))); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		routes := mustList(t, s)
		if len(routes) != 50 {
			t.Fatalf("List has %d routes, want 50", len(routes))
		}
		for i, r := range routes {
			if want := simple(fmt.Sprintf("svc-%02d", i)); !r.Equal(want) {
				t.Errorf("route %d = %+v, want %+v", i, r, want)
			}
		}
	})
}

// Restore is a check-and-set: it undoes a write only while the folder is as that write left it.
func TestStoreRestoreNeverUndoesANewerWrite(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "docker-flow")
	mine := route.Route{ServiceName: "svc", ServicePath: []string{"/mine"}, PathType: route.PathBeg}
	theirs := route.Route{ServiceName: "svc", ServicePath: []string{"/theirs"}, PathType: route.PathBeg}
	old := route.Route{ServiceName: "svc", ServicePath: []string{"/old"}, PathType: route.PathBeg}
	path := func() string {
		r, ok, err := s.Get(ctx, "svc")
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return "(none)"
		}
		return r.ServicePath[0]
	}
	for _, tc := range []struct {
		name     string
		before   *route.Route // the folder before my write
		write    *route.Route // my write
		other    *route.Route // another replica's write after mine, if any
		restored bool
		want     string
	}{
		{"put undone", &old, &mine, nil, true, "/old"},
		{"put over nothing undone", nil, &mine, nil, true, "(none)"},
		{"put then theirs kept", &old, &mine, &theirs, false, "/theirs"},
		{"delete undone", &old, nil, nil, true, "/old"},
		{"delete then theirs kept", &old, nil, &theirs, false, "/theirs"},
	} {
		if _, err := s.Write(ctx, "svc", tc.before); err != nil {
			t.Fatal(err)
		}
		v, err := s.Write(ctx, "svc", tc.write)
		if err != nil {
			t.Fatal(err)
		}
		if tc.other != nil {
			if _, err := s.Write(ctx, "svc", tc.other); err != nil {
				t.Fatal(err)
			}
		}
		restored, err := s.Restore(ctx, "svc", tc.before, v)
		if err != nil || restored != tc.restored || path() != tc.want {
			t.Errorf("%s: Restore = %v, %v; folder holds %s; want %v and %s", tc.name, restored, err, path(), tc.restored, tc.want)
		}
	}
}

// A folder's version changes with every write to it, by this product or by hand, and is the same
// in Table, in Folders and in what Write returns; Folders reads only the folders named.
func TestStoreVersions(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "docker-flow")
	books := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	written, err := s.Write(ctx, "books", &books)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 70 { // more than one transaction of Folders
		r := route.Route{ServiceName: fmt.Sprintf("svc-%02d", i), ServicePath: []string{"/p"}, PathType: route.PathBeg}
		if err := s.Put(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	putRawKV(t, c, "docker-flow/bad/pathtype", "nonsense")
	table, err := s.Table(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := table.Versions["books"]; got != written || written.Keys != len(books.KV()) {
		t.Fatalf("Table's version of books = %+v, Write returned %+v (%d keys)", got, written, len(books.KV()))
	}
	if len(table.Versions) != 72 || len(table.Routes) != 71 || len(table.Invalid) != 1 {
		t.Fatalf("Table: %d versions, %d routes, %d invalid; want 72, 71, 1", len(table.Versions), len(table.Routes), len(table.Invalid))
	}

	var names []string
	for i := range 70 {
		names = append(names, fmt.Sprintf("svc-%02d", i))
	}
	names = append(names, "books", "bad", "absent")
	part, err := s.Folders(ctx, names)
	if err != nil {
		t.Fatal(err)
	}
	if want := table.Versions; !maps.Equal(part.Versions, want) || len(part.Routes) != 71 || len(part.Invalid) != 1 {
		t.Fatalf("Folders: versions %v, %d routes, %d invalid; want %v, 71, 1", part.Versions, len(part.Routes), len(part.Invalid), want)
	}
	if part, err := s.Folders(ctx, []string{"books"}); err != nil || len(part.Versions) != 1 || len(part.Routes) != 1 || !part.Routes[0].Equal(books) {
		t.Fatalf("Folders(books) = %+v, %v", part, err)
	}

	// A key deleted by hand lowers the count; a key set by hand raises the index.
	if _, err := c.API().KV().Delete("docker-flow/books/pathtype", nil); err != nil {
		t.Fatal(err)
	}
	afterDelete := versionOf(t, s, "books")
	if afterDelete.Keys != written.Keys-1 {
		t.Errorf("after a key was deleted the version is %+v, was %+v", afterDelete, written)
	}
	putRawKV(t, c, "docker-flow/books/path", "/other")
	if v := versionOf(t, s, "books"); v.Index <= afterDelete.Index {
		t.Errorf("after a key was set the version is %+v, was %+v", v, afterDelete)
	}
	if err := s.Delete(ctx, "books"); err != nil {
		t.Fatal(err)
	}
	if v := versionOf(t, s, "books"); v != (route.KVVersion{}) {
		t.Errorf("a deleted folder's version is %+v", v)
	}
}

func versionOf(t *testing.T, s *Store, service string) route.KVVersion {
	t.Helper()
	part, err := s.Folders(context.Background(), []string{service})
	if err != nil {
		t.Fatal(err)
	}
	return part.Versions[service]
}
