package spire

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeagent/nodeagent/agent/health"
)

// apiState is what the Workload API said last.
type apiState int

const (
	apiUnknown    apiState = iota // no answer yet on this socket
	apiIdentity                   // an X.509 context
	apiNoIdentity                 // PermissionDenied: serving, nothing for this process
	apiFailing                    // any other error
)

// state is everything the spire check is computed from.
type state struct {
	dirErr        error // the socket directory could not be made or is unusable
	exposeErr     error // ExposeAt does not reach the socket
	socketPresent bool
	socketErr     error // the socket path is there but unusable (not a socket, stat error)
	api           apiState
	apiErr        error
	x509          *workloadapi.X509Context
}

// classify turns a Workload API answer into a state.
func classify(x *workloadapi.X509Context, err error) (apiState, error) {
	switch {
	case err == nil && x != nil && len(x.SVIDs) > 0:
		return apiIdentity, nil
	case err == nil:
		return apiFailing, errors.New("empty x509 context")
	case status.Code(err) == codes.PermissionDenied:
		// As `spire-agent healthcheck` treats it: the agent answered and attested us,
		// it just has no registration entry for this process.
		return apiNoIdentity, err
	default:
		return apiFailing, err
	}
}

// margin is how close to expiry an SVID may get before the check fails.
func margin(o Options, svid *x509svid.SVID) time.Duration {
	if o.ExpiryMargin > 0 {
		return o.ExpiryMargin
	}
	leaf := svid.Certificates[0]
	return leaf.NotAfter.Sub(leaf.NotBefore) / 6
}

// evaluate computes the spire check from st at now, and the next instant at which the
// verdict changes by the passing of time alone (zero if none).
func evaluate(o Options, st state, now time.Time) (health.Result, time.Time) {
	res := health.Result{Name: health.Spire}
	var next time.Time
	switch {
	case st.dirErr != nil:
		res.Detail = fmt.Sprintf("socket directory %s: %v", filepath.Dir(o.Socket), st.dirErr)
	case st.socketErr != nil:
		res.Detail = fmt.Sprintf("socket %s: %v", o.Socket, st.socketErr)
	case !st.socketPresent:
		res.Detail = "socket absent: " + o.Socket
	case st.api == apiUnknown:
		res.Detail = "socket present, waiting for the workload api: " + o.Socket
	case st.api == apiFailing:
		res.Detail = fmt.Sprintf("socket present, not serving: %s", errText(st.apiErr))
	case st.api == apiNoIdentity:
		res.OK = !o.RequireIdentity
		res.Detail = "serving, no identity issued for nodeagent (permission denied)"
		if o.RequireIdentity {
			res.Detail += "; an identity is required"
		}
	default:
		svid := st.x509.DefaultSVID()
		leaf := svid.Certificates[0]
		td := svid.ID.TrustDomain()
		authorities := 0
		if b, err := st.x509.Bundles.GetX509BundleForTrustDomain(td); err == nil {
			authorities = len(b.X509Authorities())
		}
		expires := leaf.NotAfter.UTC().Format(time.RFC3339)
		m := margin(o, svid)
		warnAt := leaf.NotAfter.Add(-m)
		switch {
		case !now.Before(leaf.NotAfter):
			res.Detail = fmt.Sprintf("serving, %s expired at %s without rotation", svid.ID, expires)
		case !now.Before(warnAt):
			res.Detail = fmt.Sprintf("serving, %s expires %s, within the %s margin, without rotation", svid.ID, expires, m)
			next = leaf.NotAfter
		default:
			res.OK = true
			res.Detail = fmt.Sprintf("serving, %s (trust domain %s), expires %s, bundle %d authorities", svid.ID, td, expires, authorities)
			if n := len(st.x509.SVIDs); n > 1 {
				res.Detail += fmt.Sprintf(", %d svids", n)
			}
			next = warnAt
		}
	}
	if o.ExposeAt != "" && st.exposeErr != nil {
		res.OK = false
		res.Detail += fmt.Sprintf("; expose_at %s: %v", o.ExposeAt, st.exposeErr)
	}
	return res, next
}

// errText shortens gRPC errors to their message (the code is in the message already
// for the cases that matter: connection refused, no such file).
func errText(err error) string {
	if err == nil {
		return "no answer"
	}
	if s, ok := status.FromError(err); ok {
		msg := s.Message()
		// "connection error: desc = \"transport: Error while dialing: dial unix ...\""
		if i := strings.LastIndex(msg, "dial unix"); i >= 0 {
			msg = strings.TrimSuffix(msg[i:], "\"")
		}
		return fmt.Sprintf("%s: %s", strings.ToLower(s.Code().String()), msg)
	}
	return err.Error()
}

// socketAddr is the Workload API address of a socket path.
func socketAddr(path string) string { return "unix://" + path }

// fastBackoff retries the Workload API watch quickly (100ms doubling to 2s) instead of
// go-spiffe's default linear 1s..30s, so a restarted agent is seen within seconds.
type fastBackoff struct{}

func (fastBackoff) NewBackoff() workloadapi.Backoff { return &expBackoff{} }

type expBackoff struct{ n int }

func (b *expBackoff) Next() time.Duration {
	d := min(100*time.Millisecond<<min(b.n, 5), 2*time.Second)
	b.n++
	return d
}

func (b *expBackoff) Reset() { b.n = 0 }

// clientOptions dials path with short reconnect backoff.
func clientOptions(path string) []workloadapi.ClientOption {
	return []workloadapi.ClientOption{
		workloadapi.WithAddr(socketAddr(path)),
		workloadapi.WithBackoffStrategy(fastBackoff{}),
		workloadapi.WithDialOptions(grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
			MinConnectTimeout: 2 * time.Second,
		})),
	}
}

// fetchOnce asks the Workload API at path for the X.509 context once.
func fetchOnce(ctx context.Context, path string) (*workloadapi.X509Context, error) {
	c, err := workloadapi.New(ctx, clientOptions(path)...)
	if err != nil {
		return nil, fmt.Errorf("workload api client for %s: %w", path, err)
	}
	defer func() { _ = c.Close() }()
	return c.FetchX509Context(ctx)
}
