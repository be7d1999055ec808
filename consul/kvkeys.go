package consul

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// The watch of the route table reads the whole prefix after every change of it (Consul has no
// cheaper way to tell which folders changed), but needs only each key's name and ModifyIndex. At
// 10,000 routes that listing is 6 MB of JSON: decoded by the api package into KV pairs it took some
// 100 ms of CPU per change on two cores, most of it in growing and copying fresh buffers. The
// watch therefore takes the body of that one request itself (bodySink), into a buffer it keeps
// from one query to the next, and parseKVEntries reads only what it needs. A read of the whole
// table (a new replica's load) does the same, values included.

// kvEntry is one key of a KV listing: its name, its value (when asked for) and its ModifyIndex.
type kvEntry struct {
	Key         string
	Value       []byte
	ModifyIndex uint64
}

// keyIndex is kvEntry without the value: what encoding/json reads when values are not asked for.
type keyIndex struct {
	Key         string
	ModifyIndex uint64
}

// parseKVEntries reads the keys, ModifyIndexes and, with values, the values of a KV listing (the
// answer to GET /v1/kv/<prefix>?recurse). Consul writes it as an array of flat objects without
// escapes in its strings: a strict scanner reads that shape, and anything else (an escaped
// character, a nested value, a field name that differs from one it reads in case only) goes to
// encoding/json, which gives the same result (FuzzParseKVEntries).
func parseKVEntries(b []byte, values bool) ([]kvEntry, error) {
	if out, ok := scanKVEntries(b, values); ok {
		return out, nil
	}
	var err error
	var out []kvEntry
	if values {
		err = json.Unmarshal(b, &out)
	} else {
		var keys []keyIndex
		err = json.Unmarshal(b, &keys)
		for _, k := range keys {
			out = append(out, kvEntry{Key: k.Key, ModifyIndex: k.ModifyIndex})
		}
	}
	if err != nil {
		return nil, fmt.Errorf("kv listing: %w", err)
	}
	return out, nil
}

// scanKVEntries is parseKVEntries' strict scanner: ok is false when b is not of the shape it reads
// (then encoding/json decides).
func scanKVEntries(b []byte, values bool) (out []kvEntry, ok bool) {
	s := kvScanner{b: b, values: values}
	s.space()
	if s.literal("null") {
		s.space()
		return nil, s.i == len(b)
	}
	if !s.byte('[') {
		return nil, false
	}
	out = make([]kvEntry, 0, len(b)/128+1) // Consul writes some 130 bytes per key
	s.space()
	if s.byte(']') {
		s.space()
		return out, s.i == len(b)
	}
	for {
		e, ok := s.object()
		if !ok {
			return nil, false
		}
		out = append(out, e)
		s.space()
		if s.byte(']') {
			break
		}
		if !s.byte(',') {
			return nil, false
		}
		s.space()
	}
	s.space()
	return out, s.i == len(b)
}

type kvScanner struct {
	b      []byte
	i      int
	values bool // read Value
}

func (s *kvScanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *kvScanner) byte(c byte) bool {
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

func (s *kvScanner) literal(l string) bool {
	if bytes.HasPrefix(s.b[s.i:], []byte(l)) {
		s.i += len(l)
		return true
	}
	return false
}

// str reads a string without escapes and returns its content; ok is false for anything else
// (a backslash, a control character or a byte that is not valid UTF-8 in it, which encoding/json
// would turn into U+FFFD).
func (s *kvScanner) str() (v []byte, ok bool) {
	if !s.byte('"') {
		return nil, false
	}
	start := s.i
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			v = s.b[start:s.i]
			s.i++
			return v, true
		case c == '\\' || c < 0x20 || c >= 0x80:
			return nil, false
		}
		s.i++
	}
	return nil, false
}

// number reads a JSON number (-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?) and returns its
// text.
func (s *kvScanner) number() (v []byte, ok bool) {
	start := s.i
	s.byte('-')
	switch {
	case s.byte('0'):
	case s.digits() == 0:
		return nil, false
	}
	if s.byte('.') && s.digits() == 0 {
		return nil, false
	}
	if s.byte('e') || s.byte('E') {
		if !s.byte('+') {
			s.byte('-')
		}
		if s.digits() == 0 {
			return nil, false
		}
	}
	return s.b[start:s.i], true
}

// digits skips decimal digits and returns how many.
func (s *kvScanner) digits() int {
	start := s.i
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
	}
	return s.i - start
}

// object reads one flat object: its Key (a string), ModifyIndex (an unsigned integer) and, with
// values, Value (base64 in a string, or null); other fields must be strings, numbers, true, false
// or null. Key and ModifyIndex must be there once, Value at most once.
func (s *kvScanner) object() (e kvEntry, ok bool) {
	if !s.byte('{') {
		return e, false
	}
	var haveKey, haveIndex, haveValue bool
	s.space()
	if s.byte('}') {
		return e, false
	}
	for {
		s.space()
		name, ok := s.str()
		if !ok {
			return e, false
		}
		s.space()
		if !s.byte(':') {
			return e, false
		}
		s.space()
		switch {
		case string(name) == "Key":
			v, ok := s.str()
			if !ok || haveKey {
				return e, false
			}
			e.Key, haveKey = string(v), true
		case string(name) == "ModifyIndex":
			v, ok := s.number()
			if !ok || haveIndex {
				return e, false
			}
			n, err := strconv.ParseUint(string(v), 10, 64)
			if err != nil {
				return e, false
			}
			e.ModifyIndex, haveIndex = n, true
		case s.values && string(name) == "Value":
			if haveValue {
				return e, false
			}
			haveValue = true
			if s.literal("null") {
				break
			}
			v, ok := s.str()
			if !ok {
				return e, false
			}
			e.Value = make([]byte, base64.StdEncoding.DecodedLen(len(v)))
			n, err := base64.StdEncoding.Decode(e.Value, v)
			if err != nil {
				return e, false
			}
			e.Value = e.Value[:n]
		case strings.EqualFold(string(name), "Key"), strings.EqualFold(string(name), "ModifyIndex"),
			s.values && strings.EqualFold(string(name), "Value"):
			return e, false // encoding/json matches field names without regard to case
		default:
			if !s.skipValue() {
				return e, false
			}
		}
		s.space()
		if s.byte('}') {
			return e, haveKey && haveIndex
		}
		if !s.byte(',') {
			return e, false
		}
	}
}

// skipValue skips a string, a number, true, false or null.
func (s *kvScanner) skipValue() bool {
	if s.i >= len(s.b) {
		return false
	}
	switch c := s.b[s.i]; {
	case c == '"':
		_, ok := s.str()
		return ok
	case c == '-' || c >= '0' && c <= '9':
		_, ok := s.number()
		return ok
	default:
		return s.literal("null") || s.literal("true") || s.literal("false")
	}
}

// bodySinkKey marks a request whose answer's body, when it is 200, bodySink reads into a buffer.
type bodySinkKey struct{}

// withBodySink makes the request of ctx hand its 200 answer's body to buf (emptied first) instead
// of the api package, which then reads JSON null.
func withBodySink(ctx context.Context, buf *bytes.Buffer) context.Context {
	return context.WithValue(ctx, bodySinkKey{}, buf)
}

// bodySink is the transport that serves withBodySink: the api package still builds the request
// (address, token, query options) and reads the answer's status and headers (X-Consul-Index).
type bodySink struct{ base http.RoundTripper }

func (t bodySink) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	buf, ok := req.Context().Value(bodySinkKey{}).(*bytes.Buffer)
	if err != nil || !ok || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	buf.Reset()
	_, err = buf.ReadFrom(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("reading the answer to %s: %w", req.URL.Path, err)
	}
	resp.Body = io.NopCloser(strings.NewReader("null"))
	resp.ContentLength = 4
	return resp, nil
}
