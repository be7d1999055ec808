package route

import (
	"errors"
	"net/url"
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
