package route

import (
	"fmt"
	"net"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// EnvPrefix starts the environment variables that define services at start: DFP_SERVICE_<PARAM>
// for one service, DFP_SERVICE_<N>_<PARAM> for several (N from 1). <PARAM> is a reconfigure
// parameter in upper snake case (SERVICE_NAME, SERVICE_PATH, REQ_PATH_SEARCH, ...); a trailing
// _<N> makes it indexed (SERVICE_PATH_1 is servicePath.1).
const EnvPrefix = "DFP_SERVICE_"

// ParamInstances lists, in an env-defined service, the addresses of its instances (host:port, comma
// separated), for a service that is not registered in Consul.
const ParamInstances = "instances"

// EnvRoute is a route defined by environment variables.
type EnvRoute struct {
	Route Route
	// Instances, when set, are the route's instances; otherwise they come from the Consul catalog.
	Instances []Instance
	// Vars names the variables that define it, for messages.
	Vars string
}

// FromEnv reads the routes that DFP_SERVICE_* variables define. A bad variable is an error that
// names it and the reason.
func FromEnv(environ []string) ([]EnvRoute, error) {
	groups := map[string]url.Values{} // "" for DFP_SERVICE_<PARAM>, "N" for DFP_SERVICE_N_<PARAM>
	for _, kv := range environ {
		name, value, _ := strings.Cut(kv, "=")
		rest, ok := strings.CutPrefix(name, EnvPrefix)
		if !ok || value == "" {
			continue
		}
		group := ""
		if i := strings.IndexByte(rest, '_'); i > 0 && allDigits(rest[:i]) {
			group, rest = rest[:i], rest[i+1:]
			if n, err := strconv.Atoi(group); err != nil || n < 1 || group[0] == '0' {
				return nil, fmt.Errorf("environment variable %s: the service number must be 1 or more", name)
			}
		}
		param, err := envParam(rest)
		if err != nil {
			return nil, fmt.Errorf("environment variable %s: %w", name, err)
		}
		if groups[group] == nil {
			groups[group] = url.Values{}
		}
		groups[group].Add(param, value)
	}
	keys := make([]string, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, _ := strconv.Atoi(keys[i])
		b, _ := strconv.Atoi(keys[j])
		return a < b
	})
	var out []EnvRoute
	seen := map[string]string{}
	for _, k := range keys {
		q := groups[k]
		vars := EnvPrefix + "*"
		if k != "" {
			vars = EnvPrefix + k + "_*"
		}
		var inst []Instance
		if list := q.Get(ParamInstances); list != "" {
			var err error
			if inst, err = parseInstances(list); err != nil {
				return nil, fmt.Errorf("environment variables %s: %w", vars, err)
			}
		}
		q.Del(ParamInstances)
		r, err := FromQuery(q)
		if err != nil {
			return nil, fmt.Errorf("environment variables %s: %w", vars, err)
		}
		if other, dup := seen[r.ServiceName]; dup {
			return nil, fmt.Errorf("environment variables %s and %s both define service %s", other, vars, r.ServiceName)
		}
		seen[r.ServiceName] = vars
		out = append(out, EnvRoute{Route: r, Instances: inst, Vars: vars})
	}
	return out, nil
}

// envParam turns SERVICE_PATH into servicePath and SERVICE_PATH_1 into servicePath.1.
func envParam(s string) (string, error) {
	parts := strings.Split(s, "_")
	index := ""
	if n := len(parts); n > 1 && allDigits(parts[n-1]) {
		index, parts = "."+parts[n-1], parts[:n-1]
	}
	var b strings.Builder
	for i, p := range parts {
		if p == "" {
			return "", fmt.Errorf("%q is not a parameter name in upper snake case", s)
		}
		p = strings.ToLower(p)
		if i > 0 {
			p = strings.ToUpper(p[:1]) + p[1:]
		}
		b.WriteString(p)
	}
	return b.String() + index, nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parseInstances reads host:port items: an IP address or a host name, and a port.
func parseInstances(list string) ([]Instance, error) {
	var out []Instance
	for _, item := range strings.Split(list, ",") {
		host, port, err := net.SplitHostPort(strings.TrimSpace(item))
		if err != nil {
			return nil, paramErr(ParamInstances, "%s is not host:port", quoteForMessage(item))
		}
		p, err := parsePort(ParamInstances, port)
		if err != nil {
			return nil, err
		}
		if net.ParseIP(host) == nil {
			if err := validateDomain(ParamInstances, host); err != nil {
				return nil, err
			}
		}
		out = append(out, Instance{Address: host, Port: p})
	}
	return out, nil
}
