package schema_test

import (
	"io/fs"
	"strings"
)

func fsysRead(fsys fs.FS) (string, error) {
	var b strings.Builder
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(fsys, p)
		b.Write(data)
		return err
	})
	return b.String(), err
}
