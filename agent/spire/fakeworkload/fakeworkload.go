// Package fakeworkload is a small in-process SPIFFE Workload API server for tests,
// written on go-spiffe's generated proto/spiffe/workload service (go-spiffe's own
// fake is internal). It serves FetchX509SVID on a Unix socket the way the SPIRE agent
// does: the security header is required, a caller without identity gets
// PermissionDenied "no identity issued", and every change of the served X.509
// context is streamed to open watchers. It can be killed (socket file left behind,
// as after SIGKILL), stopped (socket removed) and started again on the same path.
package fakeworkload

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// CA mints X509-SVIDs for one trust domain.
type CA struct {
	td     spiffeid.TrustDomain
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	serial int64
	mu     sync.Mutex
}

// NewCA returns a self-signed CA for td, valid from an hour ago for a day.
func NewCA(td spiffeid.TrustDomain) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"fakeworkload"}, CommonName: td.Name()},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse ca certificate: %w", err)
	}
	return &CA{td: td, cert: cert, key: key, serial: 1}, nil
}

// Cert returns the CA certificate (the trust domain's bundle).
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// SVID mints an X509-SVID for id valid in [notBefore, notAfter], with the CA as the
// bundle, in the Workload API's wire form.
func (ca *CA) SVID(id spiffeid.ID, notBefore, notAfter time.Time) (*workload.X509SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate svid key: %w", err)
	}
	ca.mu.Lock()
	ca.serial++
	serial := ca.serial
	ca.mu.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{Organization: []string{"fakeworkload"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("create svid certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal svid key: %w", err)
	}
	return &workload.X509SVID{
		SpiffeId:    id.String(),
		X509Svid:    der,
		X509SvidKey: keyDER,
		Bundle:      ca.cert.Raw,
	}, nil
}

// Server is a fake Workload API on a Unix socket.
type Server struct {
	path string

	mu      sync.Mutex
	resp    *workload.X509SVIDResponse // nil: the caller has no identity
	changed chan struct{}              // closed and replaced on every SetX509
	grpc    *grpc.Server
	lis     *net.UnixListener
	peers   []unix.Ucred
}

// New returns a server for the socket at path; it serves nothing until Start.
func New(path string) *Server {
	return &Server{path: path, changed: make(chan struct{})}
}

// Path returns the socket path.
func (s *Server) Path() string { return s.path }

// Start listens on the socket (removing a stale socket file first, as the SPIRE
// agent does) and serves until Kill or Stop.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc != nil {
		return errors.New("fake workload api already started")
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", s.path, err)
	}
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.path, err)
	}
	if err := os.Chmod(s.path, 0o777); err != nil {
		_ = lis.Close()
		return fmt.Errorf("chmod %s: %w", s.path, err)
	}
	g := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(g, &api{s: s})
	s.grpc, s.lis = g, lis
	go func() { _ = g.Serve(&credListener{UnixListener: lis, s: s}) }()
	return nil
}

// Kill stops serving at once and leaves the socket file in place, as a SIGKILLed
// agent does.
func (s *Server) Kill() {
	s.mu.Lock()
	g, lis := s.grpc, s.lis
	s.grpc, s.lis = nil, nil
	s.mu.Unlock()
	if g == nil {
		return
	}
	lis.SetUnlinkOnClose(false)
	g.Stop()
}

// Stop stops serving and removes the socket file.
func (s *Server) Stop() {
	s.Kill()
	_ = os.Remove(s.path)
}

// SetX509 sets what FetchX509SVID serves: nil means "no identity issued"
// (PermissionDenied). Open streams receive the change.
func (s *Server) SetX509(svids ...*workload.X509SVID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(svids) == 0 {
		s.resp = nil
	} else {
		s.resp = &workload.X509SVIDResponse{Svids: svids}
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// Peers returns the credentials (SO_PEERCRED) of every connection accepted so far.
func (s *Server) Peers() []unix.Ucred {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]unix.Ucred(nil), s.peers...)
}

func (s *Server) current() (*workload.X509SVIDResponse, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resp, s.changed
}

// credListener records the peer credentials of each accepted connection.
type credListener struct {
	*net.UnixListener
	s *Server
}

func (l *credListener) Accept() (net.Conn, error) {
	c, err := l.AcceptUnix()
	if err != nil {
		return nil, err
	}
	if raw, err := c.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
				l.s.mu.Lock()
				l.s.peers = append(l.s.peers, *cred)
				l.s.mu.Unlock()
			}
		})
	}
	return c, nil
}

type api struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	s *Server
}

func (a *api) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		resp, changed := a.s.current()
		if resp == nil {
			return status.Error(codes.PermissionDenied, "no identity issued")
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}
