package haproxy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// mapName is the name of a map file the renderer writes: routes-<hash>.map.
var mapName = regexp.MustCompile(`^routes-[0-9a-f]{16}\.map$`)

// mapsOf reads the map files a config carries at its end (MapMarker): file path to content.
func mapsOf(cfg []byte) map[string][]byte {
	bufs := map[string]*bytes.Buffer{}
	var cur *bytes.Buffer
	for _, line := range strings.Split(string(cfg), "\n") {
		switch {
		case strings.HasPrefix(line, MapMarker+" "):
			cur = &bytes.Buffer{}
			bufs[strings.TrimPrefix(line, MapMarker+" ")] = cur
		case cur != nil && strings.HasPrefix(line, MapEntryPrefix):
			cur.WriteString(strings.TrimPrefix(line, MapEntryPrefix))
			cur.WriteByte('\n')
		default:
			cur = nil
		}
	}
	out := make(map[string][]byte, len(bufs))
	for path, b := range bufs {
		out[path] = b.Bytes()
	}
	return out
}

// writeMaps writes the map files that cfg carries into Dir/maps, before HAProxy reads cfg. A file
// is named after a hash of its content, so one that exists already is left as it is. A config that
// names a map elsewhere is refused.
func (p *Process) writeMaps(cfg []byte) error {
	if !bytes.Contains(cfg, []byte("\n"+MapMarker+" ")) {
		return nil
	}
	maps := mapsOf(cfg)
	dir := filepath.Join(p.dir, "maps")
	for path, content := range maps {
		if filepath.Dir(path) != dir || !mapName.MatchString(filepath.Base(path)) {
			return fmt.Errorf("map file %s is not a map of %s", path, dir)
		}
		if _, err := os.Stat(path); err == nil {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("write map: %w", err)
		}
		f, err := os.CreateTemp(dir, ".routes-*.map")
		if err != nil {
			return fmt.Errorf("write map: %w", err)
		}
		_, err = f.Write(content)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(f.Name(), path)
		}
		if err != nil {
			os.Remove(f.Name())
			return fmt.Errorf("write map %s: %w", path, err)
		}
	}
	return nil
}

// pruneMaps removes the map files of Dir/maps that cfg, now served, does not name.
func (p *Process) pruneMaps(cfg []byte) {
	dir := filepath.Join(p.dir, "maps")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	keep := mapsOf(cfg)
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if _, used := keep[path]; used || !mapName.MatchString(e.Name()) {
			continue
		}
		if err := os.Remove(path); err != nil {
			p.log.Warn("haproxy: cannot remove an old map file", "path", path, "error", err)
		}
	}
}
