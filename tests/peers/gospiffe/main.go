// gospiffe-peer is a foreign SPIFFE workload for meshd's interop tests
// (tests/interop_gospiffe.rs): it takes its X.509-SVID and bundle from the Workload API with
// go-spiffe v2 (workloadapi.NewX509Source) and speaks mTLS with spiffetls/tlsconfig, the way a
// Go service in the mesh would, so meshd is tested against the reference Go library.
//
//	gospiffe-peer server -listen 127.0.0.1:PORT -allow spiffe://td/caller [-socket unix:///...]
//	    One mTLS port, HTTP/2 (ALPN h2), that only -allow may call. gRPC requests get
//	    grpc.health.v1.Health (SERVING) and reflection, each unary answer with the caller's ID
//	    in a `spiffe-caller` header; anything else gets an HTTP 200 naming this server's ID
//	    and the caller's. Prints
//	    "gospiffe-peer server ready ..." once listening; logs refused handshakes on stderr.
//	gospiffe-peer client -addr HOST:PORT -server-id spiffe://td/server [-method /pkg.Svc/M]
//	        [-field N=text] [-n COUNT] [-socket unix:///...]
//	    gRPC calls over mTLS to a server that must present -server-id. Without -method it
//	    calls Health/Check; with one it sends a message of the -field strings and prints the
//	    answer's fields (no generated code needed for meshd's demo protos). Prints the server's
//	    ID and the answer; on failure prints the error and the gRPC code, and exits 1.
//
// The socket defaults to $SPIFFE_ENDPOINT_SOCKET. The JWT-SVID subcommands are in their own
// files: jwt-server (jwt_server.go: jwtsvid.ParseAndValidate on each request's bearer token)
// and jwt-client (jwt_client.go: workloadapi.FetchJWTSVID, then an HTTPS call carrying it).
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffegrpc/grpccredentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("gospiffe-peer: ")
	if len(os.Args) < 2 {
		log.Fatal("usage: gospiffe-peer server|client [flags] (see the comment in main.go)")
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = server(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	case "jwt-server":
		err = jwtServer(os.Args[2:])
	case "jwt-client":
		err = jwtClient(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q (server|client|jwt-server|jwt-client)", os.Args[1])
	}
	if err != nil {
		log.Fatalf("%s: %v", os.Args[1], err)
	}
}

// x509Source connects to the Workload API and waits for the first SVID and bundles.
func x509Source(ctx context.Context, socket string) (*workloadapi.X509Source, error) {
	var opts []workloadapi.X509SourceOption
	if socket != "" {
		opts = append(opts, workloadapi.WithClientOptions(workloadapi.WithAddr(socket)))
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return workloadapi.NewX509Source(ctx, opts...)
}

func server(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	socket := fs.String("socket", "", "Workload API address (default $SPIFFE_ENDPOINT_SOCKET)")
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	allow := fs.String("allow", "", "the only SPIFFE ID allowed to call")
	_ = fs.Parse(args)
	allowed, err := spiffeid.FromString(*allow)
	if err != nil {
		return fmt.Errorf("-allow: %w", err)
	}
	source, err := x509Source(context.Background(), *socket)
	if err != nil {
		return err
	}
	defer source.Close()
	svid, err := source.GetX509SVID()
	if err != nil {
		return err
	}

	grpcServer := grpc.NewServer(grpc.UnaryInterceptor(tellCaller))
	healthpb.RegisterHealthServer(grpcServer, health.NewServer()) // "" is SERVING
	reflection.Register(grpcServer)                               // for grpcurl without protos
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			grpcServer.ServeHTTP(w, r)
			return
		}
		fmt.Fprintf(w, "go-spiffe server %s; caller %s; %s %s %s\n",
			svid.ID, callerID(r.TLS), r.Proto, r.Method, r.URL.Path)
	})
	tlsConfig := tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeID(allowed))
	tlsConfig.NextProtos = []string{"h2"}
	ln, err := tls.Listen("tcp", *listen, tlsConfig)
	if err != nil {
		return err
	}
	fmt.Printf("gospiffe-peer server ready on %s as %s, allowing %s\n", ln.Addr(), svid.ID, allowed)
	// http.Server logs each refused handshake ("http: TLS handshake error ...") on stderr.
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	return srv.Serve(ln)
}

// tellCaller answers every gRPC call with the caller's SPIFFE ID in a response header.
func tellCaller(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	id := "unknown"
	if p, ok := peer.FromContext(ctx); ok {
		if tlsInfo, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			id = callerID(&tlsInfo.State)
		}
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs("spiffe-caller", id))
	return next(ctx, req)
}

// callerID is the SPIFFE ID of the verified client certificate.
func callerID(state *tls.ConnectionState) string {
	if state == nil || len(state.PeerCertificates) == 0 {
		return "none"
	}
	id, err := x509svid.IDFromCert(state.PeerCertificates[0])
	if err != nil {
		return "invalid: " + err.Error()
	}
	return id.String()
}

// fieldList collects repeated -field N=text flags.
type fieldList []string

func (f *fieldList) String() string     { return strings.Join(*f, ",") }
func (f *fieldList) Set(v string) error { *f = append(*f, v); return nil }

func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	socket := fs.String("socket", "", "Workload API address (default $SPIFFE_ENDPOINT_SOCKET)")
	addr := fs.String("addr", "", "server address, host:port")
	serverID := fs.String("server-id", "", "the SPIFFE ID the server must present")
	method := fs.String("method", "", "full gRPC method, /pkg.Service/Method (default: Health/Check)")
	var fields fieldList
	fs.Var(&fields, "field", "a string field of the request, N=text (repeatable)")
	count := fs.Int("n", 1, "how many calls")
	_ = fs.Parse(args)
	want, err := spiffeid.FromString(*serverID)
	if err != nil {
		return fmt.Errorf("-server-id: %w", err)
	}
	request, err := encodeFields(fields)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	source, err := x509Source(ctx, *socket)
	if err != nil {
		return err
	}
	defer source.Close()
	creds := grpccredentials.MTLSClientCredentials(source, source, tlsconfig.AuthorizeID(want))
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()

	for i := 0; i < *count; i++ {
		var p peer.Peer
		var header metadata.MD
		opts := []grpc.CallOption{grpc.Peer(&p), grpc.Header(&header)}
		var answer string
		if *method == "" {
			var r *healthpb.HealthCheckResponse
			r, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, opts...)
			answer = "status " + r.GetStatus().String()
		} else {
			var reply []byte
			err = conn.Invoke(ctx, *method, &request, &reply, append(opts, grpc.ForceCodec(rawCodec{}))...)
			answer = describeFields(reply)
		}
		if err != nil {
			return fmt.Errorf("%w (grpc code %d)", err, status.Code(err))
		}
		if id, ok := grpccredentials.PeerIDFromPeer(&p); ok {
			fmt.Printf("server %s\n", id)
		}
		for _, v := range header.Get("spiffe-caller") {
			fmt.Printf("spiffe-caller %s\n", v)
		}
		fmt.Println(answer)
	}
	return nil
}

// rawCodec passes messages as bytes, so any method can be called without generated code.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) ([]byte, error) {
	if b, ok := v.(*[]byte); ok {
		return *b, nil
	}
	return nil, fmt.Errorf("rawCodec cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	if b, ok := v.(*[]byte); ok {
		*b = append([]byte(nil), data...)
		return nil
	}
	return fmt.Errorf("rawCodec cannot unmarshal into %T", v)
}

// encodeFields builds a protobuf message from N=text string fields.
func encodeFields(fields []string) ([]byte, error) {
	var msg []byte
	for _, f := range fields {
		n, text, ok := strings.Cut(f, "=")
		num, err := strconv.Atoi(n)
		if !ok || err != nil || num < 1 {
			return nil, fmt.Errorf("-field %q: want N=text", f)
		}
		msg = protowire.AppendTag(msg, protowire.Number(num), protowire.BytesType)
		msg = protowire.AppendString(msg, text)
	}
	return msg, nil
}

// describeFields prints a message's top-level fields: text as quoted strings, numbers as is.
func describeFields(msg []byte) string {
	var out []string
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return strings.Join(append(out, "(malformed)"), " ")
		}
		msg = msg[n:]
		var value string
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(msg)
			value, n = strconv.FormatUint(v, 10), m
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(msg)
			value, n = fmt.Sprintf("%d bytes", len(v)), m
			if utf8.Valid(v) {
				value = strconv.Quote(string(v))
			}
		default:
			n = protowire.ConsumeFieldValue(num, typ, msg)
			value = "(" + strconv.Itoa(n) + " bytes)"
		}
		if n < 0 {
			return strings.Join(append(out, "(malformed)"), " ")
		}
		msg = msg[n:]
		out = append(out, fmt.Sprintf("%d:%s", num, value))
	}
	return "fields " + strings.Join(out, " ")
}
