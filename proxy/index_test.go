package proxy

import (
	"context"
	"net/url"
	"reflect"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// The index of routes by Consul service, which tells a catalog watch's report which routes it
// changes, follows every change of the table: after each one it is what it would be if built
// again from the whole table, and ConsulServices lists what the watch must follow.
func TestIndexByConsulFollowsTheTable(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, _ := startController(ctx, t, client, consul.NewStore(client, "docker-flow"))
	parse := func(query string) route.Route {
		t.Helper()
		q, err := url.ParseQuery(query)
		if err != nil {
			t.Fatal(err)
		}
		r, err := route.FromQuery(q)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	check := func(step string, want map[string][]string) {
		t.Helper()
		p.mu.Lock()
		got, rebuilt := p.byConsulLocked(), indexByConsul(p.backends)
		p.mu.Unlock()
		if !reflect.DeepEqual(got, rebuilt) || !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: the index is %v; built again from the table %v; want %v", step, got, rebuilt, want)
		}
	}
	check("empty", map[string][]string{})
	steps := []struct {
		what   string
		do     func() error
		wanted map[string][]string
	}{
		{"books", func() error { _, err := p.Reconfigure(ctx, parse("serviceName=books&servicePath=/books")); return err },
			map[string][]string{"books": {"books"}}},
		{"books with the admin port", func() error {
			_, err := p.Reconfigure(ctx, parse("serviceName=books&servicePath=/books&servicePath.1=/admin&port.1=9000"))
			return err
		}, map[string][]string{"books": {"books"}, "books-9000": {"books"}}},
		{"authors", func() error {
			_, err := p.Reconfigure(ctx, parse("serviceName=authors&servicePath=/authors"))
			return err
		},
			map[string][]string{"authors": {"authors"}, "books": {"books"}, "books-9000": {"books"}}},
		{"books on another port", func() error {
			_, err := p.Reconfigure(ctx, parse("serviceName=books&servicePath=/books&servicePath.1=/admin&port.1=9001"))
			return err
		}, map[string][]string{"authors": {"authors"}, "books": {"books"}, "books-9001": {"books"}}},
		{"books removed", func() error { _, err := p.Remove(ctx, "books"); return err },
			map[string][]string{"authors": {"authors"}}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.what, err)
		}
		check(s.what, s.wanted)
		want := make([]string, 0, len(s.wanted))
		for svc := range s.wanted {
			want = append(want, svc)
		}
		if got := p.ConsulServices(); !sameSet(got, want) {
			t.Fatalf("%s: ConsulServices() = %v, want %v", s.what, got, want)
		}
	}
}

func sameSet(a, b []string) bool {
	m := map[string]int{}
	for _, s := range a {
		m[s]++
	}
	for _, s := range b {
		m[s]--
	}
	for _, n := range m {
		if n != 0 {
			return false
		}
	}
	return true
}
