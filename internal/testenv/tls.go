package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TLS is a certificate authority made for one test, with a server
// certificate (for localhost and the loopback addresses, unless NewTLSFor
// names others) and a client certificate, as PEM
// files in a directory of their own that any user can read (the servers run
// as their own users), removed at cleanup.
type TLS struct {
	Dir        string
	CA         string // the CA's certificate
	ServerCert string
	ServerKey  string
	ClientCert string // CN is the client name given to NewTLS
	ClientKey  string
	serverPEM  []byte
	serverKey  []byte
	caPEM      []byte
}

// NewTLS makes a CA and its certificates; client names the client
// certificate's subject (PostgreSQL maps it to the database user).
func NewTLS(t testing.TB, client string) *TLS {
	t.Helper()
	return NewTLSFor(t, client, "localhost", "127.0.0.1", "::1")
}

// NewTLSFor is NewTLS with a server certificate for the given host names
// and IP addresses only: one for another name tests host verification.
func NewTLSFor(t testing.TB, client string, serverNames ...string) *TLS {
	t.Helper()
	var dns []string
	var ips []net.IP
	for _, n := range serverNames {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, n)
		}
	}
	dir, err := os.MkdirTemp("", "outbox-testenv-tls-")
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	caKey, caDER := newCert(t, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "outbox-relay test CA " + randomHex(4)},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}, nil, nil)
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	srvKey, srvDER := newCert(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: serverNames[0]},
		DNSNames:    dns,
		IPAddresses: ips,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, caKey)
	cliKey, cliDER := newCert(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: client},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, caKey)

	c := &TLS{Dir: dir, caPEM: pemBlock("CERTIFICATE", caDER), serverPEM: pemBlock("CERTIFICATE", srvDER), serverKey: keyPEM(t, srvKey)}
	for _, f := range []struct {
		path *string
		name string
		data []byte
	}{
		{&c.CA, "ca.pem", c.caPEM},
		{&c.ServerCert, "server.pem", c.serverPEM},
		{&c.ServerKey, "server.key", c.serverKey},
		{&c.ClientCert, "client.pem", pemBlock("CERTIFICATE", cliDER)},
		{&c.ClientKey, "client.key", keyPEM(t, cliKey)},
	} {
		*f.path = filepath.Join(dir, f.name)
		if err := os.WriteFile(*f.path, f.data, 0o644); err != nil {
			t.Fatalf("testenv: tls: %v", err)
		}
	}
	return c
}

// newCert signs template with parent's key (itself when parent is nil) and
// returns the new key and the certificate's DER.
func newCert(t testing.TB, template, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	template.SerialNumber = serial
	template.NotBefore = time.Now().Add(-time.Hour)
	template.NotAfter = time.Now().Add(24 * time.Hour)
	if parent == nil {
		parent, parentKey = template, key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	return key, der
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func keyPEM(t testing.TB, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatalf("testenv: tls: %v", err)
	}
	return pemBlock("PRIVATE KEY", der)
}
