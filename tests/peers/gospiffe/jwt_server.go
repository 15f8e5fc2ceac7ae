// The jwt-server subcommand: an HTTPS server (HTTP/2, ALPN h2) that takes the caller's
// JWT-SVID from `authorization: Bearer ...` and validates it with go-spiffe's
// jwtsvid.ParseAndValidate against the JWT bundles of the Workload API
// (workloadapi.NewJWTSource), the way a Go service checks a JWT-SVID.
//
//	gospiffe-peer jwt-server -listen 127.0.0.1:PORT -audience AUD [-socket unix:///...]
//	        [-cert server.pem -key server.key]
//	    Without -cert: mutual TLS with its X.509-SVID (any SPIFFE peer of a trusted domain may
//	    connect). With -cert and -key: plain TLS with that certificate (a server outside the
//	    mesh; no client certificate asked for). Every request: 200
//	    "jwt-svid subject <sub>; audience <aud,...>; mtls caller <id|none>" when the token is
//	    valid for -audience, else 401 "go-spiffe: <error>". Prints
//	    "gospiffe-peer jwt-server ready ..." once it listens with its bundles.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func jwtServer(args []string) error {
	fs := flag.NewFlagSet("jwt-server", flag.ExitOnError)
	socket := fs.String("socket", "", "Workload API address (default $SPIFFE_ENDPOINT_SOCKET)")
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	audience := fs.String("audience", "", "the audience a token must name")
	certFile := fs.String("cert", "", "PEM certificate chain for plain TLS (instead of an X.509-SVID)")
	keyFile := fs.String("key", "", "PEM private key of -cert")
	_ = fs.Parse(args)
	if *audience == "" {
		return errors.New("-audience is required")
	}
	var opts []workloadapi.JWTSourceOption
	if *socket != "" {
		opts = append(opts, workloadapi.WithClientOptions(workloadapi.WithAddr(*socket)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	bundles, err := workloadapi.NewJWTSource(ctx, opts...)
	if err != nil {
		return fmt.Errorf("JWT bundles from the Workload API: %w", err)
	}
	defer bundles.Close()

	var tlsConfig *tls.Config
	as := "certificate " + *certFile
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			return fmt.Errorf("-cert/-key: %w", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	} else {
		source, err := x509Source(context.Background(), *socket)
		if err != nil {
			return err
		}
		defer source.Close()
		svid, err := source.GetX509SVID()
		if err != nil {
			return err
		}
		as = svid.ID.String()
		tlsConfig = tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeAny())
	}
	tlsConfig.NextProtos = []string{"h2"}

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, found := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !found {
			http.Error(w, "go-spiffe: no bearer token", http.StatusUnauthorized)
			return
		}
		svid, err := jwtsvid.ParseAndValidate(token, bundles, []string{*audience})
		if err != nil {
			http.Error(w, "go-spiffe: "+err.Error(), http.StatusUnauthorized)
			return
		}
		fmt.Fprintf(w, "jwt-svid subject %s; audience %s; mtls caller %s\n",
			svid.ID, strings.Join(svid.Audience, ","), callerID(r.TLS))
	})
	ln, err := tls.Listen("tcp", *listen, tlsConfig)
	if err != nil {
		return err
	}
	fmt.Printf("gospiffe-peer jwt-server ready on %s as %s, audience %s\n", ln.Addr(), as, *audience)
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	return srv.Serve(ln)
}
