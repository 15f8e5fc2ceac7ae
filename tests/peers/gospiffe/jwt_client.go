// jwt-client: a go-spiffe workload calling over HTTPS with mTLS and a JWT-SVID, the way a Go
// service holding a JWT-SVID would call a JWT-checking peer (tests/jwt_inbound.rs).
//
//	gospiffe-peer jwt-client -addr HOST:PORT -server-id spiffe://td/server -audience AUD
//	        [-path /p] [-n COUNT] [-socket unix:///...]
//	    Fetches a JWT-SVID for -audience with workloadapi.FetchJWTSVID, then sends
//	    GET https://HOST:PORT/p over HTTP/2 with mTLS (spiffetls/tlsconfig, the server must
//	    present -server-id) and `authorization: Bearer <JWT-SVID>`. Prints
//	    "jwt-svid <subject> <audience>", then per call "status <code>" and the answer body;
//	    exits 1 on a transport error or a status other than 200.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func jwtClient(args []string) error {
	fs := flag.NewFlagSet("jwt-client", flag.ExitOnError)
	socket := fs.String("socket", "", "Workload API address (default $SPIFFE_ENDPOINT_SOCKET)")
	addr := fs.String("addr", "", "server address, host:port")
	serverID := fs.String("server-id", "", "the SPIFFE ID the server must present")
	audience := fs.String("audience", "", "the audience of the JWT-SVID")
	path := fs.String("path", "/", "the request path")
	count := fs.Int("n", 1, "how many calls")
	_ = fs.Parse(args)
	want, err := spiffeid.FromString(*serverID)
	if err != nil {
		return fmt.Errorf("-server-id: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var clientOpts []workloadapi.ClientOption
	if *socket != "" {
		clientOpts = append(clientOpts, workloadapi.WithAddr(*socket))
	}
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience}, clientOpts...)
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	fmt.Printf("jwt-svid %s %s\n", svid.ID, strings.Join(svid.Audience, ","))
	source, err := x509Source(ctx, *socket)
	if err != nil {
		return err
	}
	defer source.Close()
	tlsConfig := tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeID(want))
	tlsConfig.NextProtos = []string{"h2"}
	httpClient := &http.Client{
		Transport: &http.Transport{TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true},
		Timeout:   10 * time.Second,
	}
	for i := 0; i < *count; i++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+*addr+*path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+svid.Marshal())
		resp, err := httpClient.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("status %d %s\n%s\n", resp.StatusCode, resp.Proto, strings.TrimSpace(string(body)))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
	}
	return nil
}
