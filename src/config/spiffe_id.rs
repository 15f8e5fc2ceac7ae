//! SPIFFE values as configuration holds them: SPIFFE IDs (strict, per the SPIFFE-ID
//! standard) and Workload API addresses. Parsed here, once, at the edge; everything
//! downstream takes the typed value.

use spiffe::SpiffeId;

/// Why a SPIFFE ID is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Not a SPIFFE ID at all (scheme, trust domain or path malformed), as the `spiffe`
    /// crate says.
    #[error("{0}")]
    Malformed(String),
    /// A trust domain with uppercase letters, which a lenient parser would lower.
    #[error("trust domain must be lowercase")]
    UppercaseTrustDomain,
}

/// Parses a SPIFFE ID strictly per the SPIFFE-ID standard: unlike a lenient parser it
/// refuses an uppercase trust domain instead of lowering it.
pub fn parse_spiffe_id(text: &str) -> Result<SpiffeId, SpiffeIdError> {
    let id = SpiffeId::new(text).map_err(|e| SpiffeIdError::Malformed(e.to_string()))?;
    if id.to_string() != text {
        return Err(SpiffeIdError::UppercaseTrustDomain);
    }
    Ok(id)
}

/// Why a Workload API address is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not `unix:///absolute/path` or `unix:/absolute/path`.
    #[error("Workload API address `{0}` must be unix:///absolute/path (or unix:/absolute/path)")]
    NotUnixAbsolute(String),
}

/// Checks a Workload API address and returns it in the `unix:///path` form.
pub fn parse_workload_api_address(addr: &str) -> Result<String, AddressError> {
    let path = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .ok_or_else(|| AddressError::NotUnixAbsolute(addr.to_string()))?;
    if !path.starts_with('/') || path.len() < 2 {
        return Err(AddressError::NotUnixAbsolute(addr.to_string()));
    }
    Ok(format!("unix://{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_strict() {
        let table = [
            ("spiffe://jia.app/payment-service", true),
            ("spiffe://jia.app", true),
            ("spiffe://JIA.app/x", false),
            ("spiffe://jia.app/a/../b", false),
            ("spiffe://jia.app/a//b", false),
            ("spiffe://jia.app:8080/x", false),
            ("spiffe://user@jia.app/x", false),
            ("spiffe://jia.app/x?q=1", false),
            ("https://jia.app/x", false),
            ("", false),
        ];
        for (text, ok) in table {
            assert_eq!(parse_spiffe_id(text).is_ok(), ok, "{text}");
        }
    }

    #[test]
    fn addresses() {
        let table = [
            (
                "unix:///run/spire/sockets/agent.sock",
                Ok("unix:///run/spire/sockets/agent.sock"),
            ),
            ("unix:/tmp/a.sock", Ok("unix:///tmp/a.sock")),
            ("unix:relative.sock", Err(())),
            ("http://127.0.0.1:8081", Err(())),
            ("/tmp/a.sock", Err(())),
            ("unix://", Err(())),
        ];
        for (input, want) in table {
            let got = parse_workload_api_address(input).map_err(|_| ());
            assert_eq!(got, want.map(str::to_string), "{input}");
        }
    }
}
