// Package routetest holds inputs shared by the tests of several packages.
package routetest

import "strings"

// BadQuery is a reconfigure query that must be refused, and the parameter the refusal must name.
type BadQuery struct{ Name, Query, Param string }

// BadQueries returns reconfigure queries that must be refused, with the parameter the refusal names.
// The API's integration test sends the same list through the real server.
func BadQueries() []BadQuery {
	return []BadQuery{
		{"no service name", "servicePath=/api", "serviceName"},
		{"empty service name", "serviceName=&servicePath=/api", "serviceName"},
		{"no path", "serviceName=books-ms", "servicePath"},
		{"empty path", "serviceName=books-ms&servicePath=", "servicePath"},
		{"empty item in path list", "serviceName=books-ms&servicePath=/a,,/b", "servicePath"},
		{"unknown path type", "serviceName=books-ms&servicePath=/api&pathType=path_sub", "pathType"},
		{"path type injection", "serviceName=books-ms&servicePath=/api&pathType=path_beg%0Abind", "pathType"},
		{"name with slash", "serviceName=books/ms&servicePath=/api", "serviceName"},
		{"name with space", "serviceName=books%20ms&servicePath=/api", "serviceName"},
		{"name with newline", "serviceName=books%0Ams&servicePath=/api", "serviceName"},
		{"name with dollar", "serviceName=$HOME&servicePath=/api", "serviceName"},
		{"name dot dot", "serviceName=..&servicePath=/api", "serviceName"},
		{"name too long", "serviceName=" + strings.Repeat("a", 129) + "&servicePath=/api", "serviceName"},
		{"color with space", "serviceName=books-ms&serviceColor=blue%20x&servicePath=/api", "serviceColor"},
		{"path with newline", "serviceName=books-ms&servicePath=/api%0Abackend%20x", "servicePath"},
		{"path with CR", "serviceName=books-ms&servicePath=/api%0D", "servicePath"},
		{"path with space", "serviceName=books-ms&servicePath=/api%20/x", "servicePath"},
		{"path with tab", "serviceName=books-ms&servicePath=/api%09x", "servicePath"},
		{"path with hash", "serviceName=books-ms&servicePath=/api%23comment", "servicePath"},
		{"path with dollar", "serviceName=books-ms&servicePath=/$HOME", "servicePath"},
		{"path with double quote", "serviceName=books-ms&servicePath=/a%22b", "servicePath"},
		{"path with single quote", "serviceName=books-ms&servicePath=/a'b", "servicePath"},
		{"path with backslash", "serviceName=books-ms&servicePath=/a%5Cb", "servicePath"},
		{"path with NUL", "serviceName=books-ms&servicePath=/a%00b", "servicePath"},
		{"path with non-ASCII", "serviceName=books-ms&servicePath=/caf%C3%A9", "servicePath"},
		{"path not absolute", "serviceName=books-ms&servicePath=api", "servicePath"},
		{"path like a flag", "serviceName=books-ms&servicePath=-i", "servicePath"},
		{"path with braces in path_beg", "serviceName=books-ms&servicePath=/a%7Bb%7D", "servicePath"},
		{"dollar inside a regex", "serviceName=books-ms&servicePath=^/a$b&pathType=path_reg", "servicePath"},
		{"bad regex", "serviceName=books-ms&servicePath=/a(b&pathType=path_reg", "servicePath"},
		{"path listed twice", "serviceName=books-ms&servicePath=/a,/a", "servicePath"},
		{"path too long", "serviceName=books-ms&servicePath=/" + strings.Repeat("a", 1024), "servicePath"},
		{"domain with space", "serviceName=books-ms&servicePath=/api&serviceDomain=a%20b.com", "serviceDomain"},
		{"domain with newline", "serviceName=books-ms&servicePath=/api&serviceDomain=a.com%0Ax", "serviceDomain"},
		{"domain with underscore", "serviceName=books-ms&servicePath=/api&serviceDomain=a_b.com", "serviceDomain"},
		{"domain with port", "serviceName=books-ms&servicePath=/api&serviceDomain=a.com:80", "serviceDomain"},
		{"domain empty label", "serviceName=books-ms&servicePath=/api&serviceDomain=a..com", "serviceDomain"},
		{"domain empty item", "serviceName=books-ms&servicePath=/api&serviceDomain=a.com,", "serviceDomain"},
		{"domain with hash", "serviceName=books-ms&servicePath=/api&serviceDomain=a.com%23", "serviceDomain"},
		{"domain with dollar", "serviceName=books-ms&servicePath=/api&serviceDomain=$X", "serviceDomain"},
		{"skipCheck not a boolean", "serviceName=books-ms&servicePath=/api&skipCheck=maybe", "skipCheck"},
		{"service name twice", "serviceName=a&serviceName=b&servicePath=/api", "serviceName"},
		{"unsupported parameter", "serviceName=books-ms&servicePath=/api&reqMode=tcp", "reqMode"},
		{"indexed destination", "serviceName=books-ms&servicePath=/api&servicePath.1=/other", "servicePath.1"},
	}
}
