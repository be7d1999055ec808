package route

import (
	"fmt"
	"strconv"
	"strings"
)

// KV key names under <instance>/<service>/, the original product's readable layout.
const (
	KeyPath      = "path"
	KeyColor     = "color"
	KeyDomain    = "domain"
	KeyPathType  = "pathtype"
	KeySkipCheck = "skipcheck"
)

// KV returns the route as key/value pairs, one readable key per field, relative to its service folder.
// Optional fields that are unset are left out.
func (r Route) KV() map[string]string {
	kv := map[string]string{
		KeyPath:      strings.Join(r.ServicePath, ","),
		KeyPathType:  string(r.PathType),
		KeySkipCheck: strconv.FormatBool(r.SkipCheck),
	}
	if r.ServiceColor != "" {
		kv[KeyColor] = r.ServiceColor
	}
	if len(r.ServiceDomain) > 0 {
		kv[KeyDomain] = strings.Join(r.ServiceDomain, ",")
	}
	return kv
}

// FromKV rebuilds a route from its service folder's keys, as written by KV or by the original
// product, and validates it: a hand-edited key cannot reach haproxy.cfg either.
func FromKV(serviceName string, kv map[string]string) (Route, error) {
	r := Route{
		ServiceName:  serviceName,
		ServiceColor: strings.TrimSpace(kv[KeyColor]),
		PathType:     PathType(strings.TrimSpace(kv[KeyPathType])),
	}
	if p := kv[KeyPath]; p != "" {
		r.ServicePath = strings.Split(p, ",")
	}
	if d := kv[KeyDomain]; d != "" {
		r.ServiceDomain = strings.Split(d, ",")
	}
	if r.PathType == "" {
		r.PathType = DefaultPathType
	}
	if v := strings.TrimSpace(kv[KeySkipCheck]); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return Route{}, fmt.Errorf("route %s: key %s: %q is not a boolean", serviceName, KeySkipCheck, v)
		}
		r.SkipCheck = b
	}
	if err := r.Validate(); err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	return r, nil
}
