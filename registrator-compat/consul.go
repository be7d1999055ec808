package registrator

import (
	"context"
	"fmt"
	"net/url"
	"reflect"
	"slices"
	"strings"

	"github.com/hashicorp/consul/api"
)

// Registry is where services are registered: the local Consul agent.
type Registry interface {
	Ping(ctx context.Context) error
	Register(ctx context.Context, s Service) error
	Deregister(ctx context.Context, id string) error
	// Services lists the agent's services by ID, as registered.
	Services(ctx context.Context) (map[string]Registered, error)
}

// Registered is what the agent holds of a service: enough to tell whether it must change.
type Registered struct {
	ID, Name, Address string
	Port              int
	Tags              []string
	Meta              map[string]string
	Checks            int
}

// Matches reports whether the agent's registration already says what s says.
func (r Registered) Matches(s Service) bool {
	checks := 0
	if s.Check != nil {
		checks = 1
	}
	return r.Name == s.Name && r.Address == s.Address && r.Port == s.Port &&
		slices.Equal(r.Tags, nonNil(s.Tags)) && reflect.DeepEqual(nonNilMap(r.Meta), nonNilMap(s.Meta)) && r.Checks == checks
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nonNilMap(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// Consul registers services with a Consul agent's /v1/agent API.
type Consul struct {
	c               *api.Client
	address, scheme string // as read from the URI
}

// NewConsul reads Registrator's backend URIs: consul://host:port, consul-tls://host:port and
// consul-unix:///path/to/consul.sock. The ACL token comes from CONSUL_HTTP_TOKEN and TLS files from
// CONSUL_CACERT, CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY.
func NewConsul(uri string) (*Consul, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("registry URI %q: %w", uri, err)
	}
	cfg := api.DefaultConfig()
	switch u.Scheme {
	case "consul":
		cfg.Address, cfg.Scheme = hostOrDefault(u.Host), "http"
	case "consul-tls":
		cfg.Address, cfg.Scheme = hostOrDefault(u.Host), "https"
	case "consul-unix":
		path := u.Path
		if u.Host != "" {
			path = u.Host + u.Path
		}
		if path == "" {
			return nil, fmt.Errorf("registry URI %q: no socket path", uri)
		}
		cfg.Address = "unix://" + path
	default:
		return nil, fmt.Errorf("registry URI %q: scheme must be consul, consul-tls or consul-unix", uri)
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("consul client for %s: %w", uri, err)
	}
	return &Consul{c: c, address: cfg.Address, scheme: cfg.Scheme}, nil
}

func hostOrDefault(h string) string {
	if h == "" {
		return "127.0.0.1:8500"
	}
	if !strings.Contains(h, ":") {
		return h + ":8500"
	}
	return h
}

// Ping checks that the agent answers and has a leader.
func (c *Consul) Ping(ctx context.Context) error {
	leader, err := c.c.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("consul ping: %w", err)
	}
	if leader == "" {
		return fmt.Errorf("consul ping: no cluster leader")
	}
	return nil
}

// Register registers (or replaces) a service and its check with the agent.
func (c *Consul) Register(ctx context.Context, s Service) error {
	reg := &api.AgentServiceRegistration{
		ID: s.ID, Name: s.Name, Address: s.Address, Port: s.Port, Tags: s.Tags, Meta: s.Meta,
	}
	if ch := s.Check; ch != nil {
		reg.Check = &api.AgentServiceCheck{
			HTTP: ch.HTTP, Method: ch.Method, TLSSkipVerify: ch.TLSSkipVerify, TCP: ch.TCP, GRPC: ch.GRPC,
			TTL: ch.TTL, Args: ch.Args, Interval: ch.Interval, Timeout: ch.Timeout, Status: ch.InitialStatus,
			DeregisterCriticalServiceAfter: ch.DeregisterAfter,
		}
	}
	opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
	if err := c.c.Agent().ServiceRegisterOpts(reg, opts); err != nil {
		return fmt.Errorf("consul register %s: %w", s.ID, err)
	}
	return nil
}

// Deregister removes a service from the agent; a service that is not there is not an error.
func (c *Consul) Deregister(ctx context.Context, id string) error {
	err := c.c.Agent().ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil && !strings.Contains(err.Error(), "404") {
		return fmt.Errorf("consul deregister %s: %w", id, err)
	}
	return nil
}

// Services lists the agent's services and how many checks each has.
func (c *Consul) Services(ctx context.Context) (map[string]Registered, error) {
	q := (&api.QueryOptions{}).WithContext(ctx)
	svcs, err := c.c.Agent().ServicesWithFilterOpts("", q)
	if err != nil {
		return nil, fmt.Errorf("consul list services: %w", err)
	}
	checks, err := c.c.Agent().ChecksWithFilterOpts("", q)
	if err != nil {
		return nil, fmt.Errorf("consul list checks: %w", err)
	}
	out := make(map[string]Registered, len(svcs))
	for id, s := range svcs {
		out[id] = Registered{ID: id, Name: s.Service, Address: s.Address, Port: s.Port, Tags: nonNil(s.Tags), Meta: s.Meta}
	}
	for _, ch := range checks {
		if r, ok := out[ch.ServiceID]; ok {
			r.Checks++
			out[ch.ServiceID] = r
		}
	}
	return out, nil
}
