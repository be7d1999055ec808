package consul

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// HealthFilter selects a service's instances by the state of their health checks.
type HealthFilter string

// The health filters.
const (
	// HealthPassing keeps the instances whose checks all pass (the default).
	HealthPassing HealthFilter = "passing"
	// HealthWarning keeps the instances whose checks pass or warn.
	HealthWarning HealthFilter = "warning"
	// HealthAny keeps every instance of the catalog, as the original product did.
	HealthAny HealthFilter = "any"
)

// ParseHealthFilter reads a health filter; the empty string is HealthPassing.
func ParseHealthFilter(s string) (HealthFilter, error) {
	switch f := HealthFilter(strings.ToLower(strings.TrimSpace(s))); f {
	case "":
		return HealthPassing, nil
	case HealthPassing, HealthWarning, HealthAny:
		return f, nil
	}
	return "", fmt.Errorf("health filter %q is not one of %s, %s, %s", s, HealthPassing, HealthWarning, HealthAny)
}

func (f HealthFilter) keeps(status string) bool {
	switch f {
	case HealthAny:
		return true
	case HealthWarning:
		return status == api.HealthPassing || status == api.HealthWarning
	default:
		return status == api.HealthPassing
	}
}

// Instances lists the instances of a Consul service that pass filter (the empty filter is
// HealthPassing), sorted by address and port, without duplicates. The address is the service's,
// or its node's when the service has none. An instance whose address is neither an IP nor a DNS
// host name, or whose port is not 1..65535, is skipped and logged: catalog data never reaches the
// HAProxy config unchecked. A service that Consul does not know has no instances.
func (c *Client) Instances(ctx context.Context, service string, filter HealthFilter) ([]route.Instance, error) {
	if err := checkServiceName(service); err != nil {
		return nil, err
	}
	f, err := ParseHealthFilter(string(filter))
	if err != nil {
		return nil, err
	}
	var entries []*api.ServiceEntry
	err = c.do(ctx, func(ctx context.Context, a *api.Client) error {
		var err error
		entries, _, err = a.Health().Service(service, "", f == HealthPassing, fresh(ctx))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("consul health service %s: %w", service, err)
	}
	return c.instancesFrom(service, f, entries), nil
}

// hostLabel is one label of a DNS host name. The underscore is allowed: Docker names services
// "<stack>_<service>" and its DNS resolves them.
var hostLabel = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$`)

// validHost accepts an IPv4 or IPv6 address (returned in canonical form) or a DNS host name, and
// nothing that HAProxy's config parser could read as anything else.
func validHost(s string) (string, bool) {
	if ip, err := netip.ParseAddr(s); err == nil {
		if ip.Zone() != "" {
			return "", false
		}
		return ip.String(), true
	}
	if s == "" || len(s) > 253 {
		return "", false
	}
	labels := strings.Split(s, ".")
	for _, l := range labels {
		if !hostLabel.MatchString(l) {
			return "", false
		}
	}
	// A name whose last label is all digits would be read as a (malformed) IP address.
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return "", false
	}
	return s, true
}

// checkServiceName rejects a service name that would address another Consul path.
func checkServiceName(name string) error {
	reason := ""
	switch {
	case name == "":
		reason = "is required"
	case name == "." || name == "..":
		reason = fmt.Sprintf("%q is not a service name", name)
	case strings.ContainsAny(name, "/?#%\\") || strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		reason = fmt.Sprintf("%q contains a character that is not allowed in a service name", name)
	default:
		return nil
	}
	return &route.ParamError{Param: route.ParamServiceName, Reason: reason}
}
