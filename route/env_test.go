package route

import (
	"reflect"
	"strings"
	"testing"
)

func TestFromEnvReadsServices(t *testing.T) {
	routes, err := FromEnv([]string{
		"PATH=/usr/bin",
		"DFP_SERVICE_SERVICE_NAME=books-ms",
		"DFP_SERVICE_SERVICE_PATH=/api/v1/books",
		"DFP_SERVICE_REQ_PATH_SEARCH=/api/",
		"DFP_SERVICE_REQ_PATH_REPLACE=/",
		"DFP_SERVICE_SERVICE_PATH_1=/admin",
		"DFP_SERVICE_PORT_1=9000",
		"DFP_SERVICE_2_SERVICE_NAME=legacy",
		"DFP_SERVICE_2_SERVICE_PATH=/legacy",
		"DFP_SERVICE_2_SERVICE_DOMAIN_MATCH_ALL=true",
		"DFP_SERVICE_2_SERVICE_DOMAIN=example.com",
		"DFP_SERVICE_2_INSTANCES=10.0.0.5:8080, legacy.internal:80",
		"DFP_SERVICE_1_SERVICE_NAME=",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 2 {
		t.Fatalf("FromEnv = %+v, want 2 routes", routes)
	}
	books, legacy := routes[0], routes[1]
	if books.Route.ServiceName != "books-ms" || books.Route.ReqPathReplace != "/" || books.Instances != nil ||
		len(books.Route.Dests) != 1 || books.Route.Dests[0].Port != 9000 {
		t.Errorf("books-ms = %+v", books)
	}
	if !legacy.Route.ServiceDomainMatchAll || !reflect.DeepEqual(legacy.Instances,
		[]Instance{{Address: "10.0.0.5", Port: 8080}, {Address: "legacy.internal", Port: 80}}) {
		t.Errorf("legacy = %+v", legacy)
	}
}

func TestFromEnvNamesTheBadVariable(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"DFP_SERVICE_SERVICE_NAME=a", "DFP_SERVICE_SERVICE_PATH=/a b"}, "DFP_SERVICE_*: parameter servicePath"},
		{[]string{"DFP_SERVICE_3_SERVICE_NAME=a"}, "DFP_SERVICE_3_*: parameter servicePath: is required"},
		{[]string{"DFP_SERVICE_0_SERVICE_NAME=a"}, "DFP_SERVICE_0_SERVICE_NAME"},
		{[]string{"DFP_SERVICE_SERVICE__PATH=/a"}, "DFP_SERVICE_SERVICE__PATH"},
		{[]string{"DFP_SERVICE_SERVICE_NAME=a", "DFP_SERVICE_SERVICE_PATH=/a", "DFP_SERVICE_INSTANCES=10.0.0.1"}, "parameter instances"},
		{[]string{"DFP_SERVICE_SERVICE_NAME=a", "DFP_SERVICE_SERVICE_PATH=/a", "DFP_SERVICE_INSTANCES=bad#host:80"}, "parameter instances"},
		{[]string{"DFP_SERVICE_1_SERVICE_NAME=a", "DFP_SERVICE_1_SERVICE_PATH=/a", "DFP_SERVICE_2_SERVICE_NAME=a", "DFP_SERVICE_2_SERVICE_PATH=/b"}, "both define service a"},
	} {
		_, err := FromEnv(tc.env)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("FromEnv(%q) = %v, want an error containing %q", tc.env, err, tc.want)
		}
	}
}
