package route

import (
	"errors"
	"net/url"
	"reflect"
	"strings"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/route/routetest"
)

func TestFromQueryRefusesBadInput(t *testing.T) {
	for _, tc := range routetest.BadQueries() {
		t.Run(tc.Name, func(t *testing.T) {
			q, err := url.ParseQuery(tc.Query)
			if err != nil {
				t.Fatal(err)
			}
			_, err = FromQuery(q)
			var pe *ParamError
			if !errors.As(err, &pe) {
				t.Fatalf("FromQuery(%q) = %v, want a ParamError", tc.Query, err)
			}
			if pe.Param != tc.Param {
				t.Fatalf("FromQuery(%q) names %q (%v), want %q", tc.Query, pe.Param, err, tc.Param)
			}
			if !strings.Contains(err.Error(), tc.Param) || pe.Reason == "" {
				t.Fatalf("message %q does not name the parameter and a reason", err)
			}
		})
	}
}

func TestFromQueryAcceptsTheOriginalsRequests(t *testing.T) {
	tests := []struct {
		query string
		want  Route
	}{
		{"serviceName=books-ms&servicePath=/api/v1/books",
			Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: PathBeg}},
		{"serviceName=go-demo&servicePath=/demo,/other&serviceColor=blue&serviceDomain=a.example.com,B.example.com&pathType=path_dir&skipCheck=true",
			Route{ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"},
				ServiceDomain: []string{"a.example.com", "B.example.com"}, PathType: PathDir, SkipCheck: true}},
		{"serviceName=x&servicePath=/a&servicePath=/b&distribute=true",
			Route{ServiceName: "x", ServicePath: []string{"/a", "/b"}, PathType: PathBeg}},
		{"serviceName=api_v2.internal&servicePath=^/v[0-9]%2B/items$&pathType=path_reg",
			Route{ServiceName: "api_v2.internal", ServicePath: []string{"^/v[0-9]+/items$"}, PathType: PathReg}},
		{"serviceName=s&servicePath=.json&pathType=path_end",
			Route{ServiceName: "s", ServicePath: []string{".json"}, PathType: PathEnd}},
		{"serviceName=s&servicePath=/a%2520b/~user/x:y@z&pathType=path",
			Route{ServiceName: "s", ServicePath: []string{"/a%20b/~user/x:y@z"}, PathType: Path}},
	}
	for _, tc := range tests {
		q, _ := url.ParseQuery(tc.query)
		got, err := FromQuery(q)
		if err != nil {
			t.Errorf("FromQuery(%q): %v", tc.query, err)
			continue
		}
		if !got.Equal(tc.want) {
			t.Errorf("FromQuery(%q) = %+v, want %+v", tc.query, got, tc.want)
		}
	}
}

func TestKVRoundTrip(t *testing.T) {
	r := Route{ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"},
		ServiceDomain: []string{"a.example.com"}, PathType: PathDir, SkipCheck: true}
	kv := r.KV()
	if kv["path"] != "/demo,/other" || kv["color"] != "blue" || kv["domain"] != "a.example.com" ||
		kv["pathtype"] != "path_dir" || kv["skipcheck"] != "true" {
		t.Fatalf("KV layout = %v", kv)
	}
	back, err := FromKV("go-demo", kv)
	if err != nil || !back.Equal(r) {
		t.Fatalf("FromKV = %+v, %v; want %+v", back, err, r)
	}
}

func TestFromKVReadsTheOriginalsKeysAndRefusesInjection(t *testing.T) {
	r, err := FromKV("books-ms", map[string]string{"path": "/api/v1/books", "skipcheck": "false", "consultemplatefepath": ""})
	if err != nil || r.PathType != PathBeg || r.ServicePath[0] != "/api/v1/books" {
		t.Fatalf("FromKV of the original's keys = %+v, %v", r, err)
	}
	if _, err := FromKV("books-ms", map[string]string{"path": "/api\nbackend evil"}); err == nil {
		t.Fatal("a path with a newline in KV was accepted")
	}
	if _, err := FromKV("books ms", map[string]string{"path": "/api"}); err == nil {
		t.Fatal("a folder name with a space was accepted as a service name")
	}
}

func TestFromQueryReadsTheOptions(t *testing.T) {
	const base = "serviceName=s&servicePath=/a&"
	simple := func(r Route) Route {
		r.ServiceName, r.ServicePath, r.PathType = "s", []string{"/a"}, PathBeg
		return r
	}
	tests := []struct {
		query string
		want  Route
	}{
		{"reqPathSearch=/http/&reqPathReplace=/renamed/", simple(Route{ReqPathSearch: "/http/", ReqPathReplace: "/renamed/"})},
		{"reqPathSearch=" + url.QueryEscape(`^/vote/(.*)\.json$`) + "&reqPathReplace=" + url.QueryEscape(`/v%201/\1`),
			simple(Route{ReqPathSearch: `^/vote/(.*)\.json$`, ReqPathReplace: `/v%201/\1`})},
		{"users=alice:secret,bob:p@ss:w%25rd!&users=carol:x", simple(Route{Users: []User{
			{"alice", "secret"}, {"bob", "p@ss:w%rd!"}, {"carol", "x"}}})},
		{"users=alice:" + url.QueryEscape(routetest.Hash) + "&usersPassEncrypted=true",
			simple(Route{Users: []User{{"alice", routetest.Hash}}, UsersPassEncrypted: true})},
		{"users=alice:a&usersPassEncrypted=false", simple(Route{Users: []User{{"alice", "a"}}})},
		{"httpsOnly=true&redirectWhenHttpProto=true&xForwardedProto=1", simple(Route{HTTPSOnly: true, RedirectWhenHTTPProto: true, XForwardedProto: true})},
		{"httpsOnly=false", simple(Route{})},
		// Name:value, the original's "Name value", spaces around both dropped.
		{"addHeader=X-A:1,X-B: two words ,X-C three:3&setHeader=X-Set:a=b%3Bc&addHeader=X-D:d",
			simple(Route{AddHeader: []Header{{"X-A", "1"}, {"X-B", "two words"}, {"X-C", "three:3"}, {"X-D", "d"}},
				SetHeader: []Header{{"X-Set", "a=b;c"}}})},
		{"timeoutServer=5&timeoutTunnel=86400", simple(Route{TimeoutServer: 5, TimeoutTunnel: 86400})},
		{"aclName=05-first.rule_x", simple(Route{ACLName: "05-first.rule_x"})},
		{"serviceDomain=a.com,b.org&serviceDomainMatchAll=true",
			simple(Route{ServiceDomain: []string{"a.com", "b.org"}, ServiceDomainMatchAll: true})},
		{"outboundHostname=internal.example.com", simple(Route{OutboundHostname: "internal.example.com"})},
		// Empty values are unset parameters, as the original's pipelines send them.
		{"users=&usersPassEncrypted=&httpsOnly=&timeoutServer=&aclName=&addHeader=", simple(Route{})},
	}
	for _, tc := range tests {
		q, err := url.ParseQuery(base + tc.query)
		if err != nil {
			t.Fatal(err)
		}
		got, err := FromQuery(q)
		if err != nil {
			t.Errorf("FromQuery(%q): %v", tc.query, err)
			continue
		}
		if !got.Equal(tc.want) {
			t.Errorf("FromQuery(%q) = %+v, want %+v", tc.query, got, tc.want)
		}
	}
}

func TestBadPasswordsAreNotRepeatedInMessages(t *testing.T) {
	for _, users := range []string{"alice:sec%20ret", "alice:sec%0Aret", "sec%22ret", "alice:sec$ret"} {
		q, _ := url.ParseQuery("serviceName=s&servicePath=/a&users=" + users)
		_, err := FromQuery(q)
		if err == nil || strings.Contains(err.Error(), "sec") {
			t.Errorf("users=%s: %v", users, err)
		}
	}
}

// everything sets every field of a route.
func everything() Route {
	return Route{
		ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"},
		ServiceDomain: []string{"a.example.com"}, PathType: PathDir, SkipCheck: true,
		ServiceDomainMatchAll: true, ACLName: "05-demo",
		HTTPSOnly: true, RedirectWhenHTTPProto: true,
		Users: []User{{"alice", routetest.Hash}, {"bob", routetest.Hash}}, UsersPassEncrypted: true,
		ReqPathSearch: `^/demo/(.*)$`, ReqPathReplace: `/%20\1`, OutboundHostname: "internal.example.com",
		XForwardedProto: true,
		AddHeader:       []Header{{"X-A", "one two"}, {"X-A", "three:3"}},
		SetHeader:       []Header{{"X-Set", "a=b;c"}},
		TimeoutServer:   30, TimeoutTunnel: 3600,
		Port: 8080, ReqMode: ModeHTTP,
		Dests: []Dest{
			{Index: 1, ServicePath: []string{"/metrics"}, PathType: PathBeg, Port: 9000},
			{Index: 2, ReqMode: ModeTCP, SrcPort: 6379, Port: 6379, PathType: PathBeg},
		},
		TemplateFePath: "fe/demo.tmpl", TemplateBePath: "demo-be.tmpl",
	}
}

func TestKVRoundTripOfEveryOption(t *testing.T) {
	r := everything()
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"path": "/demo,/other", "color": "blue", "domain": "a.example.com", "pathtype": "path_dir", "skipcheck": "true",
		"servicedomainmatchall": "true", "aclname": "05-demo", "httpsonly": "true", "redirectwhenhttpproto": "true",
		"users": "alice:" + routetest.Hash + ",bob:" + routetest.Hash, "userspassencrypted": "true",
		"reqpathsearch": `^/demo/(.*)$`, "reqpathreplace": `/%20\1`, "outboundhostname": "internal.example.com",
		"xforwardedproto": "true", "addheader": "X-A:one two,X-A:three:3", "setheader": "X-Set:a=b;c",
		"timeoutserver": "30", "timeouttunnel": "3600", "port": "8080",
		"path.1": "/metrics", "pathtype.1": "path_beg", "port.1": "9000",
		"srcport.2": "6379", "port.2": "6379", "reqmode.2": "tcp",
		"templatefepath": "fe/demo.tmpl", "templatebepath": "demo-be.tmpl",
	}
	if kv := r.KV(); !reflect.DeepEqual(kv, want) {
		t.Fatalf("KV layout = %v\nwant %v", kv, want)
	}
	back, err := FromKV("go-demo", r.KV())
	if err != nil || !back.Equal(r) {
		t.Fatalf("FromKV = %+v, %v; want %+v", back, err, r)
	}
	// Unset options write no key.
	plain := Route{ServiceName: "s", ServicePath: []string{"/a"}, PathType: PathBeg}
	if kv := plain.KV(); len(kv) != 3 {
		t.Fatalf("a route without options wrote %v", kv)
	}
}

func TestFromKVValidatesTheOptions(t *testing.T) {
	base := func(k, v string) map[string]string { return map[string]string{"path": "/a", k: v} }
	for _, kv := range []map[string]string{
		base("timeoutserver", "abc"), base("timeoutserver", "0"), base("timeouttunnel", "86401"),
		base("httpsonly", "yes"), base("users", "alice:pw\nbackend evil"), base("users", "alice:$HOME"),
		base("userspassencrypted", "true"), base("reqpathsearch", "/a"), base("reqpathreplace", "/b"),
		base("addheader", "X-A:%[src]"), base("setheader", "X-A:a'b"), base("aclname", "a b"),
		base("servicedomainmatchall", "true"), base("outboundhostname", "a b"),
		{"path": "/a", "reqpathsearch": "/a(", "reqpathreplace": "/"},
		{"path": "/a", "users": "alice:secret", "userspassencrypted": "true"},
	} {
		if r, err := FromKV("s", kv); err == nil {
			t.Errorf("FromKV(%q) = %+v, want an error", kv, r)
		}
	}
	// Values written by hand with spaces around them are read.
	r, err := FromKV("s", map[string]string{"path": "/a", "timeoutserver": " 5\n", "httpsonly": "true "})
	if err != nil || r.TimeoutServer != 5 || !r.HTTPSOnly {
		t.Fatalf("FromKV with spaces = %+v, %v", r, err)
	}
}

// Equal must see every field: changing any one makes routes differ.
func TestEqualComparesEveryField(t *testing.T) {
	a := everything()
	v := reflect.ValueOf(&a).Elem()
	for i := 0; i < v.NumField(); i++ {
		b := everything()
		f := reflect.ValueOf(&b).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Int:
			f.SetInt(f.Int() + 1)
		case reflect.Slice:
			f.Set(f.Slice(0, f.Len()-1))
		default:
			t.Fatalf("field %s: kind %s not covered by this test", v.Type().Field(i).Name, f.Kind())
		}
		if a.Equal(b) {
			t.Errorf("Equal does not compare %s", v.Type().Field(i).Name)
		}
	}
	if !a.Equal(everything()) {
		t.Error("a route is not equal to itself")
	}
}

func TestParseUsersOfTheServer(t *testing.T) {
	users, err := ParseUsers("admin:clear,ops:" + routetest.Hash)
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 2 || users[0].Hashed() || !users[1].Hashed() || users[1].Password != routetest.Hash {
		t.Fatalf("ParseUsers = %+v", users)
	}
	if users, err := ParseUsers(""); err != nil || users != nil {
		t.Fatalf("ParseUsers(\"\") = %v, %v", users, err)
	}
	for _, bad := range []string{"admin", "admin:", "ad min:x", "admin:a b", "admin:$6$bad", "admin:x,admin:y", "admin:x\n"} {
		if _, err := ParseUsers(bad); err == nil || !strings.Contains(err.Error(), "USERS") {
			t.Errorf("ParseUsers(%q) = %v, want an error naming USERS", bad, err)
		}
	}
}

func TestHashedTellsHashesFromPasswords(t *testing.T) {
	rounds := strings.Replace(routetest.Hash, "$6$", "$6$rounds=5000$", 1)
	for pw, want := range map[string]bool{routetest.Hash: true, rounds: true, "secret": false, "$6$x": false,
		strings.Replace(routetest.Hash, "$6$", "$1$", 1): false, routetest.Hash + "x": false} {
		if got := (User{"u", pw}).Hashed(); got != want {
			t.Errorf("Hashed(%q) = %v", pw, got)
		}
	}
}
