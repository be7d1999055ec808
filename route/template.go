package route

import (
	"regexp"
	"strings"
)

// MaxTemplatePathLength bounds a template's path.
const MaxTemplatePathLength = 256

// A template path: relative, made of plain names. The server also resolves it inside its templates
// folder (symbolic links included) before it reads the file.
var templatePathPattern = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$`)

// parseTemplates reads templateFePath and templateBePath, or the original's consulTemplateFePath and
// consulTemplateBePath, which mean the same. Given both ways, they must agree.
func (r *Route) parseTemplates(get func(param string) string) error {
	pick := func(param, alias string) (string, error) {
		v, a := get(param), get(alias)
		if v != "" && a != "" && v != a {
			return "", paramErr(alias, "names another file than %s; give one of them", param)
		}
		if v == "" {
			v, param = a, alias
		}
		return v, ValidateTemplatePath(param, v)
	}
	var err error
	if r.TemplateFePath, err = pick(ParamTemplateFePath, ParamConsulTemplateFePath); err != nil {
		return err
	}
	r.TemplateBePath, err = pick(ParamTemplateBePath, ParamConsulTemplateBePath)
	return err
}

func (r Route) validateTemplates() error {
	for _, t := range []struct{ param, path string }{
		{ParamTemplateFePath, r.TemplateFePath}, {ParamTemplateBePath, r.TemplateBePath},
	} {
		if err := ValidateTemplatePath(t.param, t.path); err != nil {
			return err
		}
	}
	return nil
}

// ValidateTemplatePath checks the shape of a template's path: relative to the templates folder,
// without "..", made of letters, digits, '_', '.', '-' and '/'. An empty path is unset.
func ValidateTemplatePath(param, p string) error {
	switch {
	case p == "":
		return nil
	case len(p) > MaxTemplatePathLength:
		return paramErr(param, "is longer than %d characters", MaxTemplatePathLength)
	case strings.HasPrefix(p, "/"):
		return paramErr(param, "%s is absolute; give a path relative to the templates folder", quoteForMessage(p))
	case strings.Contains(p, ".."):
		return paramErr(param, "%s contains '..'; templates are read only inside the templates folder", quoteForMessage(p))
	case !templatePathPattern.MatchString(p):
		return paramErr(param, "%s may contain only letters, digits, '_', '.', '-' and '/'", quoteForMessage(p))
	}
	return nil
}

// hasDomain reports whether any destination lists a domain.
func (r Route) hasDomain() bool {
	for _, d := range r.Destinations() {
		if len(d.ServiceDomain) > 0 {
			return true
		}
	}
	return false
}
