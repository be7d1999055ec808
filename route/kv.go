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

	KeyServiceDomainMatchAll = "servicedomainmatchall"
	KeyACLName               = "aclname"
	KeyHTTPSOnly             = "httpsonly"
	KeyRedirectWhenHTTPProto = "redirectwhenhttpproto"
	KeyUsers                 = "users"
	KeyUsersPassEncrypted    = "userspassencrypted"
	KeyReqPathSearch         = "reqpathsearch"
	KeyReqPathReplace        = "reqpathreplace"
	KeyOutboundHostname      = "outboundhostname"
	KeyXForwardedProto       = "xforwardedproto"
	KeyAddHeader             = "addheader"
	KeySetHeader             = "setheader"
	KeyTimeoutServer         = "timeoutserver"
	KeyTimeoutTunnel         = "timeouttunnel"
)

// optionKeys maps the optional parameters to their KV keys: the parameter's name in lower case.
var optionKeys = map[string]string{
	ParamServiceDomainMatchAll: KeyServiceDomainMatchAll,
	ParamACLName:               KeyACLName,
	ParamHTTPSOnly:             KeyHTTPSOnly,
	ParamRedirectWhenHTTPProto: KeyRedirectWhenHTTPProto,
	ParamUsers:                 KeyUsers,
	ParamUsersPassEncrypted:    KeyUsersPassEncrypted,
	ParamReqPathSearch:         KeyReqPathSearch,
	ParamReqPathReplace:        KeyReqPathReplace,
	ParamOutboundHostname:      KeyOutboundHostname,
	ParamXForwardedProto:       KeyXForwardedProto,
	ParamAddHeader:             KeyAddHeader,
	ParamSetHeader:             KeySetHeader,
	ParamTimeoutServer:         KeyTimeoutServer,
	ParamTimeoutTunnel:         KeyTimeoutTunnel,
}

// KV returns the route as key/value pairs, one readable key per field, relative to its service folder.
// Optional fields that are unset are left out.
func (r Route) KV() map[string]string {
	kv := map[string]string{
		KeyPath:      strings.Join(r.ServicePath, ","),
		KeyPathType:  string(r.PathType),
		KeySkipCheck: strconv.FormatBool(r.SkipCheck),
	}
	set := func(key, v string) {
		if v != "" {
			kv[key] = v
		}
	}
	setBool := func(key string, b bool) {
		if b {
			kv[key] = "true"
		}
	}
	setSeconds := func(key string, n int) {
		if n != 0 {
			kv[key] = strconv.Itoa(n)
		}
	}
	set(KeyColor, r.ServiceColor)
	set(KeyDomain, strings.Join(r.ServiceDomain, ","))
	setBool(KeyServiceDomainMatchAll, r.ServiceDomainMatchAll)
	set(KeyACLName, r.ACLName)
	setBool(KeyHTTPSOnly, r.HTTPSOnly)
	setBool(KeyRedirectWhenHTTPProto, r.RedirectWhenHTTPProto)
	set(KeyUsers, joinUsers(r.Users))
	setBool(KeyUsersPassEncrypted, r.UsersPassEncrypted)
	set(KeyReqPathSearch, r.ReqPathSearch)
	set(KeyReqPathReplace, r.ReqPathReplace)
	set(KeyOutboundHostname, r.OutboundHostname)
	setBool(KeyXForwardedProto, r.XForwardedProto)
	set(KeyAddHeader, joinHeaders(r.AddHeader))
	set(KeySetHeader, joinHeaders(r.SetHeader))
	setSeconds(KeyTimeoutServer, r.TimeoutServer)
	setSeconds(KeyTimeoutTunnel, r.TimeoutTunnel)
	return kv
}

func joinUsers(us []User) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = u.Name + ":" + u.Password
	}
	return strings.Join(s, ",")
}

func joinHeaders(hs []Header) string {
	s := make([]string, len(hs))
	for i, h := range hs {
		s[i] = h.Name + ":" + h.Value
	}
	return strings.Join(s, ",")
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
	err := r.parseOptions(func(param string) string { return strings.TrimSpace(kv[optionKeys[param]]) })
	if err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	if err := r.Validate(); err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	return r, nil
}
