package registrator

import (
	"fmt"
	"net"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Limits of Consul's service metadata (agent/structs: metaKeyFormat, metaMaxKeyPairs, ...).
const (
	metaMaxPairs     = 64
	metaKeyMaxLen    = 128
	metaValueMaxLen  = 512
	metaReservedPfx  = "consul-"
	defaultInterval  = "10s"
	serviceKeyPrefix = "SERVICE_"
)

var (
	validServiceName = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	validMetaKey     = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)
)

// Services returns the registrations of a container, by Registrator's rules, sorted by ID.
// Problems that skip a port or a key are returned as warnings (strings naming container and port) for the caller to log.
//
// Intentional skips (an unpublished port without -internal, SERVICE_IGNORE, -explicit without a name)
// give no warning. Tags and Meta are nil when empty. Services is pure: no I/O, no shared state.
func Services(c Container, o Options) (services []Service, warnings []string) {
	w := &warner{container: containerLabel(c)}
	pairs := serviceKeys(c)

	ports := uniquePorts(c.Ports, w)
	var registered []Port
	for _, p := range ports {
		if !o.Internal && p.HostPort == 0 {
			continue // not published on the host
		}
		registered = append(registered, p)
	}
	isGroup := len(registered) > 1

	for _, p := range registered {
		if s, ok := portService(c, o, p, pairs, isGroup, w); ok {
			services = append(services, s)
		}
	}

	sort.SliceStable(services, func(i, j int) bool {
		a, b := services[i], services[j]
		if a.ID != b.ID {
			return a.ID < b.ID
		}
		if a.ExposedPort != b.ExposedPort {
			return a.ExposedPort < b.ExposedPort
		}
		return a.Proto < b.Proto
	})
	// Two registrations with one ID (SERVICE_ID on a container with several ports) would overwrite
	// each other in Consul: keep the first.
	out := services[:0]
	for i, s := range services {
		if i > 0 && s.ID == out[len(out)-1].ID {
			w.port(s.ExposedPort, s.Proto, "service ID %q already used by port %d/%s; port skipped",
				s.ID, out[len(out)-1].ExposedPort, out[len(out)-1].Proto)
			continue
		}
		out = append(out, s)
	}
	return out, w.list
}

// portService applies the rules to one port; false when the port is not registered.
func portService(c Container, o Options, p Port, pairs []keyValue, isGroup bool, w *warner) (Service, bool) {
	md, fromPort := portMetadata(pairs, p.ExposedPort)

	if md["ignore"] != "" {
		return Service{}, false
	}

	name := md["name"]
	nameFromPort := fromPort["name"] && name != ""
	if name == "" {
		if o.Explicit {
			return Service{}, false
		}
		name = imageBaseName(c.Image)
		if name == "" {
			w.port(p.ExposedPort, p.Proto, "no service name: no SERVICE_NAME and no image name; port skipped")
			return Service{}, false
		}
	}
	if isGroup && !nameFromPort {
		name += "-" + strconv.Itoa(p.ExposedPort)
	}
	if !validServiceName.MatchString(name) {
		w.port(p.ExposedPort, p.Proto, "service name %q is not made of A-Z a-z 0-9 _ . -; port skipped", name)
		return Service{}, false
	}

	id := o.Hostname + ":" + strings.TrimPrefix(c.Name, "/") + ":" + strconv.Itoa(p.ExposedPort)
	if p.Proto != "tcp" {
		id += ":" + p.Proto
	}
	if v := md["id"]; v != "" {
		id = v
	}

	addr, port := serviceAddress(c, o, p, w)

	var extra []string
	if p.Proto == "udp" {
		extra = append(extra, "udp")
	}

	s := Service{
		ID:            id,
		Name:          name,
		Address:       addr,
		Port:          port,
		Tags:          joinTags(splitTags(md["tags"]), o.Tags, extra),
		Meta:          serviceMeta(md, p, w),
		Check:         serviceCheck(md, addr, port, p, w),
		ContainerID:   c.ID,
		ContainerName: strings.TrimPrefix(c.Name, "/"),
		ExposedPort:   p.ExposedPort,
		Proto:         p.Proto,
	}
	return s, true
}

// keyValue is one SERVICE_* key of a container, lowercased without the prefix.
type keyValue struct{ key, value string }

// serviceKeys lists the container's SERVICE_* keys: env first, then labels (sorted, so that the result
// does not depend on map order), so that a label overrides the env var of the same key.
func serviceKeys(c Container) []keyValue {
	var out []keyValue
	add := func(k, v string) {
		if strings.HasPrefix(k, serviceKeyPrefix) {
			out = append(out, keyValue{strings.ToLower(strings.TrimPrefix(k, serviceKeyPrefix)), v})
		}
	}
	for _, kv := range c.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			add(k, v)
		}
	}
	labels := make([]string, 0, len(c.Labels))
	for k := range c.Labels {
		labels = append(labels, k)
	}
	sort.Strings(labels)
	for _, k := range labels {
		add(k, c.Labels[k])
	}
	return out
}

// portMetadata is the metadata of one exposed port: the generic keys overridden by the
// SERVICE_<port>_<KEY> ones (whatever their source), and which keys came from the port-specific form.
func portMetadata(pairs []keyValue, exposedPort int) (map[string]string, map[string]bool) {
	want := strconv.Itoa(exposedPort)
	md := map[string]string{}
	specific := map[string]string{}
	for _, kv := range pairs {
		if port, key, ok := strings.Cut(kv.key, "_"); ok && isDigits(port) {
			if port == want {
				specific[key] = kv.value
			}
			continue // another port's key
		}
		md[kv.key] = kv.value
	}
	fromPort := make(map[string]bool, len(specific))
	for k, v := range specific {
		md[k] = v
		fromPort[k] = true
	}
	return md, fromPort
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// uniquePorts keeps one binding per (exposed port, protocol), sorted by port then protocol: a
// published binding before an unpublished one, then an IPv4 (or every-address) binding before an
// IPv6 one, then the first given.
func uniquePorts(in []Port, w *warner) []Port {
	type key struct {
		port  int
		proto string
	}
	best := map[key]Port{}
	var order []key
	for _, p := range in {
		p.Proto = strings.ToLower(p.Proto)
		if p.Proto == "" {
			p.Proto = "tcp"
		}
		if p.ExposedPort <= 0 || p.ExposedPort > 65535 || p.HostPort < 0 || p.HostPort > 65535 {
			w.port(p.ExposedPort, p.Proto, "invalid port (host port %d); binding skipped", p.HostPort)
			continue
		}
		k := key{p.ExposedPort, p.Proto}
		cur, seen := best[k]
		if !seen {
			order = append(order, k)
			best[k] = p
			continue
		}
		if bindingRank(p) < bindingRank(cur) {
			best[k] = p
		}
	}
	sort.Slice(order, func(i, j int) bool {
		if order[i].port != order[j].port {
			return order[i].port < order[j].port
		}
		return order[i].proto < order[j].proto
	})
	out := make([]Port, 0, len(order))
	for _, k := range order {
		out = append(out, best[k])
	}
	return out
}

// bindingRank orders the bindings of one port, lowest preferred.
func bindingRank(p Port) int {
	rank := 0
	if p.HostPort == 0 {
		rank += 2
	}
	if ip := net.ParseIP(p.HostIP); ip != nil && ip.To4() == nil {
		rank++ // IPv6
	}
	return rank
}

// imageBaseName is the image's last path element without tag or digest:
// "registry:5000/team/app:1.0@sha256:..." gives "app".
func imageBaseName(image string) string {
	if i := strings.Index(image, "@"); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndex(image, "/"); i >= 0 {
		image = image[i+1:]
	}
	if i := strings.Index(image, ":"); i >= 0 {
		image = image[:i]
	}
	return image
}

// serviceAddress is where the service is reached: the binding (or -ip, or the default IP when the binding is
// on every address) and the host port; with -internal the container's IP and the exposed port. A
// non-empty -useIpFromLabel label replaces the address in both cases, as in Registrator.
func serviceAddress(c Container, o Options, p Port, w *warner) (string, int) {
	var addr string
	var port int
	if o.Internal {
		addr, port = c.IP, p.ExposedPort
	} else {
		addr, port = p.HostIP, p.HostPort
		if o.HostIP != "" {
			addr = o.HostIP
		}
	}
	if addr == "" || isUnspecified(addr) {
		addr = o.DefaultIP
	}
	if o.UseIPFromLabel != "" {
		if v := c.Labels[o.UseIPFromLabel]; v != "" {
			if i := strings.LastIndex(v, "/"); i >= 0 {
				v = v[:i]
			}
			addr = v
		} else {
			w.port(p.ExposedPort, p.Proto, "label %q (-useIpFromLabel) is not set; using %q", o.UseIPFromLabel, addr)
		}
	}
	return addr, port
}

func isUnspecified(addr string) bool {
	ip := net.ParseIP(addr)
	return ip != nil && ip.IsUnspecified()
}

// splitTags reads a SERVICE_TAGS list: commas separate, "\," is a comma inside a tag.
func splitTags(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && i+1 < len(s) && s[i+1] == ',':
			cur.WriteByte(',')
			i++
		case s[i] == ',':
			out = append(out, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(s[i])
		}
	}
	return append(out, cur.String())
}

// joinTags joins lists of tags in order, trimmed, without empty ones or duplicates; nil when none.
func joinTags(lists ...[]string) []string {
	var out []string
	seen := map[string]bool{}
	for _, list := range lists {
		for _, t := range list {
			t = strings.TrimSpace(t)
			if t == "" || seen[t] {
				continue
			}
			seen[t] = true
			out = append(out, t)
		}
	}
	return out
}

// serviceMeta is the service metadata: every key but name, id and tags, within Consul's limits; nil when none.
func serviceMeta(md map[string]string, p Port, w *warner) map[string]string {
	keys := make([]string, 0, len(md))
	for k := range md {
		switch k {
		case "name", "id", "tags":
			continue
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out map[string]string
	for _, k := range keys {
		v := md[k]
		switch {
		case !validMetaKey.MatchString(k):
			w.port(p.ExposedPort, p.Proto, "meta key %q is not made of a-z 0-9 _ -; key skipped", k)
		case len(k) > metaKeyMaxLen:
			w.port(p.ExposedPort, p.Proto, "meta key %q is longer than %d characters; key skipped", k, metaKeyMaxLen)
		case strings.HasPrefix(k, metaReservedPfx):
			w.port(p.ExposedPort, p.Proto, "meta key %q: the prefix %q is reserved by Consul; key skipped", k, metaReservedPfx)
		case len(v) > metaValueMaxLen:
			w.port(p.ExposedPort, p.Proto, "meta key %q: value longer than %d bytes; key skipped", k, metaValueMaxLen)
		case len(out) >= metaMaxPairs:
			w.port(p.ExposedPort, p.Proto, "meta key %q: more than %d keys; key skipped", k, metaMaxPairs)
		default:
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// serviceCheck is the Consul check from the check_* keys; nil when there is none. The first of check_http,
// check_https, check_tcp, check_grpc, check_ttl and check_script that is set wins.
func serviceCheck(md map[string]string, addr string, port int, p Port, w *warner) *Check {
	hostPort := net.JoinHostPort(addr, strconv.Itoa(port)) // brackets around IPv6 addresses
	needsAddr := func(key string) bool {
		if addr == "" {
			w.port(p.ExposedPort, p.Proto, "%s: the service has no address to check; check skipped", key)
			return false
		}
		return true
	}
	var ch Check
	switch {
	case md["check_http"] != "":
		if !needsAddr("check_http") {
			return nil
		}
		ch.HTTP = "http://" + hostPort + md["check_http"]
		ch.Method = md["check_http_method"]
	case md["check_https"] != "":
		if !needsAddr("check_https") {
			return nil
		}
		ch.HTTP = "https://" + hostPort + md["check_https"]
		ch.Method = md["check_https_method"]
		// The address is an IP, which a certificate rarely names: do not verify it.
		ch.TLSSkipVerify = true
	case md["check_tcp"] != "":
		if !needsAddr("check_tcp") {
			return nil
		}
		ch.TCP = hostPort
	case md["check_grpc"] != "":
		if !needsAddr("check_grpc") {
			return nil
		}
		ch.GRPC = hostPort
		if v := md["check_grpc"]; v != "true" {
			ch.GRPC += "/" + v
		}
	case md["check_ttl"] != "":
		if !validDuration(md["check_ttl"]) {
			w.port(p.ExposedPort, p.Proto, "check_ttl %q is not a positive duration; check skipped", md["check_ttl"])
			return nil
		}
		ch.TTL = md["check_ttl"]
	case md["check_script"] != "":
		script := strings.ReplaceAll(md["check_script"], "$SERVICE_IP", addr)
		script = strings.ReplaceAll(script, "$SERVICE_PORT", strconv.Itoa(port))
		ch.Args = []string{"sh", "-c", script}
	default:
		return nil
	}

	duration := func(key string) string {
		v := md[key]
		if v == "" {
			return ""
		}
		if !validDuration(v) {
			w.port(p.ExposedPort, p.Proto, "%s %q is not a positive duration; key skipped", key, v)
			return ""
		}
		return v
	}
	if ch.TTL == "" {
		ch.Interval = defaultInterval
		if v := md["check_interval"]; validDuration(v) {
			ch.Interval = v
		} else if v != "" {
			w.port(p.ExposedPort, p.Proto, "check_interval %q is not a positive duration; using %s", v, defaultInterval)
		}
		ch.Timeout = duration("check_timeout")
	}
	ch.DeregisterAfter = duration("check_deregister_after")
	switch v := md["check_initial_status"]; v {
	case "", "passing", "warning", "critical":
		ch.InitialStatus = v
	default:
		w.port(p.ExposedPort, p.Proto, "check_initial_status %q is not passing, warning or critical; key skipped", v)
	}
	return &ch
}

func validDuration(s string) bool {
	d, err := time.ParseDuration(s)
	return err == nil && d > 0
}

// warner collects the warnings of one container.
type warner struct {
	container string
	list      []string
}

func (w *warner) port(port int, proto, format string, args ...any) {
	w.list = append(w.list, fmt.Sprintf("container %s port %d/%s: ", w.container, port, proto)+fmt.Sprintf(format, args...))
}

// containerLabel names a container in warnings: its name, and the short ID.
func containerLabel(c Container) string {
	id := c.ID
	if len(id) > 12 {
		id = id[:12]
	}
	name := strings.TrimPrefix(c.Name, "/")
	switch {
	case name == "":
		return id
	case id == "":
		return name
	}
	return name + " (" + id + ")"
}
