package collector

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func (ca *testCA) issue(t *testing.T, server bool) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// startTLSSink serves a sink over TLS; with clientCA set it requires a client certificate from it.
func startTLSSink(t *testing.T, ca *testCA, requireClient bool) *sink {
	s := newSink()
	cfg := &tls.Config{Certificates: []tls.Certificate{ca.issue(t, true)}}
	if requireClient {
		pool := x509.NewCertPool()
		pool.AddCert(ca.cert)
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	s.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	ptraceotlp.RegisterGRPCServer(s.srv, s)
	go s.srv.Serve(l)
	t.Cleanup(s.stop)
	return s
}

func TestExporterTLS(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.pem, 0o600)
	otherFile := filepath.Join(t.TempDir(), "other.pem")
	os.WriteFile(otherFile, other.pem, 0o600)
	client := ca.issue(t, false)

	tests := []struct {
		name          string
		requireClient bool
		exporter      func(e *Exporter)
		delivered     bool
	}{
		{"ca file", false, func(e *Exporter) { e.CAFile = caFile }, true},
		{"wrong ca", false, func(e *Exporter) { e.CAFile = otherFile }, false},
		{"system roots do not know a test ca", false, func(e *Exporter) {}, false},
		{"mtls via provider", true, func(e *Exporter) {
			e.TLSConfig = func() (*tls.Config, error) {
				pool := x509.NewCertPool()
				pool.AddCert(ca.cert)
				return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{client}}, nil
			}
		}, true},
		{"mtls without client certificate", true, func(e *Exporter) { e.CAFile = caFile }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startTLSSink(t, ca, tc.requireClient)
			opts := testOptions(t, up.addr)
			opts.Exporter.Insecure = false
			tc.exporter(&opts.Exporter)
			tr := startRelay(t, opts)
			td, ids := makeTraces("tls", 3)
			if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
				t.Fatal(err)
			}
			if tc.delivered {
				up.waitIDs(t, ids, 10*time.Second)
				return
			}
			waitMetric(t, func() float64 {
				if tr.spans(resRetried) > 0 {
					return 1
				}
				return 0
			}, 1)
			if n, _ := up.count(); n != 0 {
				t.Fatalf("got %d spans through a TLS handshake that must fail", n)
			}
		})
	}
}
