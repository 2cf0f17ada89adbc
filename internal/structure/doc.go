// Package structure holds tests that keep the tree readable: the engine's
// files short, every exported name documented, and docs/architecture.md
// naming only files and functions that exist. It has no code of its own.
package structure
